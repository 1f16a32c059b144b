"""ArviZ round trip (runs as chains, az.summary, netCDF) and the PNG plots."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

import lmppl
from lmppl import evaluation, plots
from lmppl.diagnostics import run_many, runs_to_arviz
from tests.fixtures import classifier_c as classifier
from tests.fixtures import small_lm

LM = small_lm()

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az


def counted():
    s = numpyro.sample("s", lmppl.LM(LM, "a", 3, stop_at_eos=False))
    num_c = numpyro.deterministic("num_c", jnp.sum(s == 4))
    numpyro.factor("clf", jax.nn.log_sigmoid(1.5 * num_c - 2.0))


def test_runs_as_chains_summary_and_netcdf_round_trip(tmp_path):
    results = run_many(lmppl.infer.SMC(counted, 32, ess_threshold=1.0), jax.random.key(0), 4)
    idata = runs_to_arviz(results)
    assert idata.posterior["s"].dims == ("chain", "draw", "position")
    assert idata.posterior["num_c"].shape == (4, 32)
    assert idata.sample_stats["ess"].shape == (4, 4)
    assert idata.sample_stats["resampled"].shape == (4, 3)
    np.testing.assert_allclose(idata.sample_stats["weight"].sum("draw"), 1.0, rtol=1e-5)
    summary = az.summary(idata, var_names=["num_c", "clf_log_prob"], kind="stats")
    assert list(summary.index) == ["num_c", "clf_log_prob"]
    assert az.ess(idata, var_names=["num_c"])["num_c"] > 0
    path = tmp_path / "smc.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    np.testing.assert_array_equal(back.posterior["s"], idata.posterior["s"])
    np.testing.assert_allclose(
        back.sample_stats["log_marginal"], idata.sample_stats["log_marginal"]
    )
    assert (
        back.posterior.attrs["backend"] == "SMC"
        and int(back.posterior.attrs["num_particles"]) == 32
    )


def test_result_to_arviz_resampled_draws_are_equally_weighted():
    result = lmppl.infer.SMC(counted, 64).run(jax.random.key(1))
    idata = result.to_arviz(resample_key=jax.random.key(2))
    particle = np.asarray(idata.sample_stats["particle"])[0]
    np.testing.assert_array_equal(
        np.asarray(idata.posterior["s"])[0], np.asarray(result.samples["s"])[particle]
    )
    assert idata.posterior.attrs["draws"].startswith("resampled")


def test_plots_write_png(tmp_path):
    references = evaluation.enumeration_sample(classifier, jax.random.key(0), 8)
    table = sum(
        (
            evaluation.log_z_bounds(classifier, backend, references, [1, 4], 8, jax.random.key(1))
            for backend in (lmppl.infer.ImportanceSampling, lmppl.infer.SMC)
        ),
        start=evaluation.BoundsTable([]),
    )
    assert table.methods == ["ImportanceSampling", "SMC"]
    results = run_many(lmppl.infer.SMC(classifier, 16), jax.random.key(2), 2)
    for name, figure in {
        "bounds": lambda p: plots.plot_bounds(table, path=p, log_z=-1.787),
        "ess": lambda p: plots.plot_ess(results, path=p),
        "ess_idata": lambda p: plots.plot_ess(runs_to_arviz(results), path=p),
        "weights": lambda p: plots.plot_weights(results[0], path=p),
    }.items():
        path = tmp_path / f"{name}.png"
        figure(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
