"""Tiny enumerable targets for the evaluation tests (vocabulary 5, 3 new tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

import lmppl
from lmppl import potentials

LM = lmppl.table_lm(3, context_length=12, seed=1)  # vocab 5: <s> </s> a b c


def classifier(ending=None):
    """φ(s) = p(c = 1 | s) = sigmoid(1.5 · #c − 2): a classifier probability (log φ ≤ 0)."""
    s = numpyro.sample("s", lmppl.LM(LM, "a", 3, stop_at_eos=False))
    numpyro.factor("clf", jax.nn.log_sigmoid(1.5 * jnp.sum(s == 4) - 2.0))


def soft_factor(ending=None):
    """log φ up to 4.5: needs an envelope for rejection."""
    s = numpyro.sample("s", lmppl.LM(LM, "a", 3, stop_at_eos=False))
    numpyro.factor("likes_c", 1.5 * jnp.sum(s == 4) - 0.5 * jnp.sum(s == 2))


def threshold(ending=None):
    s = numpyro.sample("s", lmppl.LM(LM, "ab", 3, stop_at_eos=False))
    numpyro.factor("no_a", potentials.threshold(jnp.sum(s == 2), 1))


def infilling(ending):
    s = numpyro.sample("s", lmppl.LM(LM, "a", 3, stop_at_eos=False))
    numpyro.sample("ending", lmppl.LM(LM, lmppl.concat("a", s), 2, stop_at_eos=False), obs=ending)


def exact(program, *args):
    return lmppl.infer.Exact(program).run(None, *args)


def exact_kls(program, *args) -> tuple[float, float, float]:
    """``(log Z, KL(p0‖σ), KL(σ‖p0))`` by enumeration: log σ/p0 = log φ − log Z."""
    result = exact(program, *args)
    log_z = float(result.log_marginal)
    log_phi = np.asarray(result.log_potential, np.float64)
    sigma = np.asarray(result.weights, np.float64)
    p0 = np.exp(np.asarray(result.log_weights, np.float64) - log_phi)
    kl_p0_sigma = float(np.sum(p0 * (log_z - log_phi)))
    kl_sigma_p0 = float(np.sum(sigma * (log_phi - log_z)))
    return log_z, kl_p0_sigma, kl_sigma_p0


def frequencies(samples: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Empirical frequency of each support row among ``samples`` ``[M, T]``."""
    index = {tuple(row): i for i, row in enumerate(support.tolist())}
    counts = np.zeros(len(support))
    for row in np.asarray(samples).tolist():
        counts[index[tuple(row)]] += 1
    return counts / len(samples)
