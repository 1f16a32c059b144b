"""Bidirectional log Z bounds of a twist while it trains (``fit(eval_every=...)``).

A twist's training metrics (loss, SIS ESS, SIS log Ẑ) can all look converged while the
twisted proposal misses a mode of σ: the ESS is computed on the draws the proposal makes,
so it cannot see what the proposal never draws. The bidirectional bounds can (Zhao et al.
2024, Sec. 5): with K particles of twisted SMC,

    lower = E[log Ẑ_K] ≤ log Z ≤ E[log Ẑ_K^{cond}] = upper,

the upper one from conditional SMC whose clamped particle is an exact sample of σ. A
missed mode shows as a gap: exact samples from it enter the conditional sweep with a
large weight. :class:`BoundsMonitor` computes both (the upper one only with exact
samples) with one compiled twisted-SMC sweep per kind, reused at every evaluation (the
twist's parameters are arguments of the compiled sweep).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmppl.infer.backends import TwistedSMC

__all__ = ["BoundsMonitor", "TwistGapWarning"]


class TwistGapWarning(RuntimeWarning):
    """The trained twist's bidirectional bounds on log Z stay far apart."""


def _mean_and_error(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    mean = float(np.mean(values))
    error = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.inf
    return mean, error


class BoundsMonitor:
    """``monitor(twist, rng_key) -> {"lower", "upper", "gap", ...}`` for one program.

    Args:
      program: the NumPyro program the twist is trained for.
      site: the name of its latent LM site.
      args, kwargs: the program's arguments.
      exact_samples: ``[M, T]`` exact samples of σ for these arguments (or an object with
        a ``samples`` attribute, e.g. :class:`lmppl.evaluation.ExactSamples` without
        conditions); None: lower bound only.
      num_particles: K of the twisted SMC sweeps.
      num_runs: independent runs averaged per bound (the upper runs cycle through the
        exact samples).
      twist_condition: as for :class:`~lmppl.infer.TwistedSMC`.

    The returned dict has ``lower`` and ``upper`` (mean log Ẑ of the runs; ``upper`` is NaN
    without exact samples), ``gap = upper − lower``, ``lower_error`` / ``upper_error``
    (standard errors of the means over the runs).
    """

    def __init__(
        self,
        program: Callable,
        site: str,
        *,
        args: tuple = (),
        kwargs: dict | None = None,
        exact_samples: Any = None,
        num_particles: int = 256,
        num_runs: int = 8,
        twist_condition: Callable[..., Any] | None = None,
    ):
        if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 2:
            raise ValueError(f"num_runs must be an integer >= 2, got {num_runs!r}")
        self.program = program
        self.site = site
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.num_particles = num_particles
        self.num_runs = num_runs
        self.twist_condition = twist_condition
        self.references = None
        if exact_samples is not None:
            if getattr(exact_samples, "conditions", None) is not None:
                raise ValueError(
                    "BoundsMonitor takes exact samples for the program's own arguments; these "
                    "have one condition each (joint sampling): pass the samples of one condition"
                )
            samples = np.asarray(getattr(exact_samples, "samples", exact_samples))
            if samples.ndim != 2 or len(samples) == 0:
                raise ValueError(f"exact_samples must be [M, T] token ids, got {samples.shape}")
            self.references = jnp.asarray(samples[np.arange(num_runs) % len(samples)], jnp.int32)
        self._sampler: TwistedSMC | None = None

    def _sampler_for(self, twist: Any) -> TwistedSMC:
        if self._sampler is None:
            self._sampler = TwistedSMC(
                self.program,
                self.num_particles,
                twists={self.site: twist},
                twist_condition=self.twist_condition,
            )
        else:  # same structure and shapes: the compiled sweeps are reused
            self._sampler.twists = {self.site: twist}
        return self._sampler

    def __call__(self, twist: Any, rng_key: jax.Array) -> dict[str, float]:
        sampler = self._sampler_for(twist)
        lower_key, upper_key = jax.random.split(rng_key)
        lower = np.asarray(
            sampler.log_marginals(lower_key, self.num_runs, *self.args, **self.kwargs)
        )
        lower_mean, lower_error = _mean_and_error(lower)
        upper_mean = upper_error = math.nan
        if self.references is not None:
            upper = np.asarray(
                sampler.conditional_log_marginals(
                    upper_key, self.references, *self.args, **self.kwargs
                )
            )
            upper_mean, upper_error = _mean_and_error(upper)
        return {
            "lower": lower_mean,
            "lower_error": lower_error,
            "upper": upper_mean,
            "upper_error": upper_error,
            "gap": upper_mean - lower_mean,
        }
