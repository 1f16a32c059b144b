"""Means with 95% intervals over independent runs (Student t), shared by bounds and KL."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Interval", "mean_interval"]


class Interval(NamedTuple):
    """A Monte Carlo mean with its 95% confidence interval.

    Fields:
      mean: the sample mean of ``values``.
      low, high: ``mean ∓ t_{0.975, n−1} · s / √n`` (equal to ``mean`` when n = 1, the
        values are constant, or a value is infinite).
      values: ``[n]`` the per-run values the interval is computed from.
    """

    mean: float
    low: float
    high: float
    values: np.ndarray

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def standard_error(self) -> float:
        values = self.values
        if values.size < 2 or not np.all(np.isfinite(values)):
            return float("nan")
        return float(values.std(ddof=1) / np.sqrt(values.size))

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        return f"{self.mean:{spec}} ± {self.half_width:{spec}}"


def mean_interval(values) -> Interval:
    """:class:`Interval` of the mean of ``values`` ``[n]`` (float64)."""
    from scipy import stats

    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = float(values.mean())
    if not np.all(np.isfinite(values)):
        # A run with log Ẑ = -inf (every weight zero) makes the expectation -inf.
        return Interval(mean, mean, mean, values)
    if values.size == 1:
        return Interval(mean, mean, mean, values)
    error = values.std(ddof=1) / np.sqrt(values.size)
    half = float(stats.t.ppf(0.975, values.size - 1) * error)
    return Interval(mean, mean - half, mean + half, values)
