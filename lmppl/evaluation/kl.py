"""KL divergences between a proposal q and the target σ (Zhao et al. 2024, Eq. 23).

With ``σ̃ = p0 φ`` and ``log Z`` known or estimated from the bounds,

    KL(q ‖ σ) = log Z − E_q[log σ̃(s) / q(s)]     (E_q: a 1-particle SIS lower bound)
    KL(σ ‖ q) = E_σ[log σ̃(s) / q(s)] − log Z     (E_σ: a 1-particle conditional upper bound)

Here q is the sequence-level proposal of a backend run with one particle: p0 for
``ImportanceSampling`` / ``SMC``, the twist-induced proposal for ``TwistedSMC``. For
infilling both are taken per condition (with that condition's log Z) and averaged over
conditions (the ``E_q`` term uniformly over the distinct conditions, the ``E_σ`` term over
the exact (condition, sample) pairs, which weights repeated conditions by their count).
Intervals are 95% over ``num_seeds`` independent batches; the uncertainty of an
estimated log Z is not included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmppl.evaluation.bounds import (
    BoundsTable,
    as_exact_samples,
    condition_calls,
    group_by_condition,
)
from lmppl.evaluation.intervals import Interval, mean_interval

__all__ = ["KLEstimates", "kl_estimates"]


class KLEstimates(NamedTuple):
    """Both directions of the KL between a proposal and σ.

    Fields:
      kl_q_sigma: :class:`Interval` of ``KL(q ‖ σ)`` over seeds.
      kl_sigma_q: :class:`Interval` of ``KL(σ ‖ q)`` over seeds.
      log_z: the log Z used (``[C]`` per condition for infilling).
    """

    kl_q_sigma: Interval
    kl_sigma_q: Interval
    log_z: np.ndarray

    def to_markdown(self, method: str = "q", digits: int = 3) -> str:
        return (
            "| proposal | KL(q‖σ) | KL(σ‖q) |\n|---|---:|---:|\n"
            f"| {method} | {self.kl_q_sigma:.{digits}f} | {self.kl_sigma_q:.{digits}f} |\n"
        )


def _log_z_per_condition(log_z: Any, num_conditions: int) -> np.ndarray:
    if isinstance(log_z, BoundsTable):
        if log_z.log_z is not None and num_conditions == 1:
            return np.array([log_z.log_z])
        values = log_z.log_z_by_condition()
    else:
        values = np.asarray(log_z, np.float64).reshape(-1)
        if values.size == 1:
            values = np.repeat(values, num_conditions)
    if values.size != num_conditions:
        raise ValueError(
            f"log_z has {values.size} values but the exact samples have {num_conditions} "
            "conditions (give one per condition, in the order of group_by_condition)"
        )
    return values.astype(np.float64)


def kl_estimates(
    program: Callable,
    backend: Callable[[Callable, int], Any],
    exact_samples: Any,
    log_z: Any,
    rng_key: jax.Array,
    *,
    num_samples: int = 256,
    num_seeds: int = 5,
    args: tuple = (),
    kwargs: dict | None = None,
) -> KLEstimates:
    """``KL(q‖σ)`` and ``KL(σ‖q)`` for the proposal of ``backend(program, 1)``.

    Args:
      program: the NumPyro program.
      backend: ``(program, K) -> sampler`` (called with K = 1).
      exact_samples: :class:`ExactSamples` or ``[M, T]``; they are split into
        ``num_seeds`` disjoint batches for the ``E_σ`` term (M ≥ num_seeds).
      log_z: exact log Z (a float, or ``[C]`` per condition), or a :class:`BoundsTable`
        (midpoint of the tightest pair, per condition).
      rng_key: a JAX key.
      num_samples: draws of q per seed (and per condition) for the ``E_q`` term.
      num_seeds: independent batches the 95% intervals are computed over.
      args, kwargs: the program's arguments (without the condition for infilling).
    """
    kwargs = dict(kwargs or {})
    exact_samples = as_exact_samples(exact_samples)
    if exact_samples.num_samples < num_seeds:
        raise ValueError(
            f"kl_estimates needs at least num_seeds={num_seeds} exact samples, "
            f"got {exact_samples.num_samples}"
        )
    sampler = backend(program, 1)
    calls = list(condition_calls(exact_samples, args, kwargs))
    log_z_values = _log_z_per_condition(log_z, len(calls))
    q_terms = np.zeros((len(calls), num_seeds))
    sigma_terms: list[np.ndarray] = []
    # One reference count for every condition, so the conditional sweep compiles once.
    size = max(len(references) for _, references, _, _ in calls)
    for index, references, call_args, call_kwargs in calls:
        key = jax.random.fold_in(rng_key, index)
        q_key, sigma_key = jax.random.split(key)
        draws = sampler.log_marginals(q_key, num_seeds * num_samples, *call_args, **call_kwargs)
        q_terms[index] = np.asarray(draws, np.float64).reshape(num_seeds, num_samples).mean(1)
        # One particle clamped to the reference: log σ̃(ref) / q(ref), no randomness left.
        padded = jnp.asarray(references[np.arange(size) % len(references)], jnp.int32)
        values = sampler.conditional_log_marginals(sigma_key, padded, *call_args, **call_kwargs)
        values = np.asarray(values, np.float64)[: len(references)]
        sigma_terms.append(values - log_z_values[index])
    kl_q_sigma = mean_interval((log_z_values[:, None] - q_terms).mean(axis=0))
    # Split the samples into seeds in their original (random) order, so each seed spans
    # the conditions; every term already has its condition's log Z subtracted.
    _, group = group_by_condition(exact_samples)
    order = np.argsort(np.argsort(group, kind="stable"), kind="stable")
    flat = np.concatenate(sigma_terms)[order]
    seeds = np.array_split(flat, num_seeds)
    kl_sigma_q = mean_interval([seed.mean() for seed in seeds])
    return KLEstimates(kl_q_sigma, kl_sigma_q, log_z_values)
