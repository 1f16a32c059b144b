"""Exact target samplers against enumeration: acceptance rates and sample frequencies."""

import jax
import numpy as np
import pytest

from lmppl import evaluation
from tests.fixtures import classifier_c as classifier
from tests.fixtures import exact, frequencies, infilling, soft_factor, threshold
from tests.statistical import assert_within_standard_errors


def assert_frequencies_match(samples, result):
    """Pearson's χ² test of the sample counts against σ (cells with expected count < 5
    pooled) does not reject at level 1e-4."""
    from scipy import stats

    sigma = np.asarray(result.weights, np.float64)
    counts = frequencies(samples, np.asarray(result.samples["s"])) * len(samples)
    expected = sigma * len(samples)
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    statistic = np.sum((observed - expected) ** 2 / np.maximum(expected, 1e-12))
    p_value = stats.chi2.sf(statistic, len(observed) - 1)
    assert p_value > 1e-4, (statistic, len(observed), p_value)


@pytest.mark.parametrize("program", [classifier, threshold], ids=["classifier", "threshold"])
def test_rejection_acceptance_and_frequencies_match_sigma(program):
    result = exact(program)
    draws = evaluation.rejection_sample(program, jax.random.key(0), 3000, batch_size=1024)
    assert draws.samples.shape == (3000, 3)
    # P(accept) = Z; the acceptance rate is binomial over the draws.
    z = float(np.exp(result.log_marginal))
    error = np.sqrt(z * (1 - z) / draws.num_draws)
    assert_within_standard_errors(draws.acceptance_rate, z, k=4, standard_error=error)
    assert_frequencies_match(draws.samples, result)


def test_rejection_with_envelope_is_exact_and_refuses_without():
    with pytest.raises(ValueError, match="log_envelope"):
        evaluation.rejection_sample(soft_factor, jax.random.key(0), 10, batch_size=256)
    result = exact(soft_factor)
    draws = evaluation.rejection_sample(
        soft_factor, jax.random.key(1), 2000, batch_size=1024, log_envelope=4.5
    )
    z = float(np.exp(result.log_marginal - 4.5))
    error = np.sqrt(z * (1 - z) / draws.num_draws)
    assert_within_standard_errors(draws.acceptance_rate, z, k=4, standard_error=error)
    assert_frequencies_match(draws.samples, result)


def test_rejection_budget_is_reported():
    with pytest.raises(evaluation.RejectionBudgetExhausted, match="max_draws=64"):
        evaluation.rejection_sample(
            classifier, jax.random.key(0), 1000, batch_size=32, max_draws=64
        )
    with pytest.warns(RuntimeWarning, match="acceptance rate"):
        draws = evaluation.rejection_sample(
            classifier, jax.random.key(0), 1000, batch_size=32, max_draws=64, allow_fewer=True
        )
    assert draws.num_draws == 64 and 0 < len(draws.samples) < 64


def test_joint_samples_are_exact_given_their_condition():
    draws = evaluation.joint_sample(infilling, jax.random.key(2), 6000, observed="ending")
    assert draws.samples.shape == (6000, 3) and draws.conditions.shape == (6000, 2)
    conditions, group = evaluation.group_by_condition(draws)
    common = np.argmax(np.bincount(group))
    result = exact(infilling, conditions[common])
    assert_frequencies_match(draws.samples[group == common], result)


def test_enumeration_sampler_frequencies():
    result = exact(classifier)
    draws = evaluation.enumeration_sample(classifier, jax.random.key(3), 3000)
    assert_frequencies_match(draws.samples, result)
