"""One call that says whether a sampler's answer for a program can be trusted.

``diagnose(program, sampler, rng_key, exact=...)`` runs the sampler (K particles, as
built) ``num_runs`` times for the lower bound ``E[log Ẑ_K] ≤ log Z`` and, with exact
samples of σ, conditionally on them for the upper bound ``E[log Ẑ_K^{cond}] ≥ log Z``
(Zhao et al. 2024, Sec. 5). On the space of everything the sampler draws, the gap is a
sum of two divergences,

    upper − lower = KL(σ̄ ‖ q̄) + KL(q̄ ‖ σ̄)   (≥ 0, zero iff the sampler is exact),

with q̄ the sampler's law and σ̄ the extended target, so a gap of g nats bounds the bias
of its ``log Ẑ`` by g and says how far its particles are from σ. A small spread of log Ẑ
over runs proves nothing about bias (a sampler that misses a mode of σ is precise and
wrong); without exact samples only the lower bound is known and the verdict says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from lmppl.evaluation.bounds import as_exact_samples
from lmppl.evaluation.intervals import Interval, mean_interval

__all__ = ["Diagnosis", "diagnose"]


class Diagnosis(NamedTuple):
    """What :func:`diagnose` measured, and its verdict.

    Fields:
      sampler: the sampler's name; num_particles: its K.
      lower: :class:`Interval` of log Ẑ over the runs (its mean is a lower bound).
      upper: :class:`Interval` of conditional log Ẑ (None without exact samples).
      gap: ``upper.mean − lower.mean`` (NaN without exact samples).
      ess: mean final ESS / K of the sampler over ``num_runs`` runs.
      trusted: True (bounds within ``tolerance``), False (apart), None (unverified).
      verdict: one plain-language paragraph.
    """

    sampler: str
    num_particles: int
    lower: Interval
    upper: Interval | None
    gap: float
    ess: float
    trusted: bool | None
    verdict: str

    def __str__(self) -> str:
        lines = [
            f"{self.sampler}, K = {self.num_particles}",
            f"  lower bound E[log Ẑ]       {self.lower.mean:.4f}  (95% CI ±{self.lower.half_width:.4f})",
        ]
        if self.upper is not None:
            lines += [
                f"  upper bound E[log Ẑ_cond]  {self.upper.mean:.4f}  (95% CI ±{self.upper.half_width:.4f})",
                f"  gap                        {self.gap:.4f} nats",
            ]
        lines += [f"  final ESS / K              {self.ess:.3f}", f"  verdict: {self.verdict}"]
        return "\n".join(lines)


def diagnose(
    program: Callable,
    sampler: Any,
    rng_key: jax.Array,
    *args,
    exact: Any = None,
    num_runs: int = 16,
    tolerance: float = 0.2,
    **kwargs,
) -> Diagnosis:
    """Bounds, gap, ESS and a verdict for ``sampler`` on ``program(*args, **kwargs)``.

    Args:
      program: the NumPyro program (used for naming only; the sampler holds it).
      sampler: an lmppl backend built for ``program`` (``SMC``, ``ImportanceSampling``,
        ``TwistedSMC``, ...), with the K it will be used at.
      rng_key: a JAX key.
      *args, **kwargs: the program's arguments.
      exact: exact samples of σ for these arguments (:class:`ExactSamples` without
        conditions, or ``[M, T]`` token ids); None: lower bound only (unverified).
      num_runs: runs per bound (the upper runs cycle through the exact samples).
      tolerance: the gap (nats) under which the answer is called trustworthy.
    """
    if getattr(sampler, "program", program) is not program:
        raise ValueError("the sampler was built for another program")
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 2:
        raise ValueError(f"num_runs must be an integer >= 2, got {num_runs!r}")
    lower_key, upper_key, run_key = jax.random.split(rng_key, 3)
    name = getattr(sampler, "name", type(sampler).__name__)
    num_particles = int(sampler.num_particles)
    lower = mean_interval(np.asarray(sampler.log_marginals(lower_key, num_runs, *args, **kwargs)))
    ess = float(
        np.mean(
            [
                float(sampler.run(key, *args, **kwargs).effective_sample_size) / num_particles
                for key in jax.random.split(run_key, min(num_runs, 4))
            ]
        )
    )
    upper = None
    gap = math.nan
    if exact is not None:
        exact = as_exact_samples(exact)
        if exact.conditions is not None:
            raise ValueError(
                "diagnose takes exact samples of σ for the given arguments; these carry one "
                "condition each (joint sampling): use lmppl.evaluation.log_z_bounds"
            )
        references = exact.samples[np.arange(num_runs) % exact.num_samples]
        upper = mean_interval(
            np.asarray(sampler.conditional_log_marginals(upper_key, references, *args, **kwargs))
        )
        gap = upper.mean - lower.mean
    trusted, verdict = _verdict(lower, upper, gap, tolerance, num_particles)
    return Diagnosis(name, num_particles, lower, upper, gap, ess, trusted, verdict)


def _verdict(lower, upper, gap, tolerance, k) -> tuple[bool | None, str]:
    if not math.isfinite(lower.mean):
        return False, (
            f"not trustworthy: log Ẑ is {lower.mean} in some run (every particle got weight "
            "zero); use more particles or a proposal that reaches the support of σ."
        )
    if upper is None:
        return None, (
            f"unverified: log Z ≥ {lower.mean:.3f} (in expectation) is all that is known. "
            f"The spread over runs (sd {np.std(lower.values):.3f}) says nothing about bias: "
            "pass exact samples of σ (rejection, joint or enumeration samplers of "
            "lmppl.evaluation) to bound log Z from above."
        )
    if not math.isfinite(upper.mean):
        return False, "not trustworthy: the conditional (upper) runs are not finite."
    if abs(gap) <= tolerance:
        return True, (
            f"trustworthy at K={k}: log Z ∈ [{lower.mean:.3f}, {upper.mean:.3f}] "
            f"(gap {gap:.3f} ≤ {tolerance} nats), so the estimate's bias is at most {max(gap, 0):.3f} "
            "nats and the sampler is close to σ."
        )
    return False, (
        f"NOT trustworthy at K={k}: the bounds are {gap:.3f} nats apart (log Z ∈ "
        f"[{lower.mean:.3f}, {upper.mean:.3f}]). Its log Ẑ can be biased by that much and its "
        "particles miss part of σ (exact samples reach regions the sampler rarely proposes). "
        "Use more particles, a better (re)trained twist, or report the interval, not Ẑ."
    )
