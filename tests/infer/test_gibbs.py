"""Particle Gibbs: its chains leave σ invariant and converge to it (χ² against enumeration).

Each χ² test uses only independent draws: ``CHAINS`` independent chains, each
contributing its last draw. Started from exact draws of σ (``Exact``), every draw of a
chain whose kernel leaves σ invariant is again σ-distributed, so the last draws are an
iid sample of σ under the null hypothesis; any departure from invariance accumulates over
the iterations. Bins whose expected count is under 5 are pooled into one. The same test
rejects the initial states drawn from one SMC run with few particles (a law that is not
σ), which is also what the chains must forget.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from scipy import stats

import lmppl
from lmppl import potentials
from lmppl.infer import ParticleGibbs, ProgramError
from tests.fixtures import table_lm

# Vocabulary 4 (<s> </s> a b) and 3 new tokens: at most 64 sequences.
LM = table_lm(2, context_length=8, seed=5, scale=0.6)
EOS_LM = table_lm(2, context_length=8, seed=7, scale=1.0)
CHAINS = 2000
P_VALUE = 1e-3

# [T, V] per-step log-weights for the EOS target (<s> is forbidden: m_t = 0); step t also
# rewards repeating "a".
STEP_TABLE = jnp.array(
    [[-jnp.inf, 0.3, 0.9, -0.6], [-jnp.inf, -0.5, -0.7, 0.8], [-jnp.inf, 0.4, 0.6, -0.9]],
    jnp.float32,
)


def factor_target():
    s = numpyro.sample("s", lmppl.LM(LM, "a", 3, stop_at_eos=False))
    numpyro.factor("likes_b", 1.2 * jnp.sum(s == 3) - 0.8 * jnp.sum(s == 2))


def eos_step_target():
    """Stops at EOS; a per-step potential (applied by SMC token by token, zero for <s>)
    and a factor."""
    s = numpyro.sample("s", lmppl.LM(EOS_LM, "b", 3))
    potentials.step_factor(
        "steps",
        s,
        lambda prefix, t: STEP_TABLE[t] + 0.7 * (prefix[jnp.maximum(t - 1, 0)] == 2) * (t > 0),
        eos_token_id=EOS_LM.eos_token_id,
    )
    numpyro.factor("few_b", -0.6 * jnp.sum(s == 3))


def crude_twist(inputs):
    """A fixed, non-optimal twist (log ψ_t(s_<t, v) depends on v and t only)."""
    rows = inputs.tokens.shape[0]
    table = jnp.array([0.0, -0.4, 0.5, -0.3], jnp.float32) * (1.0 + 0.3 * inputs.step)
    return jnp.broadcast_to(table, (rows, 4))


def chi_square_p_value(draws: np.ndarray, exact) -> float:
    """χ² goodness of fit of ``draws [M, T]`` (independent) to the enumerated σ."""
    support = np.asarray(exact.samples["s"])
    log_weights = np.asarray(exact.log_weights, np.float64)
    sigma = np.exp(log_weights - log_weights.max())
    sigma /= sigma.sum()
    index = {tuple(row): i for i, row in enumerate(support.tolist())}
    counts = np.zeros(len(support))
    for row in np.asarray(draws).tolist():
        counts[index[tuple(row)]] += 1  # a KeyError: a draw outside p0's support
    assert counts[sigma == 0].sum() == 0, "draws outside σ's support"
    expected = len(draws) * sigma
    large = expected >= 5
    observed = np.append(counts[large], counts[~large].sum())
    expected = np.append(expected[large], expected[~large].sum())
    assert len(observed) >= 10, "too few bins for the test to mean anything"
    return float(stats.chisquare(observed, expected * len(draws) / expected.sum()).pvalue)


@functools.cache
def exact(program):
    return lmppl.infer.Exact(program).run(None)


def exact_draws(program, count: int, seed: int):
    exact_result = exact(program)
    index = jax.random.categorical(jax.random.key(seed), exact_result.log_weights, shape=(count,))
    return exact_result, np.asarray(exact_result.samples["s"])[np.asarray(index)]


SAMPLERS = {
    "smc_every_step_N2": lambda: lmppl.infer.SMC(factor_target, 2, ess_threshold=1.0),
    # Adaptive (ESS < N/2) and word-level: only particles about to emit "a" are resampled.
    "smc_word_adaptive_N3": lambda: lmppl.infer.SMC(
        factor_target, 3, ess_threshold=0.5, resample_at=lambda text: text == "a"
    ),
    "twisted_eos_steps_N2": lambda: lmppl.infer.TwistedSMC(
        eos_step_target, 2, twists={"s": crude_twist}
    ),
}


@functools.cache
def sampler_for(case: str):
    """One sampler per case for the module: ParticleGibbs on the same sampler shares its
    compiled block (for the same numbers of chains and iterations per call)."""
    return SAMPLERS[case]()


@pytest.mark.parametrize("case", sorted(SAMPLERS))
def test_chains_started_at_sigma_stay_at_sigma(case):
    """Invariance: after 10 iterations from exact draws, the last draws are still σ's."""
    sampler = sampler_for(case)
    exact, start = exact_draws(sampler.program, CHAINS, seed=1)
    result = ParticleGibbs(sampler, num_iterations=10, num_chains=CHAINS).run_from(
        jax.random.key(2), start
    )
    assert result.sequences.shape == (CHAINS, 10, 3)
    # The chains move (a kernel that never moves would be invariant too).
    moved = (result.sequences[:, -1] != start).any(axis=1).mean()
    assert moved > 0.25, f"only {moved:.1%} of the chains moved in 10 iterations"
    assert chi_square_p_value(result.sequences[:, -1], exact) > P_VALUE


@pytest.fixture(scope="module")
def from_smc():
    """3000 chains started from one draw each of an SMC run (3 particles), 29 iterations
    after it, in calls of 10 iterations and (under a memory budget) groups of 2000 chains
    (padded to 4000): the compiled block of the invariance test (2000 chains, 10
    iterations) serves every call."""
    sampler = sampler_for("smc_word_adaptive_N3")
    per_run = lmppl.infer.backends.run_bytes(sampler.compile().structure, 3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMPPL_MEMORY_BUDGET", str(CHAINS * per_run + 1))
        gibbs = ParticleGibbs(
            sampler, num_iterations=29, num_chains=3000, iterations_per_call=10, progress=False
        )
        return gibbs.run(jax.random.key(3))


def test_chains_forget_a_biased_start(from_smc):
    """Convergence: the initial states (one draw of an SMC run with 3 particles each) are
    rejected by the χ² test; after 29 iterations the last draws are σ's."""
    assert from_smc.initial.shape == (3000, 3)
    assert from_smc.sequences.shape == (3000, 29, 3)
    assert chi_square_p_value(from_smc.initial, exact(factor_target)) < P_VALUE
    assert chi_square_p_value(from_smc.sequences[:, -1], exact(factor_target)) > P_VALUE


def test_draw_scores_and_arviz_view(from_smc):
    # Each draw's log σ̃ is the enumeration's for that sequence.
    enumeration = exact(factor_target)
    table = dict(
        zip(
            map(tuple, np.asarray(enumeration.samples["s"]).tolist()),
            np.asarray(enumeration.log_weights).tolist(),
            strict=True,
        )
    )
    expected = [[table[tuple(row)] for row in chain] for chain in from_smc.sequences.tolist()]
    np.testing.assert_allclose(from_smc.log_target, expected, atol=1e-4)
    assert np.isfinite(from_smc.log_marginals).all()

    kept = from_smc.thinned(burn_in=9, every=2)
    assert kept.num_draws == 10
    np.testing.assert_array_equal(kept.sequences, from_smc.sequences[:, 9::2])
    data = kept.to_arviz()
    posterior = data.posterior
    assert dict(posterior.sizes) == {"chain": 3000, "draw": 10, "position": 3}
    assert posterior["log_target"].dims == ("chain", "draw")
    assert data.sample_stats["log_marginal"].dims == ("chain", "draw")
    import arviz as az

    rhat = float(az.rhat(data, var_names=["log_target"])["log_target"])
    ess = float(az.ess(data, var_names=["log_target"])["log_target"])
    # Short autocorrelated chains (5 draws per split half) keep R-hat above 1 even at σ.
    assert np.isfinite(rhat) and rhat > 0.9
    assert 0 < ess <= 4 * 3000 * 10  # ESS can exceed the draws for anticorrelated chains
    summary = kept.summary()
    assert {"r_hat", "ess_bulk"} <= set(summary.columns)
    assert "log_target" in summary.index


def test_splitting_into_calls_changes_no_draw(from_smc):
    """2000 chains in one call give the draws of the first 2000 chains of ``from_smc``
    (3000 chains in groups, iterations in calls): chain c's draws depend only on
    ``fold_in(key, c)`` and the iteration. (The invariance test's compiled block.)"""
    whole = ParticleGibbs(
        sampler_for("smc_word_adaptive_N3"), num_iterations=9, num_chains=CHAINS
    ).run(jax.random.key(3))
    np.testing.assert_array_equal(whole.initial, from_smc.initial[:CHAINS])
    np.testing.assert_array_equal(whole.sequences, from_smc.sequences[:CHAINS, :9])
    np.testing.assert_array_equal(whole.log_marginals, from_smc.log_marginals[:CHAINS, :9])
    np.testing.assert_array_equal(whole.ancestors, from_smc.ancestors[:CHAINS, :9])


def prefix_latent():
    numpyro.sample("z", numpyro.distributions.Normal())
    numpyro.sample("s", lmppl.LM(LM, "a", 3, stop_at_eos=False))


def suffix_latent():
    s = numpyro.sample("s", lmppl.LM(LM, "a", 3, stop_at_eos=False))
    numpyro.sample("z", numpyro.distributions.Normal(jnp.sum(s == 2), 1.0))


def tiny_result(draws: int = 4):
    """A result of 2 chains built by hand (for the errors of its methods)."""
    zeros = np.zeros((2, draws))
    return lmppl.infer.ParticleGibbsResult(
        samples={"s": np.zeros((2, draws, 3), np.int32)},
        initial=np.zeros((2, 3), np.int32),
        log_marginals=zeros,
        log_p0=zeros,
        log_potential=zeros,
        site_log_probs={},
        ancestors=np.zeros((2, draws), np.int32),
        site="s",
        backend="ParticleGibbs(SMC)",
        model_name="table",
        num_particles=2,
    )


SMC2 = lmppl.infer.SMC(factor_target, 2)
BAD_INPUTS = {
    "sampler": (lambda: ParticleGibbs(lmppl.infer.Exact(factor_target), 5), TypeError, "SMC"),
    "iterations": (lambda: ParticleGibbs(SMC2, 0), ValueError, "num_iterations"),
    "iterations_float": (lambda: ParticleGibbs(SMC2, 2.5), ValueError, "num_iterations"),
    "chains": (lambda: ParticleGibbs(SMC2, 5, num_chains=0), ValueError, "num_chains"),
    "chains_bool": (lambda: ParticleGibbs(SMC2, 5, num_chains=True), ValueError, "num_chains"),
    "per_call": (
        lambda: ParticleGibbs(SMC2, 5, iterations_per_call=-1),
        ValueError,
        "iterations_per_call",
    ),
    "scheme": (
        lambda: ParticleGibbs(lmppl.infer.SMC(factor_target, 2, resampling="systematic"), 5),
        ValueError,
        "multinomial",
    ),
    "one_particle": (
        lambda: ParticleGibbs(lmppl.infer.SMC(factor_target, 1), 5),
        ValueError,
        "num_particles",
    ),
    "key": (lambda: ParticleGibbs(SMC2, 2).run(0), TypeError, "random key"),
    "reference_shape": (
        lambda: ParticleGibbs(SMC2, 2, num_chains=3).run_from(jax.random.key(0), np.zeros((2, 3))),
        ValueError,
        "integer",
    ),
    "reference_rows": (
        lambda: ParticleGibbs(SMC2, 2, num_chains=3).run_from(
            jax.random.key(0), np.zeros((2, 3), np.int32)
        ),
        ValueError,
        r"\[num_chains, T\]",
    ),
    "reference_token": (
        lambda: ParticleGibbs(SMC2, 2).run_from(jax.random.key(0), np.array([0, 9, 1])),
        ValueError,
        "token ids",
    ),
    "reference_weight_zero": (  # <s> (0) is forbidden by a per-step potential
        lambda: ParticleGibbs(sampler_for("twisted_eos_steps_N2"), 10, num_chains=CHAINS).run_from(
            jax.random.key(0), np.array([2, 0, 3])
        ),
        ValueError,
        "weight zero",
    ),
    "prefix_latent": (
        lambda: ParticleGibbs(lmppl.infer.SMC(prefix_latent, 2), 2).run(jax.random.key(0)),
        ProgramError,
        "before it",
    ),
    "suffix_latent": (
        lambda: ParticleGibbs(lmppl.infer.SMC(suffix_latent, 2), 2).run(jax.random.key(0)),
        ProgramError,
        "after it",
    ),
    "burn_in": (lambda: tiny_result().thinned(burn_in=4), ValueError, "burn_in"),
    "thin": (lambda: tiny_result().thinned(every=0), ValueError, "every"),
    "eos_padding": (
        lambda: ParticleGibbs(lmppl.infer.SMC(eos_step_target, 2), 2).run_from(
            jax.random.key(0), np.array([1, 2, 2])
        ),
        ValueError,
        "EOS",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error(case):
    make, error, pattern = BAD_INPUTS[case]
    with pytest.raises(error, match=pattern) as raised:
        make()
    assert "\n" not in str(raised.value)
