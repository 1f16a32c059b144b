"""The SMC kernel's parts alone: ``propose`` (pure) and ``init`` / ``step`` / ``finalize``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

import lmppl
from lmppl.infer.kernel import BoundProgram, SweepOptions, build_kernel, finalize, init
from lmppl.infer.program import discover
from lmppl.infer.proposal import propose
from lmppl.infer.sweep import build_sweep
from tests.fixtures import TARGETS

LOG_P0 = jax.nn.log_softmax(jnp.array([[0.3, -1.0, 2.0, 0.0], [1.0, 1.0, -0.5, 0.2]]), axis=-1)
STEP = jnp.array([[0.0, -jnp.inf, 0.5, 1.0], [-0.3, 0.2, 0.0, 0.0]])
PSI_NEXT = jnp.array([[0.1, 0.4, -2.0, 0.0], [0.0, 0.0, 1.5, -1.0]])
PSI = jnp.array([0.25, -0.5])


def test_propose_is_p0_for_bootstrap_smc():
    log_q, increment = propose(LOG_P0)
    assert log_q is LOG_P0
    np.testing.assert_array_equal(np.asarray(increment), 0.0)


def test_propose_is_locally_optimal_and_weights_by_the_normaliser():
    """q ∝ p0 · m · ψ_t and log w = log Σ_v p0 m ψ_t − log ψ_{t−1}, computed by hand."""
    log_q, increment = propose(LOG_P0, (STEP,), PSI_NEXT, PSI)
    unnormalised = LOG_P0 + STEP + PSI_NEXT
    np.testing.assert_allclose(np.exp(np.asarray(log_q)).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(log_q), np.asarray(jax.nn.log_softmax(unnormalised, axis=-1)), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(increment), np.asarray(logsumexp(unnormalised, axis=-1) - PSI), atol=1e-6
    )
    assert np.isneginf(np.asarray(log_q)[0, 1])


def test_propose_dead_rows_fall_back_to_p0_with_zero_weight():
    dead = jnp.full_like(STEP, -jnp.inf).at[1].set(0.0)
    log_q, increment = propose(LOG_P0, (dead,), None, jnp.array([0.0, -jnp.inf]))
    np.testing.assert_array_equal(np.asarray(log_q)[0], np.asarray(LOG_P0)[0])
    assert np.isneginf(np.asarray(increment)).all()


def test_propose_unnormalised_p0_pays_its_normaliser():
    logits = jnp.array([[0.3, -1.0, 2.0, 0.0]])
    log_q, increment = propose(logits, normalised=False)
    np.testing.assert_allclose(np.asarray(increment), np.asarray(logsumexp(logits, axis=-1)))
    np.testing.assert_allclose(np.asarray(log_q), np.asarray(jax.nn.log_softmax(logits)), atol=1e-6)


def kernel_parts(name):
    program, args = TARGETS[name]
    structure = discover(program, args, {})
    model_params = structure.model_params()
    target = BoundProgram(structure, program, args, {})
    return structure, program, args, target, model_params


@pytest.mark.parametrize("name", ["eos", "banned_tokens", "infilling"])
def test_kernel_stepped_by_hand_equals_the_sweep(name):
    """init, T calls of step in a Python loop, finalize: the scanned sweep's output."""
    options = SweepOptions(num_particles=8, ess_threshold=0.7)
    structure, program, args, target, model_params = kernel_parts(name)
    rng_key = jax.random.key(5)
    prefix_key, step_key, suffix_key = jax.random.split(rng_key, 3)
    state = init(prefix_key, target, model_params, options.num_particles)
    step = build_kernel(target, model_params, options)
    infos = []
    for t, key in enumerate(jax.random.split(step_key, structure.lm_site.max_new_tokens)):
        state, info = step(key, state, jnp.asarray(t))
        assert info.ancestors.shape == (8,) and info.log_weights.shape == (8,)
        infos.append(info)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *infos)
    by_hand = finalize(suffix_key, target, model_params, state, stacked)
    swept = jax.jit(build_sweep(structure, program, options, None))(
        rng_key, model_params, None, args, {}
    )
    np.testing.assert_array_equal(np.asarray(by_hand.tokens), np.asarray(swept.tokens))
    np.testing.assert_array_equal(np.asarray(by_hand.ancestors), np.asarray(swept.ancestors))
    np.testing.assert_allclose(
        np.asarray(by_hand.log_weights), np.asarray(swept.log_weights), atol=1e-5
    )
    np.testing.assert_allclose(float(by_hand.log_marginal), float(swept.log_marginal), atol=1e-5)
    assert by_hand.prompt_tokens.shape == swept.prompt_tokens.shape


def test_one_step_without_resampling_adds_the_proposal_increment():
    options = SweepOptions(num_particles=6, ess_threshold=None)
    structure, _, _, target, model_params = kernel_parts("banned_tokens")
    state = init(jax.random.key(0), target, model_params, 6)
    step = build_kernel(target, model_params, options)
    new, info = step(jax.random.key(1), state, jnp.asarray(0))
    # banned_tokens forbids token 3 at every step: log w_0 = log (1 − p0(3 | prompt)).
    log_p0 = jax.nn.log_softmax(state.decode.logits.astype(jnp.float32), axis=-1)
    expected = jnp.log1p(-jnp.exp(log_p0[:, 3]))
    np.testing.assert_allclose(np.asarray(new.log_weights), np.asarray(expected), atol=1e-5)
    assert not np.asarray(new.decode.tokens[:, 0] == 3).any()
    assert int(new.decode.step) == 1
    assert not bool(info.resampled)


def test_compile_returns_a_named_and_unpackable_program():
    program, args = TARGETS["soft_factor"]
    compiled = lmppl.infer.SMC(program, 4).compile(*args)
    structure, sweep, arrays, twist_params = compiled
    assert compiled.structure is structure and compiled.sweep is sweep
    output = compiled.sweep(jax.random.key(0), structure.model_params(), None, arrays, None)
    assert output.tokens.shape == (4, 3)
