"""Pairs of tiny models with one vocabulary, and brute-force sequence log-probabilities.

Two kinds of pairs: table LMs (their next-token law is computed here in NumPy from the
tables themselves) and tiny random transformers (a Llama reference and a GPT-2 aligned
model: two different cache pytrees), scored by one uncached forward pass of each network
with the log-softmax taken in NumPy. Neither path goes through the realigned model or
lmppl's cached decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.fixtures import realign_pairs

PAIRS = realign_pairs()  # table: seeds 11 / 12; transformer: Llama / GPT-2

PROMPT = "ab"  # [<s>, a, b]: 3 tokens


def forward_logits(model, params, tokens) -> jax.Array:
    """``[M, S, V]`` logits of one uncached forward pass of ``tokens`` ``[M, S]`` (jitted)."""
    tokens = jnp.asarray(tokens, jnp.int32)

    @jax.jit
    def run(params, tokens):
        cache = model.init_cache(tokens.shape[0], tokens.shape[1])
        return model.apply(params, tokens, cache).logits

    return run(params, tokens)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def step_log_probs(lm, prompt_ids: list[int], sequences: np.ndarray) -> np.ndarray:
    """``[M, T, V]`` float64 ``log π(· | prompt, s_<t)`` for each sequence, each step."""
    rows, steps = sequences.shape
    prompt_len = len(prompt_ids)
    if lm.config.architecture == "table":
        transition = np.asarray(lm.params["transition"][...], np.float64)
        position = np.asarray(lm.params["position"][...], np.float64)
        last = lm.context_length - 1
        previous = np.concatenate([np.full((rows, 1), prompt_ids[-1]), sequences[:, :-1]], axis=1)
        positions = np.minimum(prompt_len + np.arange(steps), last)
        logits = transition[previous] + position[positions][None]
    else:
        full = np.concatenate([np.tile(prompt_ids, (rows, 1)), sequences], axis=1)
        logits = np.asarray(forward_logits(lm, lm.params, full[:, :-1]), np.float64)
        logits = logits[:, prompt_len - 1 :]
    return log_softmax(logits)


def sequence_log_probs(step_lp: np.ndarray, sequences: np.ndarray, eos: int | None) -> np.ndarray:
    """``[M]`` Σ_t of the chosen tokens' log-probabilities; EOS padding as ``lmppl.LM``."""
    chosen = np.take_along_axis(step_lp, sequences[..., None], axis=-1)[..., 0]
    if eos is None:
        return chosen.sum(axis=1)
    is_eos = sequences == eos
    after = np.cumsum(is_eos, axis=1) - is_eos > 0
    padding_ok = np.all(np.where(after, is_eos, True), axis=1)
    total = np.where(after, 0.0, chosen).sum(axis=1)
    return np.where(padding_ok, total, -np.inf)


def log_sum_exp(values: np.ndarray) -> float:
    values = np.asarray(values, np.float64)
    top = values[np.isfinite(values)].max()
    return float(top + np.log(np.exp(values - top).sum()))
