"""Bidirectional bounds on log Z from any lmppl backend (Zhao et al. 2024, Sec. 5).

For a backend with K particles (SIS, SMC, twisted SMC), ``Ẑ`` is unbiased, so

    lower(K) = E[log Ẑ_K] ≤ log Z                         (``log_marginals``)
    upper(K) = E[log Ẑ_K^{cond}] ≥ log Z                   (``conditional_log_marginals``)

where the conditional sweep clamps one particle to an exact sample of σ through every
step and resamples the other K − 1. Without resampling these are the IWAE lower and
upper bounds; both tighten as K grows. For infilling (σ given a condition y that varies
with the exact sample) the bounds are taken per condition and averaged over conditions,
bounding ``mean_y log Z_y``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmppl.evaluation.intervals import Interval, mean_interval
from lmppl.evaluation.samplers import ExactSamples, _with_condition

__all__ = ["BoundsRow", "BoundsTable", "group_by_condition", "log_z_bounds"]


class BoundsRow(NamedTuple):
    """Bounds of one method at one K.

    Fields:
      method: the method's name (e.g. ``"SMC"``).
      num_particles: K.
      lower, upper: :class:`Interval` over runs of the (condition-averaged) log Ẑ.
      lower_by_condition, upper_by_condition: ``[C]`` per-condition means (C = 1 without
        conditions).
    """

    method: str
    num_particles: int
    lower: Interval
    upper: Interval
    lower_by_condition: np.ndarray
    upper_by_condition: np.ndarray

    @property
    def gap(self) -> float:
        return self.upper.mean - self.lower.mean


@dataclasses.dataclass
class BoundsTable:
    """Lower and upper bounds on log Z per method and K.

    Attributes:
      rows: the :class:`BoundsRow` s, in the order they were computed.
      conditions: ``[C, ...]`` the distinct conditions the bounds average over (None
        without conditions).
      log_z: the exact log Z when known (else None).
    """

    rows: list[BoundsRow]
    conditions: np.ndarray | None = None
    log_z: float | None = None

    def __add__(self, other: BoundsTable) -> BoundsTable:
        if (self.conditions is None) != (other.conditions is None) or (
            self.conditions is not None and not np.array_equal(self.conditions, other.conditions)
        ):
            raise ValueError("bounds tables over different conditions cannot be combined")
        log_z = self.log_z if self.log_z is not None else other.log_z
        return BoundsTable([*self.rows, *other.rows], self.conditions, log_z)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(row.method for row in self.rows))

    def method(self, name: str) -> list[BoundsRow]:
        rows = [row for row in self.rows if row.method == name]
        if not rows:
            raise KeyError(f"no method {name!r}; methods: {self.methods}")
        return rows

    def tightest(self) -> BoundsRow:
        """The row whose mean upper and lower bounds are closest (smallest ``|gap|``: with
        few runs a converged pair can cross by Monte Carlo error)."""
        finite = [row for row in self.rows if np.isfinite(row.gap)]
        if not finite:
            raise ValueError("no row has finite lower and upper bounds")
        return min(finite, key=lambda row: abs(row.gap))

    def log_z_estimate(self) -> float:
        """log Z exactly when known, else the midpoint of the tightest lower/upper pair."""
        if self.log_z is not None:
            return float(self.log_z)
        row = self.tightest()
        return (row.lower.mean + row.upper.mean) / 2

    def log_z_by_condition(self) -> np.ndarray:
        """``[C]`` per-condition midpoints of each condition's tightest pair."""
        lower = np.stack([row.lower_by_condition for row in self.rows])
        upper = np.stack([row.upper_by_condition for row in self.rows])
        with np.errstate(invalid="ignore"):
            gap = np.where(np.isfinite(upper - lower), np.abs(upper - lower), np.inf)
        best = np.argmin(gap, axis=0)
        columns = np.arange(lower.shape[1])
        return (lower[best, columns] + upper[best, columns]) / 2

    def records(self) -> list[dict[str, Any]]:
        return [
            {
                "method": row.method,
                "K": row.num_particles,
                "lower": row.lower.mean,
                "lower_low": row.lower.low,
                "lower_high": row.lower.high,
                "upper": row.upper.mean,
                "upper_low": row.upper.low,
                "upper_high": row.upper.high,
                "gap": row.gap,
                "runs": row.lower.values.size,
            }
            for row in self.rows
        ]

    def problems(self, reference: tuple[float, float] | None = None) -> list[str]:
        """Plain-language lines for rows whose numbers cannot be read as bounds.

        * **crossed**: the upper bound's interval lies below the lower bound's: at this K
          neither is a bound to trust (too few runs, or exact samples that are not exact);
        * **degenerate**: every run gave the same value (a ``± 0`` interval says nothing
          about the error), or a bound is infinite (no particle reached the target);
        * with ``reference = (log Z estimate, standard error)`` from an independent
          estimator (e.g. rejection's acceptance rate), a lower bound more than 3 standard
          errors above it or an upper bound more than 3 below it.
        """
        lines = []
        for row in self.rows:
            where = f"{row.method} K={row.num_particles}"
            lower, upper = row.lower, row.upper
            if np.isfinite([lower.mean, upper.mean]).all() and upper.high < lower.low:
                lines.append(
                    f"{where}: the bounds cross (upper {upper.mean:.3f} < lower "
                    f"{lower.mean:.3f} beyond their intervals): trust neither at this K"
                )
            for side, interval in (("lower", lower), ("upper", upper)):
                values = interval.values
                if not np.isfinite(interval.mean):
                    lines.append(
                        f"{where}: the {side} bound is {interval.mean} (no particle reached the "
                        "target in some run): raise K"
                    )
                elif values.size > 1 and np.ptp(values) == 0:
                    lines.append(
                        f"{where}: every run gave the same {side} bound {interval.mean:.3f}; "
                        "its ± 0 says nothing about the error"
                    )
            if reference is not None and np.isfinite(reference[0]):
                estimate, error = reference
                margin = 3 * error
                if lower.low > estimate + margin:
                    lines.append(
                        f"{where}: the lower bound {lower.mean:.3f} is above the independent "
                        f"estimate {estimate:.3f} ± {error:.3f}: the sampler is not exact"
                    )
                if np.isfinite(upper.high) and upper.high < estimate - margin:
                    lines.append(
                        f"{where}: the upper bound {upper.mean:.3f} is below the independent "
                        f"estimate {estimate:.3f} ± {error:.3f}: the exact samples or the "
                        "sampler are not exact"
                    )
        return lines

    def to_csv(self, path: Any = None) -> str:
        """The table as CSV (written to ``path`` if given)."""
        buffer = io.StringIO()
        records = self.records()
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        text = buffer.getvalue()
        if path is not None:
            with open(path, "w") as handle:
                handle.write(text)
        return text

    def to_markdown(self, digits: int = 3) -> str:
        """A Markdown table: method, K, lower and upper bound (mean ± 95% half-width), gap."""
        lines = [
            "| method | K | lower bound | upper bound | gap | runs |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in self.rows:
            lines.append(
                f"| {row.method} | {row.num_particles} | {row.lower:.{digits}f} | "
                f"{row.upper:.{digits}f} | {row.gap:.{digits}f} | {row.lower.values.size} |"
            )
        if self.log_z is not None:
            lines.append(f"\nexact log Z = {self.log_z:.{digits}f}")
        else:
            lines.append(
                f"\nlog Z ≈ {self.log_z_estimate():.{digits}f} (midpoint of tightest pair)"
            )
        return "\n".join(lines) + "\n"


def group_by_condition(exact_samples: ExactSamples) -> tuple[np.ndarray | None, np.ndarray]:
    """``(conditions [C, ...] | None, group [M])``: the distinct conditions (sorted) and
    each sample's index into them (all 0 without conditions)."""
    if exact_samples.conditions is None:
        return None, np.zeros(exact_samples.num_samples, np.int64)
    conditions = np.asarray(exact_samples.conditions)
    unique, group = np.unique(conditions.reshape(len(conditions), -1), axis=0, return_inverse=True)
    return unique.reshape((-1, *conditions.shape[1:])), group.reshape(-1)


def as_exact_samples(exact_samples: Any, site: str | None = None) -> ExactSamples:
    if isinstance(exact_samples, ExactSamples):
        return exact_samples
    samples = np.asarray(exact_samples)
    if samples.ndim != 2 or not np.issubdtype(samples.dtype, np.integer):
        raise ValueError(
            f"exact_samples must be ExactSamples or [M, T] token ids, got shape {samples.shape}"
        )
    return ExactSamples(samples=samples.astype(np.int32), site=site or "")


def condition_calls(exact_samples: ExactSamples, args: tuple, kwargs: dict):
    """Yield ``(group index, references [m, T], call args, call kwargs)`` per condition."""
    conditions, group = group_by_condition(exact_samples)
    if conditions is None:
        yield 0, exact_samples.samples, args, kwargs
        return
    for index, condition in enumerate(conditions):
        call_args, call_kwargs = _with_condition(
            args, kwargs, exact_samples.condition_argument, jnp.asarray(condition)
        )
        yield index, exact_samples.samples[group == index], call_args, call_kwargs


def _cycled(references: np.ndarray, count: int) -> jax.Array:
    return jnp.asarray(references[np.arange(count) % len(references)], jnp.int32)


def _samplers(
    program: Callable,
    backend: Callable[[Callable, int], Any],
    num_particles: list[int],
    padded: bool,
) -> list[Any]:
    """One sampler per K: ``backend(program, K)``, or, when the sampler of the largest K
    pads every other (:meth:`~lmppl.infer.SMC.pads`: same settings, a built-in resampling
    scheme, no word-level steps), that one sampler run with K active particles
    (:meth:`~lmppl.infer.SMC.active_particles`), so that every K shares one compilation."""
    built = {k: backend(program, k) for k in dict.fromkeys(num_particles)}
    largest = built[max(built)]
    pads = getattr(largest, "pads", None)
    if not padded or len(built) == 1 or pads is None or not all(map(pads, built.values())):
        return [built[k] for k in num_particles]
    return [largest.active_particles(k) for k in num_particles]


def log_z_bounds(
    program: Callable,
    backend: Callable[[Callable, int], Any],
    exact_samples: Any,
    num_particles: Sequence[int],
    num_runs: int,
    rng_key: jax.Array,
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    name: str | None = None,
    log_z: float | None = None,
    progress: bool = False,
    padded: bool = True,
) -> BoundsTable:
    """Lower and upper bounds on log Z for each K, with 95% intervals over runs.

    For each K, ``sampler = backend(program, K)`` gives ``num_runs`` independent lower
    estimates ``sampler.log_marginals`` and ``num_runs`` conditional (upper) estimates
    ``sampler.conditional_log_marginals`` whose references are the exact samples (run r
    uses sample ``r mod M``; each is still exactly σ-distributed, so the upper bound holds
    with fewer samples than runs, at the cost of correlated runs).

    One compilation for every K: when ``backend(program, K_max)`` runs the other K on its
    own sweep (an lmppl backend with a built-in resampling scheme and no word-level steps,
    built with the same settings for every K), each K runs as that sampler with its first
    K particles active and the other ``K_max − K`` masked (log-weight −inf, never
    resampled; ``ESS < threshold · K``; ``log Ẑ`` increments ``logsumexp_{i<K} log W^i −
    log K``): the law of each estimate is the K-particle sampler's (with JAX's default
    partitionable Threefry and no residual resampling, even the numbers of
    ``backend(program, K)`` for the same key; see :mod:`lmppl.infer.kernel`). Otherwise (or with ``padded=False``) each K
    compiles its own sweep.

    Args:
      program: the NumPyro program.
      backend: ``(program, K) -> sampler``, e.g. ``lmppl.infer.SMC``,
        ``lambda p, k: lmppl.infer.TwistedSMC(p, k, twists={"story": twist})``.
      exact_samples: :class:`ExactSamples` (with conditions for infilling: bounds are
        computed per condition and averaged over conditions run by run) or ``[M, T]``.
      num_particles: the K values.
      num_runs: independent runs per K (and per condition).
      rng_key: a JAX key.
      args, kwargs: the program's arguments (without the condition for infilling).
      name: the method's name in the table (default: the sampler's ``name``).
      log_z: the exact log Z, when known (kept in the table for reference).
      progress: show a tqdm progress bar.
      padded: share one compilation over the K values when the backend allows (above);
        False: one sampler and compilation per K.

    Returns:
      a :class:`BoundsTable`.
    """
    kwargs = dict(kwargs or {})
    exact_samples = as_exact_samples(exact_samples)
    if exact_samples.num_samples == 0:
        raise ValueError("log_z_bounds needs at least one exact sample")
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
        raise ValueError(f"num_runs must be a positive integer, got {num_runs!r}")
    num_particles = [int(k) for k in num_particles]
    if not num_particles or min(num_particles) < 1:
        raise ValueError(f"num_particles must be positive integers, got {num_particles}")
    conditions, _ = group_by_condition(exact_samples)
    calls = list(condition_calls(exact_samples, args, kwargs))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(num_particles) * len(calls), desc=name or "bounds")
    rows = []
    samplers = _samplers(program, backend, num_particles, padded)
    for k_index, (k, sampler) in enumerate(zip(num_particles, samplers, strict=True)):
        label = name or getattr(sampler, "name", type(sampler).__name__)
        lower = np.zeros((len(calls), num_runs))
        upper = np.zeros((len(calls), num_runs))
        for index, references, call_args, call_kwargs in calls:
            key = jax.random.fold_in(jax.random.fold_in(rng_key, k_index), index)
            lower_key, upper_key = jax.random.split(key)
            lower[index] = np.asarray(
                sampler.log_marginals(lower_key, num_runs, *call_args, **call_kwargs)
            )
            upper[index] = np.asarray(
                sampler.conditional_log_marginals(
                    upper_key, _cycled(references, num_runs), *call_args, **call_kwargs
                )
            )
            if bar is not None:
                bar.update()
        rows.append(
            BoundsRow(
                method=label,
                num_particles=k,
                lower=mean_interval(lower.mean(axis=0)),
                upper=mean_interval(upper.mean(axis=0)),
                lower_by_condition=lower.mean(axis=1),
                upper_by_condition=upper.mean(axis=1),
            )
        )
    if bar is not None:
        bar.close()
    return BoundsTable(rows, conditions, log_z)
