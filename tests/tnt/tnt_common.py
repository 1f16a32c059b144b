"""The TNT tests' model, prompt and helpers (the model is :func:`tests.fixtures.tnt_lm`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmppl.decoding import feed, next_token_log_probs, prefill
from lmppl.tnt import TNTBatch, old_log_probs
from tests.fixtures import tnt_lm

LM = tnt_lm()  # a random Llama over <s> </s> a b c d
PROMPT = jnp.array([0, 2], jnp.int32)  # "<s>a"
UNWANTED = 3  # "b"


def perturbed(params, scale=0.3, seed=0):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )


def stepwise_log_probs(lm, params, prompt, tokens):
    """log p(· | prompt, x_<t) ``[B, T, V]`` by feeding one token at a time (another path
    than the teacher-forced pass under test)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    rows, steps = tokens.shape
    state = prefill(lm, params, prompt, jnp.asarray(prompt.shape[0]), rows, steps)
    out = []
    for t in range(steps):
        out.append(next_token_log_probs(state.logits, 1.0))
        state = feed(lm, params, state, tokens[:, t])
    return np.stack([np.asarray(x, np.float64) for x in out], axis=1)


def make_batch(lm, prompt, tokens, mask, valid=None, weights=None) -> TNTBatch:
    tokens = jnp.asarray(tokens, jnp.int32)
    rows = tokens.shape[0]
    valid = np.ones(tokens.shape, bool) if valid is None else np.asarray(valid, bool)
    return TNTBatch(
        prompt_tokens=jnp.broadcast_to(prompt, (rows, prompt.shape[0])),
        prompt_length=jnp.full((rows,), prompt.shape[0], jnp.int32),
        tokens=tokens,
        mask=jnp.asarray(mask, bool) & jnp.asarray(valid),
        valid=jnp.asarray(valid),
        old_log_probs=jnp.asarray(old_log_probs(lm, prompt, prompt.shape[0], tokens)),
        weights=jnp.ones((rows,), jnp.float32) if weights is None else jnp.asarray(weights),
    )
