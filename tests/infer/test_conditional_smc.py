"""Conditional SMC: the identity E_CSMC[Z / Ẑ] = 1 with an exact reference, per scheme.

With the reference drawn exactly from σ and every other particle run by SMC whose
resampling is conditioned on the reference's lineage, ``Ẑ / Z`` is the density of the
conditional law against the extended target, so ``E[Z / Ẑ] = 1`` exactly (Andrieu,
Doucet & Holenstein 2010). Forcing ancestor 0 after a scheme is the conditional law only
for multinomial resampling; the others must be refused (or conditioned properly).
The target has a per-step potential that depends on the step and on the previous
token, so the incremental weights differ between particles and steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import lmppl
from lmppl import potentials
from tests.fixtures import small_lm
from tests.statistical import assert_within_standard_errors, mean_and_standard_error

LM_SMALL = small_lm()
RUNS = 4000

# [T, V] per-step log-weights; step t also rewards repeating token 3.
STEP_TABLE = jnp.array(
    [[0.0, 0.0, 1.2, -0.8, 0.4], [0.0, 0.0, -1.0, 0.9, 1.3], [0.0, 0.0, 0.7, 1.1, -1.4]],
    jnp.float32,
)


def stepwise(ending=None):
    s = numpyro.sample("s", lmppl.LM(LM_SMALL, "a", 3, stop_at_eos=False))
    potentials.step_factor(
        "steps",
        s,
        lambda prefix, t: STEP_TABLE[t] + 0.8 * (prefix[jnp.maximum(t - 1, 0)] == 3) * (t > 0),
    )
    numpyro.factor("likes_c", 0.9 * jnp.sum(s == 4))


def exact_references(count, seed):
    exact = lmppl.infer.Exact(stepwise).run(None)
    index = jax.random.categorical(jax.random.key(seed), exact.log_weights, shape=(count,))
    return float(exact.log_marginal), jnp.asarray(exact.samples["s"])[index]


CONDITIONAL_SCHEMES = ["multinomial"]
REFUSED_SCHEMES = ["stratified", "systematic", "residual"]


@pytest.mark.parametrize("ess_threshold", [1.0, 0.5])
@pytest.mark.parametrize("num_particles", [2, 3, 8])
@pytest.mark.parametrize("resampling", CONDITIONAL_SCHEMES)
def test_inverse_marginal_is_unbiased_with_exact_reference(
    resampling, num_particles, ess_threshold
):
    """E[Z / Ẑ_CSMC] = 1 within 4 standard errors, for every scheme accepted conditionally."""
    log_z, references = exact_references(RUNS, seed=num_particles)
    sampler = lmppl.infer.SMC(
        stepwise, num_particles, resampling=resampling, ess_threshold=ess_threshold
    )
    estimates = sampler.conditional_log_marginals(jax.random.key(11), references)
    ratios = np.exp(log_z - np.asarray(estimates, np.float64))
    assert mean_and_standard_error(ratios)[1] > 0
    assert_within_standard_errors(ratios, 1.0, k=4)


@pytest.mark.parametrize("resampling", REFUSED_SCHEMES)
def test_conditional_run_refuses_schemes_without_a_conditional_law(resampling):
    _, references = exact_references(2, seed=0)
    sampler = lmppl.infer.SMC(stepwise, 3, resampling=resampling, ess_threshold=1.0)
    with pytest.raises(ValueError, match="conditional SMC .* multinomial"):
        sampler.conditional_log_marginals(jax.random.key(0), references)


def test_conditional_run_refuses_custom_resampler():
    _, references = exact_references(2, seed=0)
    custom = lambda key, log_weights, n: lmppl.infer.multinomial(key, log_weights, n)
    sampler = lmppl.infer.SMC(stepwise, 3, resampling=custom, ess_threshold=1.0)
    with pytest.raises(ValueError, match="conditional SMC .* multinomial"):
        sampler.conditional_log_marginals(jax.random.key(0), references)


@pytest.mark.parametrize("resampling", REFUSED_SCHEMES)
def test_conditional_importance_sampling_accepts_any_scheme(resampling):
    """Without resampling the scheme is never used: conditional IS (IWAE upper bound)."""
    log_z, references = exact_references(RUNS, seed=5)
    sampler = lmppl.infer.SMC(stepwise, 3, resampling=resampling, ess_threshold=None)
    ratios = np.exp(
        log_z
        - np.asarray(sampler.conditional_log_marginals(jax.random.key(2), references), np.float64)
    )
    assert_within_standard_errors(ratios, 1.0, k=4)


@pytest.mark.parametrize("resampling", ["multinomial", "systematic"])
def test_runs_split_under_a_memory_budget_give_the_same_numbers(monkeypatch, resampling):
    """A budget that fits 3 runs per call: 7 runs in 3 padded chunks, every number unchanged
    (lower runs, and conditional runs where the scheme allows them)."""
    _, references = exact_references(7, seed=5)

    def estimates():
        sampler = lmppl.infer.SMC(stepwise, 4, resampling=resampling, ess_threshold=1.0)
        lower = np.asarray(sampler.log_marginals(jax.random.key(1), 7))
        if resampling != "multinomial":
            return lower, None
        upper = np.asarray(sampler.conditional_log_marginals(jax.random.key(2), references))
        return lower, upper

    whole = estimates()
    structure = lmppl.infer.SMC(stepwise, 4).compile().structure
    per_run = lmppl.infer.backends.run_bytes(structure, 4)
    monkeypatch.setenv("LMPPL_MEMORY_BUDGET", str(3 * per_run + 1))
    assert lmppl.infer.backends.runs_per_call(structure, 4) == 3
    chunked = estimates()
    np.testing.assert_array_equal(chunked[0], whole[0])
    if whole[1] is not None:
        np.testing.assert_array_equal(chunked[1], whole[1])


@pytest.mark.parametrize("ess_threshold", [None, 0.5, 1.0])
def test_unclamped_conditional_runs_are_the_plain_runs(ess_threshold):
    """References of −1 clamp nothing: ``log_marginals`` (the conditional sweep, batched)
    gives, run by run, the plain sweep's numbers for the same keys."""
    sampler = lmppl.infer.SMC(stepwise, 4, ess_threshold=ess_threshold)
    key = jax.random.key(12)
    batched = np.asarray(sampler.log_marginals(key, 5))
    single = [float(sampler.run(k).log_marginal) for k in jax.random.split(key, 5)]
    np.testing.assert_allclose(batched, single, rtol=1e-6, atol=1e-6)


def banning_c(ending=None):
    s = numpyro.sample("s", lmppl.LM(LM_SMALL, "a", 3, stop_at_eos=False))
    potentials.banned_tokens("no_c", s, [4], LM_SMALL.vocab_size)


@pytest.mark.parametrize("proposal", [None, LM_SMALL], ids=["p0", "draft"])
def test_reference_forbidden_by_a_step_potential_is_refused(proposal):
    """A reference the per-step potential forbids is outside σ's support: its weight must
    become zero (and the call refuse it), although the token-free increment of a clamped
    step never sees the token (found by the particle-Gibbs work)."""
    sampler = lmppl.infer.SMC(banning_c, 2, ess_threshold=1.0, proposal=proposal)
    allowed = sampler.conditional_log_marginals(jax.random.key(0), jnp.array([[2, 3, 2]]))
    assert np.isfinite(np.asarray(allowed)).all()
    with pytest.raises(ValueError, match="reference 1 has weight zero"):
        sampler.conditional_log_marginals(jax.random.key(0), jnp.array([[2, 3, 2], [2, 4, 3]]))
