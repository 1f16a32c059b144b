"""Matplotlib figures for inference diagnostics, saved to PNG without pyplot state.

* :func:`plot_bounds` — lower and upper log Z bounds against K (log axis) for several
  methods on one axis, with shaded 95% intervals (the paper's toxicity figure).
* :func:`plot_ess` — ESS over decoding steps, one line per run.
* :func:`plot_weights` — histogram of normalised particle weights (log10 scale).

Each takes an optional ``ax`` and ``path``; it returns the figure (saved to ``path``).
Figures are built with ``matplotlib.figure.Figure`` (no GUI backend needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["plot_bounds", "plot_ess", "plot_weights"]


def _axes(ax: Any, size: tuple[float, float] = (6.0, 4.0)):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    return figure, figure.add_subplot()


def _finish(figure: Any, path: Any):
    if path is not None:
        figure.savefig(path, dpi=150)
    return figure


def plot_bounds(
    table: Any,
    *,
    ax: Any = None,
    path: Any = None,
    title: str | None = None,
    log_z: float | None = None,
):
    """Lower (solid) and upper (dashed) bounds on log Z against K, one colour per method.

    Args:
      table: a :class:`lmppl.evaluation.BoundsTable` (several methods may be combined
        with ``+``).
      log_z: a reference line (default: the table's exact log Z, if known).
    """
    figure, ax = _axes(ax)
    for index, method in enumerate(table.methods):
        rows = sorted(table.method(method), key=lambda row: row.num_particles)
        k = np.array([row.num_particles for row in rows])
        colour = f"C{index % 10}"
        for side, style in (("lower", "-"), ("upper", "--")):
            mean = np.array([getattr(row, side).mean for row in rows])
            low = np.array([getattr(row, side).low for row in rows])
            high = np.array([getattr(row, side).high for row in rows])
            ax.plot(k, mean, style, marker="o", color=colour, label=f"{method} {side}")
            ax.fill_between(k, low, high, color=colour, alpha=0.2, linewidth=0)
    reference = log_z if log_z is not None else table.log_z
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8, label="log Z")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of particles K")
    ax.set_ylabel("log Z bound")
    ax.set_title(title or "Bidirectional bounds on log Z")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _finish(figure, path)


def plot_ess(results: Sequence[Any] | Any, *, ax: Any = None, path: Any = None):
    """ESS before each decoding step's resampling (and of the final weights), per run.

    Args:
      results: an :class:`~lmppl.infer.InferenceResult`, a list of them, or an
        ``InferenceData`` from :mod:`lmppl.diagnostics` (its ``sample_stats.ess``).
    """
    if hasattr(results, "sample_stats"):
        ess = np.asarray(results.sample_stats["ess"])
        num_particles = int(results.sample_stats.attrs.get("num_particles", ess.max()))
    else:
        results = list(results) if isinstance(results, list | tuple) else [results]
        if any(result.ess is None for result in results):
            raise ValueError("plot_ess needs results of a particle backend (Exact has no ESS)")
        ess = np.stack([np.asarray(result.ess) for result in results])
        num_particles = results[0].num_particles
    figure, ax = _axes(ax)
    steps = np.arange(ess.shape[1])
    for run, values in enumerate(ess):
        ax.plot(steps, values, marker=".", alpha=0.8, label=f"run {run}" if run < 8 else None)
    ax.axhline(num_particles, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, num_particles * 1.05)
    ax.set_xlabel("decoding step (last: final weights)")
    ax.set_ylabel("effective sample size")
    ax.set_title(f"ESS over decoding steps (N = {num_particles})")
    if len(ess) <= 8:
        ax.legend(fontsize="small")
    return _finish(figure, path)


def plot_weights(result: Any, *, ax: Any = None, path: Any = None, bins: int = 40):
    """Histogram of the normalised weights ``log10 w_i`` of one result's particles."""
    weights = np.asarray(result.weights, np.float64)
    figure, ax = _axes(ax)
    positive = weights[weights > 0]
    if positive.size == 0:
        raise ValueError("every particle has weight zero: nothing to plot")
    ax.hist(np.log10(positive), bins=bins, color="tab:blue", alpha=0.8)
    ax.axvline(-np.log10(weights.size), color="black", linewidth=0.8, label="uniform 1/N")
    zero = weights.size - positive.size
    ax.set_xlabel("log10 normalised weight")
    ax.set_ylabel("particles")
    ax.set_title(
        f"{result.backend}: ESS {result.effective_sample_size:.1f} of {weights.size}"
        + (f", {zero} zero weights" if zero else "")
    )
    ax.legend(fontsize="small")
    return _finish(figure, path)
