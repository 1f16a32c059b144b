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

# [T, V] per-step log-weights for the EOS target; step t also rewards repeating "a".
STEP_TABLE = jnp.array(
    [[0.0, 0.3, 0.9, -0.6], [0.0, -0.5, -0.7, 0.8], [0.0, 0.4, 0.6, -0.9]], jnp.float32
)


def factor_target():
    s = numpyro.sample("s", lmppl.LM(LM, "a", 3, stop_at_eos=False))
    numpyro.factor("likes_b", 1.2 * jnp.sum(s == 3) - 0.8 * jnp.sum(s == 2))


def eos_step_target():
    """Stops at EOS; a per-step potential (applied by SMC token by token) and a factor."""
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
        counts[index[tuple(row)]] += 1  # a KeyError: a draw outside σ's support
    expected = len(draws) * sigma
    large = expected >= 5
    observed = np.append(counts[large], counts[~large].sum())
    expected = np.append(expected[large], expected[~large].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
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
    "smc_adaptive_N3": lambda: lmppl.infer.SMC(factor_target, 3, ess_threshold=0.5),
    "twisted_eos_steps_N2": lambda: lmppl.infer.TwistedSMC(
        eos_step_target, 2, twists={"s": crude_twist}
    ),
}


@pytest.mark.parametrize("case", sorted(SAMPLERS))
def test_chains_started_at_sigma_stay_at_sigma(case):
    """Invariance: after 10 iterations from exact draws, the last draws are still σ's."""
    sampler = SAMPLERS[case]()
    exact, start = exact_draws(sampler.program, CHAINS, seed=1)
    result = ParticleGibbs(sampler, num_iterations=10, num_chains=CHAINS).run_from(
        jax.random.key(2), start
    )
    assert result.sequences.shape == (CHAINS, 10, 3)
    # The chains move (a kernel that never moves would be invariant too).
    moved = (result.sequences[:, -1] != start).any(axis=1).mean()
    assert moved > 0.25, f"only {moved:.1%} of the chains moved in 10 iterations"
    assert chi_square_p_value(result.sequences[:, -1], exact) > P_VALUE


def test_chains_forget_a_biased_start():
    """Convergence: each chain starts from one draw of an SMC run with 3 particles (no
    resampling), a law the χ² test rejects; after 30 iterations the last draws are σ's."""
    sampler = lmppl.infer.ImportanceSampling(factor_target, 3)
    result = ParticleGibbs(sampler, num_iterations=30, num_chains=CHAINS).run(jax.random.key(3))
    assert result.initial.shape == (CHAINS, 3)
    assert chi_square_p_value(result.initial, exact(factor_target)) < P_VALUE
    assert chi_square_p_value(result.sequences[:, -1], exact(factor_target)) > P_VALUE


def test_draw_scores_and_arviz_view():
    sampler = lmppl.infer.SMC(factor_target, 4, ess_threshold=1.0)
    result = ParticleGibbs(sampler, num_iterations=60, num_chains=4).run(jax.random.key(4))
    # Each draw's log σ̃ is the enumeration's for that sequence.
    enumeration = exact(factor_target)
    table = dict(
        zip(
            map(tuple, np.asarray(enumeration.samples["s"]).tolist()),
            np.asarray(enumeration.log_weights).tolist(),
            strict=True,
        )
    )
    expected = np.array(
        [[table[tuple(row)] for row in chain] for chain in result.sequences.tolist()]
    )
    np.testing.assert_allclose(result.log_target, expected, atol=1e-4)
    assert np.isfinite(result.log_marginals).all()

    kept = result.thinned(burn_in=10, every=2)
    assert kept.num_draws == 25
    np.testing.assert_array_equal(kept.sequences, result.sequences[:, 10::2])
    data = kept.to_arviz()
    posterior = data.posterior
    assert dict(posterior.sizes) == {"chain": 4, "draw": 25, "position": 3}
    assert posterior["log_target"].dims == ("chain", "draw")
    assert data.sample_stats["log_marginal"].dims == ("chain", "draw")
    import arviz as az

    rhat = float(az.rhat(data, var_names=["log_target"])["log_target"])
    ess = float(az.ess(data, var_names=["log_target"])["log_target"])
    assert np.isfinite(rhat) and rhat > 0
    assert 0 < ess <= 4 * 25 * 4  # ESS can exceed the draws for anticorrelated chains
    summary = kept.summary()
    assert {"r_hat", "ess_bulk"} <= set(summary.columns)
    assert "log_target" in summary.index


def test_splitting_into_calls_changes_no_draw(monkeypatch):
    """Iterations in calls of 3 (padded) and chains in groups of 2 give the same draws."""
    sampler = lmppl.infer.SMC(factor_target, 2, ess_threshold=1.0)
    whole = ParticleGibbs(sampler, num_iterations=7, num_chains=5).run(jax.random.key(5))
    structure = sampler.compile().structure
    per_run = lmppl.infer.backends.run_bytes(structure, 2)
    monkeypatch.setenv("LMPPL_MEMORY_BUDGET", str(2 * per_run + 1))
    split = ParticleGibbs(
        sampler, num_iterations=7, num_chains=5, iterations_per_call=3, progress=False
    ).run(jax.random.key(5))
    np.testing.assert_array_equal(split.initial, whole.initial)
    np.testing.assert_array_equal(split.sequences, whole.sequences)
    np.testing.assert_array_equal(split.log_marginals, whole.log_marginals)


def prefix_latent():
    numpyro.sample("z", numpyro.distributions.Normal())
    numpyro.sample("s", lmppl.LM(LM, "a", 3, stop_at_eos=False))


def suffix_latent():
    s = numpyro.sample("s", lmppl.LM(LM, "a", 3, stop_at_eos=False))
    numpyro.sample("z", numpyro.distributions.Normal(jnp.sum(s == 2), 1.0))


def forbids_b():
    s = numpyro.sample("s", lmppl.LM(LM, "a", 3, stop_at_eos=False))
    numpyro.factor("no_b", potentials.log_indicator(jnp.all(s != 3)))


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
    "reference_weight_zero": (
        lambda: ParticleGibbs(lmppl.infer.SMC(forbids_b, 2), 2).run_from(
            jax.random.key(0), np.array([2, 3, 2])
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
