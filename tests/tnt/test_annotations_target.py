"""Annotations (pairs in three modes, detectors, padding) and the per-token target p_new."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmppl import tnt

EOS = 1


def test_pair_modes_mark_first_diff_and_full():
    negative = np.array([[5, 6, 7, 8, 9, EOS], [5, 6, 7, EOS, EOS, EOS], [4, 4, 4, 4, 4, 4]])
    corrected = [[5, 6, 2, 8, 9, EOS], [5, 6, 7, EOS], [4, 3, 4, 4, 4]]
    first = tnt.from_pairs(negative, corrected, "first", eos_token_id=EOS)
    diff = tnt.from_pairs(negative, corrected, "diff", eos_token_id=EOS)
    full = tnt.from_pairs(negative, corrected, "full", eos_token_id=EOS)
    # row 0: one substitution at 2; row 1: identical (a positive); row 2: 4 4 4 4 4 4 vs 4 3 4 4 4
    assert np.flatnonzero(first.mask[0]).tolist() == [2]
    assert np.flatnonzero(diff.mask[0]).tolist() == [2]
    assert np.flatnonzero(full.mask[0]).tolist() == [0, 1, 2, 3, 4, 5]
    assert not first.mask[1].any() and not diff.mask[1].any() and not full.mask[1].any()
    assert np.flatnonzero(first.mask[2]).tolist() == [1]
    # the diff aligns: 4 4 4 4 4 4 -> 4 3 4 4 4 is one substitution plus one deletion
    assert diff.mask[2].sum() == 2
    assert full.mask[2].all()
    assert first.valid[1].tolist() == [True, True, True, True, False, False]


def test_diff_mode_aligns_an_insertion_instead_of_marking_the_tail():
    negative = np.array([[2, 3, 4, 5, 6, 7]])
    corrected = [[2, 9, 3, 4, 5, 6]]  # an inserted token and a dropped last one
    diff = tnt.from_pairs(negative, corrected, "diff")
    assert np.flatnonzero(diff.mask[0]).tolist() == [5]
    assert np.flatnonzero(tnt.from_pairs(negative, corrected, "first").mask[0]).tolist() == [1]


def test_detector_ids_and_callable_respect_padding():
    tokens = np.array([[3, 2, 3, EOS, 3], [2, 2, 2, 2, 2]])
    by_ids = tnt.from_detector(tokens, {3}, eos_token_id=EOS)
    assert by_ids.mask.tolist() == [[True, False, True, False, False], [False] * 5]
    by_fn = tnt.from_detector(tokens, lambda t: jnp.asarray(t) == 3, eos_token_id=EOS)
    np.testing.assert_array_equal(by_fn.mask, by_ids.mask)
    assert by_ids.negative_rows.tolist() == [True, False] and by_ids.num_annotated == 2
    with pytest.raises(ValueError, match="flag every token"):
        tnt.from_detector(tokens, lambda t: np.zeros(3, bool))
    with pytest.raises(ValueError, match="mode"):
        tnt.from_pairs(tokens, list(tokens), "some")


def test_p_new_normalises_and_removes_the_annotated_token():
    logits = jax.random.normal(jax.random.key(0), (3, 4, 7)) * 3
    old = jax.nn.log_softmax(logits)
    tokens = jax.random.randint(jax.random.key(1), (3, 4), 0, 7)
    mask = jnp.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    log_new = tnt.log_p_new(old, tokens, mask)
    p_new = np.exp(np.asarray(log_new, np.float64))
    np.testing.assert_allclose(p_new.sum(-1), 1.0, atol=1e-6)
    picked = np.take_along_axis(p_new, np.asarray(tokens)[..., None], -1)[..., 0]
    assert np.all(picked[np.asarray(mask)] == 0.0)
    # unannotated positions keep p_o; annotated ones are p_o / (1 − p_o(x_t)) elsewhere
    p_old = np.exp(np.asarray(old, np.float64))
    np.testing.assert_allclose(p_new[~np.asarray(mask)], p_old[~np.asarray(mask)], rtol=1e-5)
    b, t = 0, 0
    expected = p_old[b, t] / (1 - p_old[b, t, tokens[b, t]])
    expected[tokens[b, t]] = 0
    np.testing.assert_allclose(p_new[b, t], expected, rtol=1e-5)
    smoothed = np.exp(np.asarray(tnt.smoothed_log_p_new(old, tokens, mask, 1e-6), np.float64))
    np.testing.assert_allclose(smoothed.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        np.take_along_axis(smoothed, np.asarray(tokens)[..., None], -1)[..., 0][np.asarray(mask)],
        1e-6,
        rtol=1e-4,
    )


def test_p_new_is_stable_when_the_old_model_is_certain():
    # p_o(x_t) = 1 − 3e-26 in float32: 1 − p_o(x_t) is not representable, p_new still is
    old = jax.nn.log_softmax(jnp.array([[60.0, 0.0, 1.0, -1.0]]))
    log_new = np.asarray(tnt.log_p_new(old, jnp.array([0]), jnp.array([True])), np.float64)
    assert np.isneginf(log_new[0, 0]) and np.all(np.isfinite(log_new[0, 1:]))
    expected = np.exp([0.0, 1.0, -1.0]) / np.exp([0.0, 1.0, -1.0]).sum()
    np.testing.assert_allclose(np.exp(log_new[0, 1:]), expected, rtol=1e-6)
