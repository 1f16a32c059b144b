"""Tiny enumerable targets shared by the inference tests.

Each target is ``(program, args)`` over a random table LM with a vocabulary of 5–6 tokens
and 3 new tokens, so every sequence can be enumerated by brute force.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import numpyro
from jax.scipy.special import logsumexp
from numpyro.infer.util import log_density

import lmppl
from lmppl import potentials

LM_SMALL = lmppl.table_lm(3, context_length=12, seed=1)  # vocab 5: <s> </s> a b c
LM_EOS = lmppl.table_lm(4, context_length=12, seed=2, scale=1.5)  # vocab 6


def soft_factor(ending=None):
    s = numpyro.sample("s", lmppl.LM(LM_SMALL, "a", 3, stop_at_eos=False))
    numpyro.factor("likes_c", 1.5 * jnp.sum(s == 4) - 0.5 * jnp.sum(s == 2))


def threshold(ending=None):
    s = numpyro.sample("s", lmppl.LM(LM_SMALL, "ab", 3, stop_at_eos=False))
    numpyro.factor("few_a", potentials.threshold(jnp.sum(s == 2), 1))


def infilling(ending):
    s = numpyro.sample("s", lmppl.LM(LM_SMALL, "a", 3, stop_at_eos=False))
    prompt = lmppl.concat("a", s)
    numpyro.sample("ending", lmppl.LM(LM_SMALL, prompt, 2, stop_at_eos=False), obs=ending)


def eos_target(ending=None):
    s = numpyro.sample("s", lmppl.LM(LM_EOS, "ab", 3))
    numpyro.factor("short", -0.7 * jnp.sum(s != 1))


def banned(ending=None):
    s = numpyro.sample("s", lmppl.LM(LM_SMALL, "a", 3, stop_at_eos=False))
    potentials.banned_tokens("no_b", s, [3], LM_SMALL.vocab_size)
    numpyro.factor("likes_c", 1.0 * jnp.sum(s == 4))


ENDING = jnp.array([4, 2], jnp.int32)

TARGETS = {
    "soft_factor": (soft_factor, ()),
    "threshold": (threshold, ()),
    "infilling": (infilling, (ENDING,)),
    "eos": (eos_target, ()),
    "banned_tokens": (banned, ()),
}


def brute_force(program, args, vocab_size: int, steps: int, site: str = "s"):
    """``(sequences [M, T], log σ̃ [M])`` from NumPyro's own ``log_density``."""
    sequences = np.asarray(list(itertools.product(range(vocab_size), repeat=steps)), np.int32)
    log_joint = np.array(
        [float(log_density(program, args, {}, {site: jnp.asarray(seq)})[0]) for seq in sequences]
    )
    return sequences, log_joint


def log_z(log_joint: np.ndarray) -> float:
    return float(logsumexp(jnp.asarray(log_joint)))
