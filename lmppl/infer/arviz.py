"""ArviZ views of inference results: weighted particles as draws, independent runs as chains.

``result_to_arviz(result)`` (also ``result.to_arviz()``) and ``runs_to_arviz(results)``
build an ``arviz.InferenceData`` (arviz 0.x; arviz ≥ 1.0 reads the same groups as a
DataTree via ``arviz.from_netcdf``) with

* ``posterior`` ``[chain, draw, ...]``: the LM site's token ids (dim ``position``), the
  other latent and deterministic sites, ``log_potential`` (log φ) and the value of every
  factor / observed site as ``<site>_log_prob``;
* ``sample_stats``: ``log_weight`` and ``weight`` (normalised per chain) ``[chain, draw]``,
  ``log_marginal`` ``[chain]``, ``ess`` ``[chain, step]`` (ESS before each step's
  resampling, then of the final weights) and ``resampled`` ``[chain, resampling_step]``.

Draws are the particles of a run, so posterior expectations are weighted by ``weight``;
``resample_key`` replaces them by equally weighted draws (systematic resampling; the
sample stats then describe each draw's source particle and ``particle`` is its index).
Attributes name the backend, LM site, model and number of particles.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["import_arviz", "result_to_arviz", "run_many", "runs_to_arviz"]


def import_arviz():
    """``arviz``, imported with its ``FutureWarning`` s silenced (pytest turns them into
    errors; they concern ArviZ's own upcoming API, not lmppl's use of it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _particle_table(result: Any, resample_key: Any) -> tuple[dict, dict]:
    """Per-draw ``posterior`` and ``sample_stats`` arrays ``[N, ...]`` of one result."""
    from lmppl.infer.resampling import normalized_weights, systematic

    posterior = {name: np.asarray(value) for name, value in result.samples.items()}
    posterior["log_potential"] = np.asarray(result.log_potential)
    for name, value in result.site_log_probs.items():
        posterior.setdefault(f"{name}_log_prob", np.asarray(value))
    log_weights = np.asarray(result.log_weights)
    stats = {
        "log_weight": log_weights,
        "weight": np.asarray(normalized_weights(result.log_weights)),
    }
    if resample_key is not None:
        index = np.asarray(systematic(resample_key, result.log_weights, result.num_particles))
        posterior = {name: value[index] for name, value in posterior.items()}
        stats = {name: value[index] for name, value in stats.items()}
        stats["particle"] = index
    return posterior, stats


def runs_to_arviz(results: Sequence[Any], *, resample_key: Any = None):
    """``arviz.InferenceData`` with one chain per independent run (see the module doc).

    Args:
      results: :class:`~lmppl.infer.InferenceResult` s of the same program and backend
        (same N and sites), e.g. from :func:`run_many`.
      resample_key: if given, a JAX key: posterior draws are equally weighted
        resamples of each run's particles instead of the weighted particles.
    """
    import jax
    import xarray as xr

    az = import_arviz()
    results = list(results)
    if not results:
        raise ValueError("runs_to_arviz needs at least one result")
    first = results[0]
    for result in results[1:]:
        if (result.site, result.num_particles, result.backend, sorted(result.samples)) != (
            first.site,
            first.num_particles,
            first.backend,
            sorted(first.samples),
        ):
            raise ValueError("runs_to_arviz needs results of one program, backend and N")
    keys = [None] * len(results)
    if resample_key is not None:
        keys = list(jax.random.split(resample_key, len(results)))
    tables = [_particle_table(result, key) for result, key in zip(results, keys, strict=True)]

    def stacked(group: int) -> dict[str, np.ndarray]:
        return {name: np.stack([t[group][name] for t in tables]) for name in tables[0][group]}

    def dataset(values: dict[str, np.ndarray]) -> xr.Dataset:
        variables = {}
        for name, value in values.items():
            extra = [
                "position" if name == first.site and axis == 0 else f"{name}_dim_{axis}"
                for axis in range(value.ndim - 2)
            ]
            variables[name] = (("chain", "draw", *extra), value)
        coords = {"chain": np.arange(len(results)), "draw": np.arange(first.num_particles)}
        return xr.Dataset(variables, coords=coords)

    posterior = dataset(stacked(0))
    sample_stats = dataset(stacked(1))
    sample_stats["log_marginal"] = (
        ("chain",),
        np.array([float(r.log_marginal) for r in results]),
    )
    if all(r.ess is not None for r in results):
        sample_stats["ess"] = (("chain", "step"), np.stack([np.asarray(r.ess) for r in results]))
    if all(r.resampled is not None for r in results):
        sample_stats["resampled"] = (
            ("chain", "resampling_step"),
            np.stack([np.asarray(r.resampled) for r in results]),
        )
    attrs = {
        "backend": first.backend,
        "site": first.site,
        "model": first.model_name,
        "num_particles": first.num_particles,
        "num_runs": len(results),
        "draws": "weighted particles" if resample_key is None else "resampled (equal weights)",
    }
    posterior.attrs.update(attrs)
    sample_stats.attrs.update(attrs)
    return az.InferenceData(posterior=posterior, sample_stats=sample_stats)


def result_to_arviz(result: Any, *, resample_key: Any = None):
    """One result as ``arviz.InferenceData`` with a single chain (see :func:`runs_to_arviz`)."""
    return runs_to_arviz([result], resample_key=resample_key)


def run_many(sampler: Any, rng_key: Any, num_runs: int, *args, **kwargs) -> list:
    """``num_runs`` independent ``sampler.run`` s (keys split from ``rng_key``), for
    :func:`runs_to_arviz`: ``runs_to_arviz(run_many(SMC(program, 64), key, 4, *args))``."""
    import jax

    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
        raise ValueError(f"num_runs must be a positive integer, got {num_runs!r}")
    keys = jax.random.split(rng_key, num_runs)
    return [sampler.run(key, *args, **kwargs) for key in keys]
