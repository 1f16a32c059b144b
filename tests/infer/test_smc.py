"""SMC, importance sampling and twisted SMC against exact answers on enumerable targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmppl
from tests.fixtures import TARGETS, small_lm
from tests.statistical import assert_within_standard_errors, mean_and_standard_error

NUM_RUNS = 300


def exact_log_z(name):
    program, args = TARGETS[name]
    return float(lmppl.infer.Exact(program).run(None, *args).log_marginal)


def ratio_mean_and_error(log_marginals, log_z):
    return mean_and_standard_error(np.exp(np.asarray(log_marginals, np.float64) - log_z))


BACKENDS = {
    "is": lambda p: lmppl.infer.ImportanceSampling(p, 8),
    "smc_always": lambda p: lmppl.infer.SMC(p, 8, ess_threshold=1.0),
    "smc_adaptive_systematic": lambda p: lmppl.infer.SMC(p, 8, resampling="systematic"),
}


# Ẑ = 0 (every particle dead) is a legitimate draw of an unbiased estimator on the
# threshold target; log_marginals reports those runs with a warning.
@pytest.mark.filterwarnings("ignore:.*every particle has weight zero:RuntimeWarning")
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", ["soft_factor", "threshold", "infilling", "eos", "banned_tokens"])
def test_marginal_likelihood_is_unbiased(name, backend):
    """E[Ẑ] = Z: the mean of Ẑ/Z over many runs is 1 within 4 standard errors."""
    program, args = TARGETS[name]
    log_z = exact_log_z(name)
    estimates = BACKENDS[backend](program).log_marginals(jax.random.key(7), NUM_RUNS, *args)
    mean, error = ratio_mean_and_error(estimates, log_z)
    assert error > 0
    assert_within_standard_errors(mean, 1.0, k=4, standard_error=error)


@pytest.mark.parametrize("name", ["soft_factor", "infilling", "eos", "banned_tokens"])
def test_twisted_smc_with_optimal_twist_is_exact_on_every_run(name):
    program, args = TARGETS[name]
    exact = lmppl.infer.Exact(program)
    log_z = float(exact.run(None, *args).log_marginal)
    twist = exact.optimal_twist(*args)
    sampler = lmppl.infer.TwistedSMC(program, 4, twists={"s": twist})
    estimates = np.asarray(sampler.log_marginals(jax.random.key(3), 20, *args))
    np.testing.assert_allclose(estimates, log_z, atol=2e-5)
    result = sampler.run(jax.random.key(0), *args)
    np.testing.assert_allclose(np.asarray(result.log_weights), 0.0, atol=2e-5)


def test_untrained_twist_equals_bootstrap_smc():
    program, args = TARGETS["infilling"]
    zero = lambda inputs: jnp.zeros((inputs.tokens.shape[0], 5))
    twisted = lmppl.infer.TwistedSMC(program, 16, twists={"s": zero}, ess_threshold=0.5)
    plain = lmppl.infer.SMC(program, 16, ess_threshold=0.5)
    a, b = twisted.run(jax.random.key(1), *args), plain.run(jax.random.key(1), *args)
    np.testing.assert_array_equal(np.asarray(a.samples["s"]), np.asarray(b.samples["s"]))
    np.testing.assert_allclose(float(a.log_marginal), float(b.log_marginal), atol=1e-5)


def test_smc_without_resampling_equals_importance_sampling():
    program, args = TARGETS["soft_factor"]
    a = lmppl.infer.SMC(program, 32, ess_threshold=None).run(jax.random.key(5), *args)
    b = lmppl.infer.ImportanceSampling(program, 32).run(jax.random.key(5), *args)
    np.testing.assert_array_equal(np.asarray(a.samples["s"]), np.asarray(b.samples["s"]))
    np.testing.assert_allclose(np.asarray(a.log_weights), np.asarray(b.log_weights))
    assert not np.asarray(a.resampled).any()


def total_variation(result, exact) -> float:
    target = dict(
        zip(
            map(tuple, np.asarray(exact.samples["s"]).tolist()),
            np.asarray(exact.weights),
            strict=True,
        )
    )
    approx: dict = {}
    for seq, w in zip(
        map(tuple, np.asarray(result.samples["s"]).tolist()),
        np.asarray(result.weights),
        strict=True,
    ):
        approx[seq] = approx.get(seq, 0.0) + float(w)
    keys = set(target) | set(approx)
    return 0.5 * sum(abs(target.get(k, 0.0) - approx.get(k, 0.0)) for k in keys)


def test_total_variation_falls_as_particles_grow():
    program, args = TARGETS["infilling"]
    exact = lmppl.infer.Exact(program).run(None, *args)
    distances = []
    for num in (16, 256, 4096):
        sampler = lmppl.infer.SMC(program, num, ess_threshold=1.0)
        tv = [total_variation(sampler.run(jax.random.key(seed), *args), exact) for seed in range(4)]
        distances.append(np.mean(tv))
    assert distances[0] > distances[1] > distances[2], distances
    assert distances[2] < 0.1, distances


def test_weights_target_sigma_for_carried_latent_sites():
    """A latent site before the LM site is sampled from its prior and carried."""
    import numpyro
    import numpyro.distributions as dist

    lm = small_lm()  # the soft_factor target's model

    def program():
        z = numpyro.sample("z", dist.Bernoulli(0.3))
        s = numpyro.sample("s", lmppl.LM(lm, "a", 2, stop_at_eos=False))
        numpyro.factor("f", jnp.where(z == 1, 1.0, -1.0) * jnp.sum(s == 4))

    def fixed(z_value):
        def p():
            s = numpyro.sample("s", lmppl.LM(lm, "a", 2, stop_at_eos=False))
            numpyro.factor("f", jnp.where(z_value == 1, 1.0, -1.0) * jnp.sum(s == 4))

        return float(lmppl.infer.Exact(p).run(None).log_marginal)

    log_z = float(np.log(0.3 * np.exp(fixed(1)) + 0.7 * np.exp(fixed(0))))
    sampler = lmppl.infer.SMC(program, 8, ess_threshold=1.0)
    mean, error = ratio_mean_and_error(sampler.log_marginals(jax.random.key(2), NUM_RUNS), log_z)
    assert_within_standard_errors(mean, 1.0, k=4, standard_error=error)
    result = sampler.run(jax.random.key(0))
    assert result.samples["z"].shape == (8,)


def test_jitted_and_unjitted_sweeps_agree():
    program, args = TARGETS["eos"]
    sampler = lmppl.infer.SMC(program, 16, ess_threshold=1.0)
    jitted = sampler.run(jax.random.key(4), *args)
    with jax.disable_jit():
        eager = lmppl.infer.SMC(program, 16, ess_threshold=1.0).run(jax.random.key(4), *args)
    np.testing.assert_array_equal(np.asarray(jitted.samples["s"]), np.asarray(eager.samples["s"]))
    np.testing.assert_allclose(float(jitted.log_marginal), float(eager.log_marginal), atol=1e-4)


def test_new_argument_values_do_not_recompile():
    program, args = TARGETS["infilling"]
    sampler = lmppl.infer.SMC(program, 8)
    sampler.run(jax.random.key(0), jnp.array([4, 2], jnp.int32))
    sampler.run(jax.random.key(0), jnp.array([3, 3], jnp.int32))
    ((_, jitted),) = sampler._compiled.values()
    assert jitted.advance._cache_size() == 1 and jitted.finish._cache_size() == 1


def exact_samples(name, count, seed=0):
    program, args = TARGETS[name]
    exact = lmppl.infer.Exact(program).run(None, *args)
    index = jax.random.categorical(jax.random.key(seed), exact.log_weights, shape=(count,))
    return exact, jnp.asarray(exact.samples["s"])[index]


@pytest.mark.parametrize("ess_threshold", [None, 1.0])
def test_conditional_smc_upper_bounds_log_z(ess_threshold):
    """With exact references, E[log Ẑ_CSMC] >= log Z >= E[log Ẑ_SMC] (beyond 4 s.e.)."""
    program, args = TARGETS["infilling"]
    exact, references = exact_samples("infilling", NUM_RUNS)
    log_z = float(exact.log_marginal)
    sampler = lmppl.infer.SMC(program, 4, ess_threshold=ess_threshold)
    upper = np.asarray(sampler.conditional_log_marginals(jax.random.key(1), references, *args))
    lower = np.asarray(sampler.log_marginals(jax.random.key(2), NUM_RUNS, *args))
    assert_within_standard_errors(upper, log_z, k=4, side="not_below")
    assert_within_standard_errors(lower, log_z, k=4, side="not_above")
    assert upper.mean() > lower.mean()


def test_conditional_smc_is_exact_with_optimal_twist():
    program, args = TARGETS["infilling"]
    exact, references = exact_samples("infilling", 10)
    twist = lmppl.infer.Exact(program).optimal_twist(*args)
    sampler = lmppl.infer.TwistedSMC(program, 4, twists={"s": twist})
    upper = np.asarray(sampler.conditional_log_marginals(jax.random.key(1), references, *args))
    np.testing.assert_allclose(upper, float(exact.log_marginal), atol=2e-5)
