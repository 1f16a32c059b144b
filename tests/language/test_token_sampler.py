"""The two-level inverse-CDF token sampler draws exactly the categorical law it is given."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from lmppl.token_sampler import block_size, sample_categorical

DRAWS = 100_000


def _chi_square_p_value(counts: np.ndarray, probabilities: np.ndarray) -> float:
    """Pearson χ² p-value of ``counts`` against ``probabilities`` (cells with p > 0)."""
    positive = probabilities > 0
    expected = probabilities[positive] * counts.sum()
    statistic = np.sum((counts[positive] - expected) ** 2 / expected)
    return float(stats.chi2.sf(statistic, positive.sum() - 1))


@pytest.fixture(scope="module")
def draw():
    return jax.jit(sample_categorical)


@pytest.mark.parametrize("vocab", [7, 64, 300, 1000])
def test_frequencies_match_the_law_with_zeros_anywhere(draw, vocab):
    """χ² over every token, with zero-probability tokens first, last and across a block."""
    rng = np.random.default_rng(vocab)
    probabilities = rng.dirichlet(np.full(vocab, 0.5))
    zeros = np.r_[0, vocab - 1, rng.choice(vocab, vocab // 3)]
    probabilities[zeros] = 0.0
    if vocab >= 64:
        width = block_size(vocab)
        probabilities[width : 2 * width] = 0.0  # a whole block of zeros
    probabilities /= probabilities.sum()
    log_probs = jnp.log(jnp.asarray(probabilities, jnp.float32))
    tokens = np.asarray(draw(jax.random.key(vocab), jnp.tile(log_probs, (DRAWS, 1))))
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[probabilities == 0].sum() == 0
    assert _chi_square_p_value(counts, probabilities) > 1e-4


def test_rows_are_independent_laws_and_need_not_be_normalised(draw):
    """Each row follows its own law; adding a constant to a row changes nothing."""
    rows = jnp.array([[0.0, 1.0, 2.0], [5.0, -jnp.inf, 5.0], [-3.0, -3.0, 100.0]])
    shifted = rows + jnp.array([[7.0], [-40.0], [1000.0]])
    log_probs = jnp.repeat(shifted, DRAWS // 3, axis=0)
    per_row = np.asarray(draw(jax.random.key(0), log_probs)).reshape(3, -1)
    for row, sampled in zip(np.asarray(rows), per_row, strict=True):
        probabilities = np.exp(row - row.max())
        probabilities /= probabilities.sum()
        assert _chi_square_p_value(np.bincount(sampled, minlength=3), probabilities) > 1e-4


def test_a_row_with_no_valid_token_draws_index_zero(draw):
    log_probs = jnp.full((4, 50), -jnp.inf).at[1, 17].set(0.0)
    assert np.asarray(draw(jax.random.key(1), log_probs)).tolist() == [0, 17, 0, 0]


def test_rare_tokens_are_drawn_at_their_rate(draw):
    """A token of probability 5e-3 beside a mode, in a 49k vocabulary (SmolLM2's size)."""
    vocab, rare, rate, rows = 49_152, 31_000, 5e-3, 1_000
    log_probs = jnp.full((vocab,), -jnp.inf).at[5].set(0.0).at[rare].set(jnp.log(rate / (1 - rate)))
    batch = jnp.tile(log_probs, (rows, 1))
    tokens = np.concatenate(
        [np.asarray(draw(key, batch)) for key in jax.random.split(jax.random.key(2), 8)]
    )
    assert set(np.unique(tokens)) <= {5, rare}
    expected = tokens.size * rate
    assert abs(int((tokens == rare).sum()) - expected) < 5 * np.sqrt(expected)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(st.just(-np.inf), st.floats(-80.0, 80.0, allow_nan=False, width=32)),
        min_size=70,
        max_size=70,
    ),
    st.integers(0, 2**31 - 1),
)
def test_never_draws_a_token_of_probability_zero(draw, log_weights, seed):
    """Whatever the weights (spread over 160 nats, zeros anywhere), a zero is never drawn."""
    log_probs = jnp.asarray(log_weights, jnp.float32)
    tokens = np.asarray(draw(jax.random.key(seed), jnp.tile(log_probs, (256, 1))))
    if np.all(np.isneginf(log_weights)):
        assert np.all(tokens == 0)
    else:
        assert np.all(np.isfinite(np.asarray(log_weights)[tokens]))


def test_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        sample_categorical(jax.random.key(0), jnp.zeros((3,)))
