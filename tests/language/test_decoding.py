"""The one decoding state and step (:mod:`lmppl.decoding`): advance, reorder, teacher_force."""

import jax
import jax.numpy as jnp
import numpy as np

import lmppl
from lmppl.decoding import advance, prefill, reorder, teacher_force, valid_mask

LM = lmppl.random_lm("llama", symbols=3, num_layers=1, seed=3)  # vocab 5, EOS id 1
EOS = 1
PROMPT = jnp.array([0, 2], jnp.int32)


def test_advance_records_tokens_applies_the_eos_rule_and_counts_steps():
    state = prefill(LM, LM.params, PROMPT, jnp.asarray(2), 3, 4)
    assert state.tokens.shape == (3, 4) and int(state.step) == 0 and not state.done.any()
    state = advance(LM, LM.params, state, jnp.array([2, EOS, 3], jnp.int32), EOS)
    state = advance(LM, LM.params, state, jnp.array([4, 2, EOS], jnp.int32), EOS)
    np.testing.assert_array_equal(state.tokens[:, :2], [[2, 4], [EOS, EOS], [3, EOS]])
    np.testing.assert_array_equal(state.tokens[:, 2:], 0)  # not reached yet
    np.testing.assert_array_equal(state.done, [False, True, True])
    assert int(state.step) == 2


def test_advance_matches_one_teacher_forced_pass():
    values = jnp.array([[2, 3, 4], [3, 3, 2]], jnp.int32)
    state = prefill(LM, LM.params, PROMPT, jnp.asarray(2), 2, 3)
    forced = teacher_force(LM, LM.params, state, values)
    stepped = state
    for t in range(3):
        np.testing.assert_allclose(forced.logits[:, t], stepped.logits, atol=1e-5)
        np.testing.assert_allclose(forced.hidden[:, t], stepped.hidden, atol=1e-5)
        stepped = advance(LM, LM.params, stepped, values[:, t], None)
    np.testing.assert_array_equal(stepped.tokens, values)


def test_reorder_gathers_rows_and_keeps_the_step():
    state = prefill(LM, LM.params, PROMPT, jnp.asarray(2), 3, 2)
    state = advance(LM, LM.params, state, jnp.array([2, 3, 4], jnp.int32), None)
    moved = reorder(state, jnp.array([2, 2, 0], jnp.int32))
    np.testing.assert_array_equal(moved.tokens[:, 0], [4, 4, 2])
    np.testing.assert_allclose(moved.logits, state.logits[jnp.array([2, 2, 0])])
    assert int(moved.step) == 1
    # The moved cache continues exactly like the row it was copied from.
    after = advance(LM, LM.params, moved, jnp.array([3, 3, 3], jnp.int32), None)
    direct = advance(LM, LM.params, state, jnp.array([3, 3, 3], jnp.int32), None)
    np.testing.assert_allclose(after.logits[0], direct.logits[2], atol=1e-5)


def test_valid_mask_keeps_up_to_the_first_eos():
    tokens = jnp.array([[2, EOS, EOS, 3], [2, 3, 4, 2]])
    np.testing.assert_array_equal(valid_mask(tokens, EOS), [[True, True, False, False], [True] * 4])
    assert bool(jnp.all(valid_mask(tokens, None)))


def test_generate_refuses_to_sample_without_a_key():
    import pytest

    with pytest.raises(ValueError, match="give rng_key"):
        lmppl.generate(LM, PROMPT, max_new_tokens=2)
    greedy = lmppl.generate(LM, PROMPT, max_new_tokens=2, temperature=0)
    assert greedy.tokens.shape == (1, 2)
    sampled = lmppl.generate(LM, PROMPT, max_new_tokens=2, rng_key=jax.random.key(0))
    assert sampled.tokens.shape == (1, 2)
