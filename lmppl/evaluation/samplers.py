"""Exact samples of a target σ(s) = p0(s) φ(s) / Z, the references of the upper bounds.

Three samplers, each exact for its kind of target:

* :func:`rejection_sample` — draw s ~ q (the importance-sampling proposal: p0, with any
  per-step constraints folded in) and keep it with probability ``w(s) / M`` where
  ``w = σ̃ / q`` and ``M = exp(log_envelope)`` bounds ``w``. For a classifier target
  ``φ(s) = p(c | s)`` (``M = 1``) this is exactly "draw a label c ~ p(c | s) and keep s
  if c is the target class"; for a threshold ``φ = 1[score < limit]`` it keeps the
  sequences that pass. The acceptance rate estimates ``Z / M``.
* :func:`joint_sample` — infilling: sample the latent sequence and the observed
  continuation together from p0 (the observed argument set to None). The latent part is
  an exact sample of σ given that continuation, which becomes the sample's condition.
* :func:`enumeration_sample` — tiny models: σ from :class:`lmppl.infer.Exact`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = [
    "ExactSamples",
    "RejectionBudgetExhausted",
    "enumeration_sample",
    "joint_sample",
    "rejection_sample",
]


class RejectionBudgetExhausted(RuntimeError):
    """The rejection sampler drew ``max_draws`` sequences without enough acceptances."""


class ExactSamples(NamedTuple):
    """Exact draws from σ (or from σ given a condition, for infilling).

    Fields:
      samples: ``[M, T]`` int32 token ids of the LM site.
      site: the LM site's name.
      conditions: ``[M, ...]`` the condition of each sample (the observed continuation it
        was drawn with), or None when the target has no varying condition.
      condition_argument: where the condition goes in the program's arguments: a
        positional index (int) or a keyword name (str); None without conditions.
      num_draws: proposals drawn (rejection) or sequences sampled.
      acceptance_rate: ``accepted / num_draws`` (1 for joint sampling and enumeration).
    """

    samples: np.ndarray
    site: str
    conditions: np.ndarray | None = None
    condition_argument: int | str | None = None
    num_draws: int = 0
    acceptance_rate: float = 1.0

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def rejection_sample(
    program: Callable,
    rng_key: jax.Array,
    num_samples: int,
    *args,
    batch_size: int = 256,
    max_draws: int = 1_000_000,
    log_envelope: float = 0.0,
    allow_fewer: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **kwargs,
) -> ExactSamples:
    """Exact samples of σ by rejection from the importance-sampling proposal.

    Batches of ``batch_size`` sequences come from
    ``lmppl.infer.ImportanceSampling(program, batch_size).run(...)``: its particles are
    draws of q (p0 when the program has no per-step constraints) and its log-weights are
    ``log w = log σ̃(s) / q(s)`` (= log φ(s) for q = p0). A draw is accepted with
    probability ``exp(log w − log_envelope)``, so accepted draws are exactly σ-distributed
    whenever ``w ≤ exp(log_envelope)`` everywhere, and ``P(accept) = Z / exp(log_envelope)``.

    Args:
      program: the NumPyro program (one latent ``lmppl.LM`` site).
      rng_key: a JAX key.
      num_samples: M, the number of exact samples wanted.
      *args, **kwargs: the program's arguments.
      batch_size: proposals drawn per compiled sweep.
      max_draws: the budget; when it is spent first, :class:`RejectionBudgetExhausted`
        is raised (or, with ``allow_fewer``, the accepted samples are returned with a
        warning).
      log_envelope: ``log M`` with ``log w ≤ log M`` for every sequence (0 for
        probabilities and indicators); a draw with ``log w > log M`` is an error.
      progress: optional ``callback(accepted, drawn)`` after each batch.

    Returns:
      :class:`ExactSamples` with ``samples [M, T]`` and the acceptance rate.
    """
    from lmppl.infer import ImportanceSampling

    num_samples = _check_count("num_samples", num_samples)
    batch_size = _check_count("batch_size", batch_size)
    max_draws = _check_count("max_draws", max_draws)
    sampler = ImportanceSampling(program, batch_size)
    accepted: list[np.ndarray] = []
    num_accepted = drawn = 0
    site = None
    batch = 0
    while num_accepted < num_samples and drawn < max_draws:
        draw_key, accept_key = jax.random.split(jax.random.fold_in(rng_key, batch))
        batch += 1
        result = sampler.run(draw_key, *args, **kwargs)
        site = result.site
        log_w = np.asarray(result.log_weights, np.float64) - log_envelope
        if np.any(log_w > 1e-5):
            worst = float(np.max(log_w)) + log_envelope
            raise ValueError(
                f"rejection sampling needs log φ ≤ log_envelope={log_envelope}, but a draw has "
                f"log φ = {worst:.4g}; pass log_envelope ≥ max log φ"
            )
        uniform = np.asarray(jax.random.uniform(accept_key, (batch_size,)), np.float64)
        keep = np.log(uniform) < np.minimum(log_w, 0.0)
        take = min(batch_size, max_draws - drawn)
        keep[take:] = False
        drawn += take
        tokens = np.asarray(result.samples[site])[keep]
        accepted.append(tokens)
        num_accepted += len(tokens)
        if progress is not None:
            progress(num_accepted, drawn)
    samples = np.concatenate(accepted)[:num_samples].astype(np.int32)
    rate = num_accepted / drawn
    if len(samples) < num_samples:
        expected = "∞" if rate == 0 else f"about {math.ceil(num_samples / rate):,}"
        message = (
            f"rejection sampling spent its budget of max_draws={max_draws:,} draws with "
            f"{len(samples)} of {num_samples} samples accepted (acceptance rate {rate:.3g}); "
            f"{expected} draws are needed"
        )
        if not allow_fewer:
            raise RejectionBudgetExhausted(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return ExactSamples(samples=samples, site=site, num_draws=drawn, acceptance_rate=rate)


def _with_condition(args: tuple, kwargs: dict, where: int | str, value: Any):
    if isinstance(where, str):
        return args, {**kwargs, where: value}
    if not 0 <= where <= len(args):
        raise ValueError(
            f"condition_argument={where} is not a position in the {len(args)} arguments"
        )
    return (*args[:where], value, *args[where:]), kwargs


def joint_sample(
    program: Callable,
    rng_key: jax.Array,
    num_samples: int,
    *args,
    observed: str,
    condition_argument: int | str = 0,
    **kwargs,
) -> ExactSamples:
    """Infilling: ``(condition, sample)`` pairs with the sample exact for σ(· | condition).

    The program is run forward with ``None`` in place of the observed argument
    (``numpyro.infer.Predictive``), so the latent sequence s and the continuation y are
    drawn together from ``p0(s) p0(y | s)``. Given y, s is distributed as
    ``p0(s) p0(y | s) / p0(y) = σ(s | y)``: an exact target sample for the program
    observed at y.

    Args:
      program: the NumPyro program; its observed site ``observed`` reads the condition.
      rng_key: a JAX key.
      num_samples: M pairs.
      *args, **kwargs: the program's other arguments (without the condition).
      observed: the name of the observed site (e.g. ``"ending"``).
      condition_argument: where the condition goes in the arguments: a position among
        ``args`` (default 0) or a keyword name.

    Returns:
      :class:`ExactSamples` with ``samples [M, T]`` and ``conditions [M, ...]``.
    """
    from numpyro.infer import Predictive

    from lmppl.infer import discover

    num_samples = _check_count("num_samples", num_samples)
    call_args, call_kwargs = _with_condition(args, kwargs, condition_argument, None)
    draws = Predictive(program, num_samples=num_samples, parallel=True)(
        rng_key, *call_args, **call_kwargs
    )
    if observed not in draws:
        raise ValueError(
            f"the program has no site {observed!r} sampled when its condition is None "
            f"(sites: {sorted(draws)})"
        )
    conditions = np.asarray(draws[observed])
    structure = discover(program, *_with_condition(args, kwargs, condition_argument, conditions[0]))
    structure.refuse_several_sites("exact samples of a program")
    site = structure.lm_site.name
    return ExactSamples(
        samples=np.asarray(draws[site], np.int32),
        site=site,
        conditions=conditions,
        condition_argument=condition_argument,
        num_draws=num_samples,
    )


def enumeration_sample(
    program: Callable, rng_key: jax.Array, num_samples: int, *args, **kwargs
) -> ExactSamples:
    """Exact samples of σ by enumerating every sequence (:class:`lmppl.infer.Exact`)."""
    from lmppl.infer import Exact

    num_samples = _check_count("num_samples", num_samples)
    exact = Exact(program).run(rng_key, *args, **kwargs)
    index = jax.random.categorical(rng_key, exact.log_weights, shape=(num_samples,))
    samples = np.asarray(exact.samples[exact.site])[np.asarray(index)]
    return ExactSamples(samples=samples.astype(np.int32), site=exact.site, num_draws=num_samples)
