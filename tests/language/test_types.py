"""Conformance: every implementation in lmppl against its Protocol in :mod:`lmppl.types`.

Each check is structural (``isinstance`` on the runtime-checkable Protocol) and behavioural
(one call on tiny inputs with the declared shapes).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from numpyro import handlers

import lmppl
from lmppl import types
from lmppl.infer.resampling import RESAMPLERS
from lmppl.infer.twist import TwistInputs
from lmppl.potentials import STEP_POTENTIAL_KEY
from lmppl.twists import LinearTwist, MLPTwist, TabularTwist
from lmppl.twists.losses import LOSSES
from tests.fixtures import small_lm, table_lm

TABLE = small_lm()  # vocab 5
LANGUAGE_MODELS = {
    "table": lambda: TABLE,
    "llama": lambda: lmppl.random_lm("llama", symbols=3, num_layers=1, seed=1),
    "gpt2": lambda: lmppl.random_lm("gpt2", symbols=3, num_layers=1, seed=2),
    # its first call reads the tokens as the packed prompt [d_0, source] (lmppl.lm.t5)
    "t5": lambda: lmppl.random_lm("t5", symbols=3, num_layers=1, seed=3),
    "realigned_token": lambda: lmppl.realign(TABLE, table_lm(3, context_length=12, seed=2), 0.5),
    "realigned_global": lambda: lmppl.realign(
        TABLE, table_lm(3, context_length=12, seed=2), 0.5, mode="global"
    ),
}


@pytest.mark.parametrize("name", sorted(LANGUAGE_MODELS))
def test_language_models_conform(name):
    model = LANGUAGE_MODELS[name]()
    assert isinstance(model, types.LanguageModelLike)
    cache = model.init_cache(2, 6)
    out = model.apply(model.params, jnp.array([[0, 2, 3], [0, 4, 4]], jnp.int32), cache)
    assert out.logits.shape == (2, 3, model.vocab_size)
    assert out.hidden.shape[:2] == (2, 3)
    log_weights = model.next_token_log_weights(out.logits, 1.0)
    assert log_weights.shape == out.logits.shape and log_weights.dtype == jnp.float32
    total = np.asarray(jax.nn.logsumexp(log_weights, axis=-1))
    if model.locally_normalised:
        np.testing.assert_allclose(total, 0.0, atol=1e-5)
    else:  # a sequence-level target: its per-token log-weights need not sum to one
        assert np.all(total <= 1e-5)
    eos = model.eos_token_id
    assert eos is None or 0 <= eos < model.vocab_size


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_resamplers_conform(name):
    resampler = RESAMPLERS[name]
    assert isinstance(resampler, types.Resampler)
    ancestors = resampler(jax.random.key(0), jnp.log(jnp.array([0.1, 0.6, 0.3])), 5)
    assert ancestors.shape == (5,) and ancestors.dtype == jnp.int32
    assert np.all((np.asarray(ancestors) >= 0) & (np.asarray(ancestors) < 3))


def twist_inputs(hidden_size):
    return TwistInputs(
        hidden=jnp.zeros((2, hidden_size)),
        tokens=jnp.array([[2, 0, 0], [3, 0, 0]], jnp.int32),
        step=jnp.asarray(1),
        prompt_tokens=jnp.array([0, 2], jnp.int32),
        prompt_length=jnp.asarray(2),
    )


PARAMETRIC_TWISTS = {
    "linear": lambda: LinearTwist(TABLE),
    "mlp": lambda: MLPTwist(TABLE),
    "tabular": lambda: TabularTwist(TABLE.vocab_size, 3),
}


@pytest.mark.parametrize("name", sorted(PARAMETRIC_TWISTS))
def test_learned_twists_conform(name):
    twist = PARAMETRIC_TWISTS[name]()
    assert isinstance(twist, types.ParametricTwist)
    log_psi = twist.apply(twist.params, twist_inputs(TABLE.hidden_size))
    assert log_psi.shape == (2, TABLE.vocab_size) and log_psi.dtype == jnp.float32


def test_exact_twist_conforms():
    def program():
        s = numpyro.sample("s", lmppl.LM(TABLE, "a", 3, stop_at_eos=False))
        numpyro.factor("c", 1.0 * jnp.sum(s == 4))

    twist = lmppl.infer.Exact(program).optimal_twist()
    assert isinstance(twist, types.TwistFunction)
    assert twist(twist_inputs(TABLE.hidden_size)).shape == (2, TABLE.vocab_size)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_twist_losses_conform(name):
    loss = LOSSES[name]()
    assert isinstance(loss.loss, types.TwistLossFunction)
    assert set(loss.needs) <= {"proposal", "base", "target"}


def test_step_potentials_conform():
    def program():
        s = numpyro.sample("s", lmppl.LM(TABLE, "a", 3, stop_at_eos=False))
        lmppl.potentials.banned_tokens("no_b", s, [3], TABLE.vocab_size)

    trace = handlers.trace(handlers.seed(program, jax.random.key(0))).get_trace()
    potential = trace["no_b"]["infer"][STEP_POTENTIAL_KEY][0]
    assert isinstance(potential, types.StatefulStepPotential)
    assert isinstance(potential.log_potential, types.StepPotentialFunction)
    state = potential.init()
    values = potential.log_weights(state, jnp.zeros((3,), jnp.int32), jnp.asarray(0))
    assert values.shape == (TABLE.vocab_size,) and np.isneginf(np.asarray(values)[3])


def test_constraints_conform():
    automaton = lmppl.potentials.regex("a(b|c)*", TABLE)

    def program():
        s = numpyro.sample("s", lmppl.LM(TABLE, "a", 3))
        lmppl.potentials.constrain("abc", s, automaton)

    trace = handlers.trace(handlers.seed(program, jax.random.key(0))).get_trace()
    potential = trace["abc"]["infer"][STEP_POTENTIAL_KEY][0]
    assert isinstance(potential, types.StatefulStepPotential)
    state = potential.init()
    values = np.asarray(potential.log_weights(state, jnp.zeros((3,), jnp.int32), jnp.asarray(0)))
    assert values.shape == (TABLE.vocab_size,)
    assert np.flatnonzero(np.isfinite(values)).tolist() == [2]  # only "a" starts a match
    assert int(potential.update(state, jnp.asarray(2), jnp.asarray(0))) >= 0
