"""Bidirectional log Z bounds and KL estimates against enumeration."""

import jax
import numpy as np
import pytest

import lmppl
from lmppl import evaluation
from tests.fixtures import classifier_c as classifier
from tests.fixtures import exact, exact_kls, infilling
from tests.statistical import assert_within_standard_errors

RUNS = 200

BACKENDS = {
    "IS": lmppl.infer.ImportanceSampling,
    "SMC": lambda program, k: lmppl.infer.SMC(program, k, ess_threshold=1.0),
}


def check_sandwich(row, log_z):
    """E[lower] ≤ log Z ≤ E[upper] within 4 standard errors."""
    for bound, side in ((row.lower, "not_above"), (row.upper, "not_below")):
        assert_within_standard_errors(
            bound.mean,
            log_z,
            k=4,
            standard_error=bound.standard_error,
            side=side,
            inclusive=True,
            context=row,
        )


def check_tightens(first, last):
    """The gap at the largest K is smaller than at K = 1 beyond 4 standard errors."""
    error = np.hypot(
        np.hypot(first.lower.standard_error, first.upper.standard_error),
        np.hypot(last.lower.standard_error, last.upper.standard_error),
    )
    assert first.gap - last.gap > 4 * error, (first.gap, last.gap, error)
    assert last.lower.mean > first.lower.mean and last.upper.mean < first.upper.mean


@pytest.mark.parametrize("method", sorted(BACKENDS))
def test_bounds_sandwich_log_z_and_tighten(method):
    log_z = float(exact(classifier).log_marginal)
    references = evaluation.enumeration_sample(classifier, jax.random.key(0), RUNS)
    table = evaluation.log_z_bounds(
        classifier, BACKENDS[method], references, [1, 16], RUNS, jax.random.key(1), log_z=log_z
    )
    for row in table.rows:
        check_sandwich(row, log_z)
    check_tightens(table.rows[0], table.rows[-1])
    assert table.log_z_estimate() == log_z
    assert "| 16 |" in table.to_markdown() and table.to_csv().startswith("method,K,")


def few_conditions(draws, count):
    """Keep the samples of the ``count`` most frequent conditions (fewer Exact runs)."""
    _, group = evaluation.group_by_condition(draws)
    keep = np.isin(group, np.argsort(np.bincount(group))[-count:])
    return draws._replace(samples=draws.samples[keep], conditions=draws.conditions[keep])


def test_infilling_bounds_average_over_conditions():
    draws = few_conditions(
        evaluation.joint_sample(infilling, jax.random.key(2), 40, observed="ending"), 3
    )
    conditions, _ = evaluation.group_by_condition(draws)
    log_z = np.array([float(exact(infilling, c).log_marginal) for c in conditions])
    table = evaluation.log_z_bounds(
        infilling, BACKENDS["SMC"], draws, [1, 16], RUNS, jax.random.key(3)
    )
    for row in table.rows:
        check_sandwich(row, log_z.mean())
    check_tightens(table.rows[0], table.rows[-1])
    # Per condition, the tightest pair brackets each log Z_c closely.
    assert np.all(np.abs(table.log_z_by_condition() - log_z) < 0.2)


def test_conditional_upper_bound_is_exact_with_the_optimal_twist():
    log_z = float(exact(infilling, conditions := np.array([4, 2])).log_marginal)
    twist = lmppl.infer.Exact(infilling).optimal_twist(conditions)
    references = evaluation.enumeration_sample(infilling, jax.random.key(4), 10, conditions)
    table = evaluation.log_z_bounds(
        infilling,
        lambda p, k: lmppl.infer.TwistedSMC(p, k, twists={"s": twist}),
        references,
        [4],
        10,
        jax.random.key(5),
        args=(conditions,),
    )
    for row in table.rows:
        np.testing.assert_allclose(row.upper.values, log_z, atol=2e-5)
        np.testing.assert_allclose(row.lower.values, log_z, atol=2e-5)


def check_within(interval, value):
    """``value`` lies within 4 standard errors of the interval's mean.

    The standard error comes from the interval's per-seed values, so it is itself estimated
    from few numbers: with 10 seeds, 4 estimated standard errors is a t-test with 9 degrees
    of freedom, a false alarm of 0.3% (with 5 seeds it was 1.6%).
    """
    assert_within_standard_errors(
        interval.mean, value, k=4, standard_error=interval.standard_error, context=interval
    )


def test_kl_estimates_match_exact_kl_for_p0():
    log_z, kl_p0_sigma, kl_sigma_p0 = exact_kls(classifier)
    references = evaluation.enumeration_sample(classifier, jax.random.key(6), 2000)
    kl = evaluation.kl_estimates(
        classifier,
        lmppl.infer.ImportanceSampling,
        references,
        log_z,
        jax.random.key(7),
        num_samples=400,
        num_seeds=10,
    )
    check_within(kl.kl_q_sigma, kl_p0_sigma)
    check_within(kl.kl_sigma_q, kl_sigma_p0)
    assert kl.kl_q_sigma.low <= kl.kl_q_sigma.mean <= kl.kl_q_sigma.high


def test_kl_estimates_for_infilling_average_over_conditions():
    draws = few_conditions(
        evaluation.joint_sample(infilling, jax.random.key(8), 1000, observed="ending"), 3
    )
    conditions, group = evaluation.group_by_condition(draws)
    exact_values = np.array([exact_kls(infilling, c) for c in conditions])
    kl = evaluation.kl_estimates(
        infilling,
        lmppl.infer.ImportanceSampling,
        draws,
        exact_values[:, 0],
        jax.random.key(9),
        num_samples=200,
        num_seeds=10,
    )
    # E_q term: uniform over distinct conditions; E_σ term: over the (condition, sample) pairs.
    check_within(kl.kl_q_sigma, exact_values[:, 1].mean())
    check_within(kl.kl_sigma_q, exact_values[group, 2].mean())


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="num_runs"):
        evaluation.log_z_bounds(classifier, lmppl.infer.SMC, np.zeros((2, 3), int), [1], 0, None)
    with pytest.raises(ValueError, match="exact_samples"):
        evaluation.log_z_bounds(classifier, lmppl.infer.SMC, np.zeros(3), [1], 2, None)
    with pytest.raises(ValueError, match="num_seeds"):
        evaluation.kl_estimates(
            classifier, lmppl.infer.SMC, np.zeros((2, 3), int), 0.0, None, num_seeds=5
        )


def test_lower_and_upper_runs_share_one_compilation_per_k():
    """The lower runs use the conditional sweep with nothing clamped: one XLA program per K
    (``padded=False``; padded, every K shares one: tests/evaluation/test_padded_particles.py)."""
    from jax._src import monitoring

    compiled = []

    def listen(event, seconds, **details):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(details.get("fun_name", ""))

    references = evaluation.enumeration_sample(classifier, jax.random.key(3), 8)
    monitoring.register_event_duration_secs_listener(listen)
    persistent = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # count compilations, not loads
    try:
        evaluation.log_z_bounds(
            classifier,
            lmppl.infer.SMC,
            references,
            [2, 3, 5],
            6,
            jax.random.key(4),
            padded=False,
        )
    finally:
        monitoring.unregister_event_duration_listener(listen)
        jax.config.update("jax_enable_compilation_cache", persistent)
    assert sum("_advance" in name for name in compiled) == 3
