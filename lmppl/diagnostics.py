"""ArviZ views of inference results."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = ["result_to_arviz"]


def _import_arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def result_to_arviz(result: Any):
    """Convert an :class:`~lmppl.infer.InferenceResult` into ``arviz.InferenceData``."""
    az = _import_arviz()
    import xarray as xr

    posterior = {name: np.asarray(value)[None] for name, value in result.samples.items()}
    posterior["log_potential"] = np.asarray(result.log_potential)[None]
    sample_stats = {
        "log_weight": np.asarray(result.log_weights)[None],
        "weight": np.asarray(result.weights)[None],
    }
    dims = {result.site: ["position"]}
    idata = az.from_dict(posterior=posterior, sample_stats=sample_stats, dims=dims)
    smc = {"log_marginal": (("chain",), np.asarray(result.log_marginal).reshape(1))}
    if result.ess is not None:
        smc["ess"] = (("chain", "step"), np.asarray(result.ess)[None])
    if result.resampled is not None:
        smc["resampled"] = (("chain", "resampling_step"), np.asarray(result.resampled)[None])
    idata.add_groups({"smc": xr.Dataset(smc)})
    attrs = {
        "backend": result.backend,
        "site": result.site,
        "model": result.model_name,
        "num_particles": result.num_particles,
    }
    for group in idata.groups():
        idata[group].attrs.update(attrs)
    return idata
