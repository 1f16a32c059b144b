"""The training step's two shortcuts give the quantities they replace.

* A sweep run with ``record_steps`` (no resampling) returns the base LM's hidden states
  and ``log p0`` along its own sequences: :func:`recorded_pass` equals the teacher-forced
  :func:`base_pass` (so the step does not run the LM a second time).
* ``apply_sequence_columns``: the full ``log ψ`` table without gradient and the drawn
  tokens' values with it. Values equal :meth:`apply_sequence`'s, and the gradient of any
  function of the drawn tokens' values equals the one through the full table, for the
  linear, MLP (also conditional) and trainable-body twists.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import lmppl
from lmppl.infer.program import ProgramError, discover, run_prefix
from lmppl.infer.sweep import SweepOptions, build_sweep
from lmppl.infer.twist import TwistInputs
from lmppl.lm.random_init import random_lm
from lmppl.twists.samples import base_pass, recorded_pass

LM = random_lm("llama", symbols=4, hidden_size=16, num_layers=2, context_length=16, seed=3)
PROMPT = jnp.asarray([0, 2, 3], jnp.int32)
STEPS = 5


def likes_a(lm=LM):
    story = numpyro.sample("story", lmppl.LM(lm, PROMPT, STEPS))
    numpyro.factor("a", 0.7 * jnp.sum(story == 2))


def test_recorded_pass_equals_the_teacher_forced_pass():
    """Rows that end at EOS included (a row is done from its EOS on: padding, masked)."""
    structure = discover(likes_a, (), {})
    site = structure.lm_site
    options = SweepOptions(num_particles=64, ess_threshold=None, record_steps=True)
    sweep = jax.jit(build_sweep(structure, likes_a, options, None))
    model_params = structure.model_params()
    output = sweep(jax.random.key(0), model_params, None, (), {})
    tokens = output.tokens
    assert bool(jnp.any(tokens == site.eos_token_id)), "no row ended: EOS rows untested"
    recorded = recorded_pass(output, site.eos_token_id)
    _, prompt, length = run_prefix(
        structure, likes_a, (), {}, model_params, jax.random.key(1)[None]
    )
    forced = jax.jit(
        lambda params, prompt, length, tokens: base_pass(
            site.model, params, prompt, length, tokens, site.temperature, site.eos_token_id
        )
    )(model_params[structure.lm_params_key], prompt, length, tokens)
    np.testing.assert_array_equal(np.asarray(recorded.valid), np.asarray(forced.valid))
    np.testing.assert_allclose(np.asarray(recorded.hidden), np.asarray(forced.hidden), atol=2e-5)
    valid = np.asarray(forced.valid)
    np.testing.assert_allclose(
        np.asarray(recorded.log_p0)[valid], np.asarray(forced.log_p0)[valid], atol=2e-5
    )
    assert recorded.log_p0.shape == (64, STEPS, LM.vocab_size)


def test_record_steps_refuses_resampling():
    structure = discover(likes_a, (), {})
    options = SweepOptions(num_particles=4, ess_threshold=0.5, record_steps=True)
    with pytest.raises(ProgramError, match="record_steps .* ess_threshold=None"):
        build_sweep(structure, likes_a, options, None)(
            jax.random.key(0), structure.model_params(), None, (), {}
        )


def _perturbed(twist, seed):
    """The twist with every parameter moved off its (zero) initialisation."""
    leaves, treedef = jax.tree.flatten(twist.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [
        x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return twist.with_params(jax.tree.unflatten(treedef, moved))


TWISTS = {
    "linear": lambda: lmppl.twists.LinearTwist(LM),
    "mlp": lambda: lmppl.twists.MLPTwist(LM, 8),
    "mlp_sigmoid_conditional": lambda: lmppl.twists.MLPTwist(
        LM, 8, output="log_sigmoid", condition_length=2
    ),
    "body_conditional": lambda: lmppl.twists.TransformerTwist(LM, conditional=True),
}


@pytest.mark.parametrize("name", sorted(TWISTS))
def test_columns_give_the_values_and_gradient_of_the_full_table(name):
    twist = _perturbed(TWISTS[name](), seed=len(name))
    rows = 6
    key_hidden, key_tokens, key_weights = jax.random.split(jax.random.key(7), 3)
    tokens = jax.random.randint(key_tokens, (rows, STEPS), 0, LM.vocab_size)
    condition = jnp.asarray([3, 4], jnp.int32) if "conditional" in name else None
    inputs = TwistInputs(
        jax.random.normal(key_hidden, (rows, STEPS, LM.hidden_size)),
        tokens,
        None,
        condition,
        PROMPT,
        jnp.asarray(3, jnp.int32),
    )
    weights = jax.random.normal(key_weights, (rows, STEPS))

    def through_full(params):
        full = twist.apply_sequence(params, inputs)
        return jnp.sum(weights * jnp.take_along_axis(full, tokens[..., None], axis=-1)[..., 0])

    def through_columns(params):
        _, at_tokens = twist.apply_sequence_columns(params, inputs)
        return jnp.sum(weights * at_tokens)

    full, at_tokens = jax.jit(twist.apply_sequence_columns)(twist.params, inputs)
    expected = jax.jit(twist.apply_sequence)(twist.params, inputs)
    np.testing.assert_allclose(np.asarray(full), np.asarray(expected), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(at_tokens),
        np.asarray(jnp.take_along_axis(expected, tokens[..., None], axis=-1)[..., 0]),
        atol=1e-5,
    )
    grad_full = jax.jit(jax.grad(through_full))(twist.params)
    grad_columns = jax.jit(jax.grad(through_columns))(twist.params)
    for a, b in zip(jax.tree.leaves(grad_full), jax.tree.leaves(grad_columns), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grad_columns))

    # The full table carries no gradient on this path.
    no_gradient = jax.jit(jax.grad(lambda p: jnp.sum(twist.apply_sequence_columns(p, inputs)[0])))(
        twist.params
    )
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(no_gradient))
