"""Twist networks: an untrained twist is bootstrap SMC; per-step and teacher-forced
evaluations agree; conditional twists read TwistInputs.condition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmppl
from lmppl.infer.twist import TwistInputs
from lmppl.twists.base import prefix_mask
from tests.fixtures import ENDING
from tests.fixtures import infilling as infill
from tests.twists.enumeration import LM, TARGETS

TWISTS = {
    "linear": lambda: lmppl.twists.LinearTwist(LM),
    "linear_log_sigmoid": lambda: lmppl.twists.LinearTwist(LM, output="log_sigmoid"),
    "mlp": lambda: lmppl.twists.MLPTwist(LM, hidden_size=16),
    "transformer": lambda: lmppl.twists.TransformerTwist(LM),
    "tabular": lambda: lmppl.twists.TabularTwist(LM.vocab_size, 3),
}


@pytest.mark.parametrize("name", sorted(TWISTS))
def test_untrained_twist_is_bootstrap_smc(name):
    program, args = TARGETS["classifier"]
    twist = TWISTS[name]()
    twisted = lmppl.infer.TwistedSMC(program, 32, twists={"s": twist}, ess_threshold=0.5)
    plain = lmppl.infer.SMC(program, 32, ess_threshold=0.5)
    a, b = twisted.run(jax.random.key(3), *args), plain.run(jax.random.key(3), *args)
    np.testing.assert_array_equal(np.asarray(a.samples["s"]), np.asarray(b.samples["s"]))
    np.testing.assert_allclose(float(a.log_marginal), float(b.log_marginal), atol=1e-5)
    np.testing.assert_allclose(np.asarray(a.log_weights), np.asarray(b.log_weights), atol=1e-5)


def perturbed(twist, seed=0, scale=0.5):
    leaves, treedef = jax.tree.flatten(twist.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        for k, x in zip(keys, leaves, strict=True)
    ]
    return twist.with_params(jax.tree.unflatten(treedef, noisy))


@pytest.mark.parametrize(
    "name", ["mlp", "transformer", "conditional_mlp", "conditional_transformer"]
)
def test_apply_sequence_matches_step_by_step_apply(name):
    if name == "mlp":
        twist = lmppl.twists.MLPTwist(LM, hidden_size=16)
    elif name == "transformer":
        twist = lmppl.twists.TransformerTwist(lmppl.load("stories260k"))
    elif name == "conditional_mlp":
        twist = lmppl.twists.MLPTwist(LM, hidden_size=16, condition_length=2)
    else:
        twist = lmppl.twists.TransformerTwist(lmppl.load("stories260k"), conditional=True)
    twist = perturbed(twist, scale=0.05 if "transformer" in name else 0.5)
    rows, steps, width = 3, 4, 8
    hidden = jax.random.normal(jax.random.key(1), (rows, steps, LM.hidden_size))
    tokens = jax.random.randint(jax.random.key(2), (rows, steps), 2, LM.vocab_size)
    prompt = jnp.array([1, 5, 7, 9, 0, 0, 0, 0], jnp.int32)[:width]
    condition = jnp.array([4, 2], jnp.int32) if "conditional" in name else None
    inputs = TwistInputs(hidden, tokens, None, condition, prompt, jnp.asarray(4, jnp.int32))
    whole = twist.apply_sequence(twist.params, inputs)
    assert whole.shape == (rows, steps, twist.vocab_size)
    for t in range(steps):
        one = twist.apply(
            twist.params,
            inputs._replace(
                hidden=hidden[:, t], tokens=prefix_mask(tokens, t), step=jnp.asarray(t)
            ),
        )
        np.testing.assert_allclose(np.asarray(one), np.asarray(whole[:, t]), atol=1e-5)
    assert float(jnp.std(whole)) > 0


def test_transformer_twist_reads_its_own_copy_of_the_body():
    lm = lmppl.load("stories260k")
    twist = lmppl.twists.TransformerTwist(lm)
    body = jax.tree.leaves(twist.params["body"])
    base = jax.tree.leaves(lm.params)
    assert all(a is not b for a, b in zip(body, base, strict=True))
    np.testing.assert_array_equal(np.asarray(body[0]), np.asarray(base[0]))


def test_conditional_twist_receives_the_condition_through_twisted_smc():
    twist = perturbed(lmppl.twists.LinearTwist(LM, condition_length=2))
    seen = []

    class Spy:
        params = twist.params

        def apply(self, params, inputs):
            seen.append(inputs.condition)
            return twist.apply(params, inputs)

    sampler = lmppl.infer.TwistedSMC(
        infill, 8, twists={"s": Spy()}, twist_condition=lambda ending: ending
    )
    result = sampler.run(jax.random.key(0), ENDING)
    assert np.isfinite(float(result.log_marginal))
    assert seen and seen[0].shape == (2,)
    with pytest.raises(ValueError, match="twist_condition"):
        lmppl.infer.TwistedSMC(infill, 8, twists={"s": twist}).run(jax.random.key(0), ENDING)


def test_condition_changes_the_twist_values():
    twist = perturbed(lmppl.twists.MLPTwist(LM, hidden_size=16, condition_length=2))
    hidden = jnp.ones((2, LM.hidden_size))
    tokens = jnp.zeros((2, 3), jnp.int32)
    a = twist.apply(twist.params, TwistInputs(hidden, tokens, 0, jnp.array([4, 2])))
    b = twist.apply(twist.params, TwistInputs(hidden, tokens, 0, jnp.array([2, 4])))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_errors_are_one_line_and_clear():
    with pytest.raises(ValueError, match="output must be one of"):
        lmppl.twists.LinearTwist(LM, output="logit")
    with pytest.raises(ValueError, match="num_layers"):
        lmppl.twists.MLPTwist(LM, num_layers=1)
    with pytest.raises(ValueError, match="needs the prompt"):
        twist = lmppl.twists.TransformerTwist(LM)
        twist.apply(twist.params, TwistInputs(jnp.zeros((1, 8)), jnp.zeros((1, 3), jnp.int32), 0))
