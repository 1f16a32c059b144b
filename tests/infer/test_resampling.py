"""Property tests of the resamplers: valid indices and unbiased offspring counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmppl.infer import RESAMPLERS, effective_sample_size, normalized_weights
from tests.statistical import assert_within_standard_errors

REPEATS = 2000

weight_vectors = st.lists(
    st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=10.0)), min_size=1, max_size=8
).filter(lambda w: sum(w) > 0)


def counts(resampler, log_weights, num_samples, seed):
    keys = jax.random.split(jax.random.key(seed), REPEATS)
    indices = jax.vmap(lambda k: resampler(k, log_weights, num_samples))(keys)
    size = log_weights.shape[0]
    return np.asarray(jax.vmap(lambda i: jnp.bincount(i, length=size))(indices)), np.asarray(
        indices
    )


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
@settings(max_examples=25, deadline=None, derandomize=True)
@given(weights=weight_vectors, extra=st.integers(min_value=0, max_value=5))
def test_resampler_is_unbiased_and_valid(name, weights, extra):
    weights = np.asarray(weights, np.float64)
    with np.errstate(divide="ignore"):
        log_weights = jnp.asarray(np.log(weights), jnp.float32)
    num_samples = len(weights) + extra
    offspring, indices = counts(RESAMPLERS[name], log_weights, num_samples, seed=len(weights))
    assert indices.min() >= 0 and indices.max() < len(weights)
    assert (offspring.sum(axis=1) == num_samples).all()
    assert (offspring[:, weights == 0] == 0).all(), "a zero-weight particle got offspring"
    expected = num_samples * weights / weights.sum()
    assert offspring.shape[0] == REPEATS
    # Exact where a scheme is deterministic (error 0); otherwise within 5 standard errors.
    assert_within_standard_errors(offspring, expected, k=5, atol=2e-3 * num_samples, inclusive=True)


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_degenerate_weights(name):
    resampler = RESAMPLERS[name]
    one_hot = jnp.log(jnp.array([0.0, 0.0, 1.0, 0.0]))
    assert (np.asarray(resampler(jax.random.key(0), one_hot, 6)) == 2).all()
    all_zero = jnp.full((4,), -jnp.inf)
    np.testing.assert_array_equal(
        np.asarray(resampler(jax.random.key(0), all_zero, 4)), np.arange(4)
    )
    huge = jnp.array([1e30, 1e30, -1e30], jnp.float32)  # finite but extreme log-weights
    idx = np.asarray(resampler(jax.random.key(1), huge, 100))
    assert set(idx.tolist()) <= {0, 1}


def test_effective_sample_size():
    assert float(effective_sample_size(jnp.zeros(10))) == pytest.approx(10.0)
    assert float(effective_sample_size(jnp.log(jnp.array([1.0, 0.0, 0.0])))) == pytest.approx(1.0)
    assert float(effective_sample_size(jnp.full((3,), -jnp.inf))) == 0.0
    assert not np.isnan(np.asarray(normalized_weights(jnp.full((3,), -jnp.inf)))).any()
