"""One compiled sweep for every K: the particle axis padded to K_max, K active (issue 16, 2).

A sampler built for N particles runs K <= N of them (``SMC.active_particles``): particles
K .. N − 1 carry log-weight −inf throughout, resampling draws the K points of the K-particle
scheme, the ESS rule reads ``threshold · K`` and log Ẑ adds ``logsumexp(active) − log K``.
Checked here: the resamplers' K-point draws, unbiasedness of Ẑ and the conditional upper
bound against enumeration, equality in law with unpadded K-particle samplers (and, with
partitionable Threefry, equal numbers for the same key), inert masked particles, and
``log_z_bounds`` over four K compiling the sweep once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmppl
from lmppl import evaluation
from lmppl.evaluation.bounds import _samplers
from lmppl.infer.resampling import RESAMPLERS, resample_active
from tests.fixtures import banned, exact, infilling
from tests.statistical import assert_within_standard_errors

RUNS = 400
LOG_Z = float(exact(banned).log_marginal)  # a per-step potential: weights vary every step


def smc(scheme, num_particles):
    return lmppl.infer.SMC(banned, num_particles, resampling=scheme, ess_threshold=1.0)


@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
def test_resample_active_draws_the_k_point_scheme(scheme):
    """First K slots: the scheme's K draws from w (offspring mean K·w, never an inactive
    particle); the other slots their own index; all-−inf weights: the identity."""
    size, count = 8, 5
    log_weights = jnp.array([0.3, -1.0, 0.9, -0.2, -2.0, 0, 0, 0], jnp.float32)
    log_weights = jnp.where(jnp.arange(size) < count, log_weights, -jnp.inf)
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.vmap(lambda key: resample_active(scheme, key, log_weights, jnp.int32(count)))
    ancestors = np.asarray(draw(keys))
    assert (ancestors[:, :count] < count).all()
    np.testing.assert_array_equal(
        ancestors[:, count:], np.arange(count, size)[None].repeat(4000, 0)
    )
    offspring = (ancestors[:, :count, None] == np.arange(count)).sum(axis=1)  # [runs, K]
    expected = count * np.asarray(jax.nn.softmax(log_weights))[:count]
    assert_within_standard_errors(offspring, expected, k=4, atol=1e-9)
    if scheme == "systematic":  # K points, so each count is floor or ceil of K·w
        assert (offspring >= np.floor(expected)).all() and (offspring <= np.ceil(expected)).all()
    if scheme == "residual":
        assert (offspring >= np.floor(expected)).all()
    dead = jnp.full((size,), -jnp.inf)
    np.testing.assert_array_equal(
        resample_active(scheme, keys[0], dead, jnp.int32(count)), np.arange(size)
    )


@pytest.mark.parametrize("scheme", ["multinomial", "stratified"])
def test_padded_estimates_are_unbiased_and_bound_log_z(scheme):
    """E[Ẑ] = Z for K = 2 and 5 of 8 (4 standard errors); conditional (multinomial):
    E[log Ẑ_cond] >= log Z."""
    sampler = smc(scheme, 8)
    references = evaluation.enumeration_sample(banned, jax.random.key(0), RUNS).samples
    for k in (2, 5):
        padded = sampler.active_particles(k)
        log_marginals = np.asarray(padded.log_marginals(jax.random.key(k), RUNS), np.float64)
        assert_within_standard_errors(np.exp(log_marginals), np.exp(LOG_Z), k=4, context=k)
        if scheme == "multinomial":
            upper = padded.conditional_log_marginals(jax.random.key(10 + k), references)
            assert_within_standard_errors(
                np.asarray(upper, np.float64), LOG_Z, k=4, side="not_below", context=k
            )


def test_masked_particles_are_inert():
    """K = 3 of 8: inactive weights −inf at every step, never an ancestor, ESS <= K; the
    conditional sweep keeps particle 0 clamped (its own ancestor)."""
    sampler = smc("multinomial", 8)
    for conditional in (False, True):
        structure, sweep, arrays, twist_params = sampler.compile(conditional=conditional)
        reference = jnp.array([2, 4, 4], jnp.int32) if conditional else None
        out = sweep(jax.random.key(1), structure.model_params(), twist_params, arrays, reference, 3)
        ancestors = np.asarray(out.ancestors)
        assert out.resampled[1:].all()
        assert (ancestors[:, :3] < 3).all()
        np.testing.assert_array_equal(ancestors[:, 3:], np.tile(np.arange(3, 8), (3, 1)))
        assert np.isneginf(np.asarray(out.log_weight_history)[:, 3:]).all()
        assert np.isneginf(np.asarray(out.log_weights)[3:]).all()
        assert np.isfinite(np.asarray(out.log_weights)[:3]).any()
        assert (np.asarray(out.ess) <= 3 + 1e-4).all()
        if conditional:
            assert (ancestors[:, 0] == 0).all()
            np.testing.assert_array_equal(out.tokens[0], reference)


def two_sample_check(first, second, context):
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    error = np.hypot(first.std(ddof=1), second.std(ddof=1)) / np.sqrt(len(first))
    assert_within_standard_errors(
        first.mean(), second.mean(), k=4, standard_error=error, context=context
    )


@functools.cache
def halved_twist():
    twist = lmppl.infer.Exact(infilling).optimal_twist(np.array([4, 2]))
    return lambda inputs: 0.5 * twist(inputs)


BACKENDS = {
    "IS": lambda p, k: lmppl.infer.ImportanceSampling(p, k),
    "SMC-systematic": lambda p, k: lmppl.infer.SMC(p, k, resampling="systematic"),
    "TwistedSMC": lambda p, k: lmppl.infer.TwistedSMC(p, k, twists={"s": halved_twist()}),
}


@pytest.mark.parametrize("method", sorted(BACKENDS))
def test_padded_and_unpadded_samplers_agree_in_law(method):
    """log Ẑ of K = 3 active of 8 against an unpadded 3-particle sampler: equal means
    (two-sample, 4 standard errors), different random streams."""
    ending = jnp.array([4, 2], jnp.int32)
    padded = BACKENDS[method](infilling, 8).active_particles(3)
    unpadded = BACKENDS[method](infilling, 3)
    first = padded.log_marginals(jax.random.key(0), RUNS, ending)
    second = unpadded.log_marginals(jax.random.key(1), RUNS, ending)
    two_sample_check(first, second, method)
    assert not np.allclose(first, second)


@pytest.mark.skipif(
    not jax.config.jax_threefry_partitionable, reason="needs partitionable Threefry draws"
)
def test_padded_runs_repeat_the_unpadded_runs_for_the_same_key():
    """With partitionable Threefry the first K rows of each per-particle draw are the
    K-particle draws: K = 3 of 8 gives the 3-particle sampler's numbers (lower and
    conditional upper runs), for multinomial, systematic and no resampling."""
    references = evaluation.enumeration_sample(banned, jax.random.key(0), 20).samples
    for scheme in ("multinomial", "systematic", None):
        if scheme is None:
            padded = lmppl.infer.ImportanceSampling(banned, 8)
            unpadded = lmppl.infer.ImportanceSampling(banned, 3)
        else:
            padded, unpadded = smc(scheme, 8), smc(scheme, 3)
        active = padded.active_particles(3)
        np.testing.assert_allclose(
            active.log_marginals(jax.random.key(5), 20),
            unpadded.log_marginals(jax.random.key(5), 20),
            atol=1e-5,
            err_msg=str(scheme),
        )
        if scheme != "systematic":
            np.testing.assert_allclose(
                active.conditional_log_marginals(jax.random.key(6), references),
                unpadded.conditional_log_marginals(jax.random.key(6), references),
                atol=1e-5,
                err_msg=str(scheme),
            )


@pytest.mark.skipif(
    not jax.config.jax_threefry_partitionable, reason="needs partitionable Threefry draws"
)
def test_padding_carries_over_several_lm_sites():
    """Two latent LM sites with a latent between them: the active count and the masked
    weights carry from one phase to the next (same numbers as 3 unpadded particles)."""
    from tests.fixtures import SMALL_LM
    from tests.infer.test_several_lm_sites import title_story

    program = title_story(SMALL_LM, banned=True)
    padded = lmppl.infer.SMC(program, 8, ess_threshold=1.0).active_particles(3)
    unpadded = lmppl.infer.SMC(program, 3, ess_threshold=1.0)
    np.testing.assert_allclose(
        padded.log_marginals(jax.random.key(3), 30),
        unpadded.log_marginals(jax.random.key(3), 30),
        atol=1e-5,
    )


def test_padded_runs_with_the_optimal_twist_are_exact():
    """Zero-variance twist: every padded K gives log Z exactly (lower and upper), so the
    epochs' normaliser is log K, not log N."""
    conditions = np.array([4, 2])
    log_z = float(exact(infilling, conditions).log_marginal)
    twist = lmppl.infer.Exact(infilling).optimal_twist(conditions)
    sampler = lmppl.infer.TwistedSMC(infilling, 8, twists={"s": twist})
    references = evaluation.enumeration_sample(infilling, jax.random.key(4), 6, conditions)
    for k in (1, 3, 8):
        padded = sampler.active_particles(k)
        lower = padded.log_marginals(jax.random.key(k), 6, conditions)
        upper = padded.conditional_log_marginals(jax.random.key(k), references.samples, conditions)
        np.testing.assert_allclose(lower, log_z, atol=2e-5)
        np.testing.assert_allclose(upper, log_z, atol=2e-5)


def compiled_functions(run):
    """Names of the functions XLA compiled while ``run()`` ran (persistent cache off)."""
    from jax._src import monitoring

    compiled = []

    def listen(event, seconds, **details):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(details.get("fun_name", ""))

    monitoring.register_event_duration_secs_listener(listen)
    persistent = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # count compilations, not loads
    try:
        result = run()
    finally:
        monitoring.unregister_event_duration_listener(listen)
        jax.config.update("jax_enable_compilation_cache", persistent)
    return result, compiled


def test_log_z_bounds_over_four_k_compiles_the_sweep_once():
    references = evaluation.enumeration_sample(banned, jax.random.key(3), 8)
    table, compiled = compiled_functions(
        lambda: evaluation.log_z_bounds(
            banned, lmppl.infer.SMC, references, [1, 2, 4, 7], 6, jax.random.key(4)
        )
    )
    assert sum("_advance" in name for name in compiled) == 1, compiled
    assert sum("_finish" in name for name in compiled) == 1, compiled
    assert [row.num_particles for row in table.rows] == [1, 2, 4, 7]
    assert all(np.isfinite(row.lower.mean) and np.isfinite(row.upper.mean) for row in table.rows)


def test_samplers_fall_back_to_one_per_k():
    """Padding needs one sampler's settings for every K and a built-in scheme."""
    padded = _samplers(banned, lmppl.infer.SMC, [2, 4], padded=True)
    assert all(isinstance(s, lmppl.infer.ActiveParticles) for s in padded)
    assert padded[0].sampler is padded[1].sampler and padded[0].num_particles == 2

    def custom(rng_key, log_weights, num_samples):
        return lmppl.infer.resampling.multinomial(rng_key, log_weights, num_samples)

    fallbacks = {
        "custom resampler": lambda p, k: lmppl.infer.SMC(p, k, resampling=custom),
        "word-level steps": lambda p, k: lmppl.infer.SMC(p, k, resample_at="word"),
        "settings vary with K": lambda p, k: lmppl.infer.SMC(p, k, ess_threshold=k / 8),
        "not an lmppl sampler": lambda p, k: object(),
    }
    for name, backend in fallbacks.items():
        samplers = _samplers(banned, backend, [2, 4], padded=True)
        assert not any(isinstance(s, lmppl.infer.ActiveParticles) for s in samplers), name
    samplers = _samplers(banned, lmppl.infer.SMC, [2, 4], padded=False)
    assert [s.num_particles for s in samplers] == [2, 4]
    with pytest.raises(ValueError, match="custom resampler"):
        lmppl.infer.SMC(banned, 4, resampling=custom).active_particles(2)
    with pytest.raises(ValueError, match="more than"):
        lmppl.infer.SMC(banned, 4).active_particles(5)
