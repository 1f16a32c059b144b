"""Exact quantities by enumeration for twist tests: teacher-forced samples and KL (the
models and targets are :mod:`tests.fixtures`')."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lmppl
from lmppl.infer.program import discover, run_prefix, step_potential_functions
from lmppl.twists.losses import get_loss
from lmppl.twists.samples import Samples, base_pass, step_log_weights, twist_sequence
from lmppl.twists.training import build_train_step
from tests.fixtures import classifier_c_not_a, short, small_lm
from tests.statistical import mean_and_standard_error

LM = small_lm()  # vocab 5: <s> </s> a b c
classifier = classifier_c_not_a  # φ = sigmoid(1.5·#c − 0.5·#a − 1): FUDGE applies

TARGETS = {"classifier": (classifier, ()), "short": (short, ())}


def enumerate_samples(program, args, twist, params, condition=None) -> Samples:
    """Every sequence of the support with ``log_weights = log σ̃`` and the twist's values
    (with per-step potentials, ``log_step`` too: ``log_q`` is then the sweep's ``∝ p0 m ψ``)."""
    exact = lmppl.infer.Exact(program).run(None, *args)
    tokens = jnp.asarray(exact.samples["s"])
    structure = discover(program, args, {})
    site = structure.lm_site
    model_params = structure.model_params()
    _, prompt, length = run_prefix(
        structure, program, args, {}, model_params, jax.random.key(0)[None]
    )
    lm_params = model_params[structure.lm_params_key]
    base = base_pass(site.model, lm_params, prompt, length, tokens, 1.0, site.eos_token_id)
    log_psi = twist_sequence(twist, params, base, tokens, condition, prompt, length)
    zeros = jnp.zeros(tokens.shape[::-1])
    log_step = None
    if structure.step_potentials:
        functions = step_potential_functions(structure, program, args, {}, model_params)
        log_step = step_log_weights(functions, tokens, site.eos_token_id)
    return Samples(
        tokens,
        jnp.asarray(exact.log_potential),
        jnp.asarray(exact.log_weights),
        zeros,
        base.log_p0,
        base.valid,
        log_psi,
        log_step,
    )


def log_p0(samples: Samples) -> jax.Array:
    return jnp.sum(samples.log_p0_tokens(), axis=1)


def log_q(samples: Samples) -> jax.Array:
    return jnp.sum(samples.log_q_tokens(), axis=1)


def kl_divergences(program, args, twist, condition=None) -> tuple[float, float]:
    """Exact ``(KL(σ‖q), KL(q‖σ))`` of the twist-induced proposal q."""
    samples = enumerate_samples(program, args, twist, twist.params, condition)
    log_sigma = np.asarray(jax.nn.log_softmax(samples.log_weights), np.float64)
    lq = np.asarray(log_q(samples), np.float64)
    sigma, q = np.exp(log_sigma), np.exp(lq)
    return float(np.sum(sigma * (log_sigma - lq))), float(np.sum(q * (lq - log_sigma)))


def estimated_gradients(program, args, twist, method, num_particles, num_runs, **options):
    """``[R, D]``: ``num_runs`` independent training-step gradient estimates of ``method``'s
    loss at ``twist.params`` (flattened; ``options`` go to ``build_train_step``)."""
    step, model_params, arrays = build_train_step(
        program, twist, get_loss(method), optax.identity(), num_particles, args, {}, **options
    )
    params = twist.params
    opt_state = optax.identity().init(params)

    def gradient(key):
        new_params, _, _ = step(params, opt_state, key, model_params, arrays)
        return jnp.concatenate([(n - p).ravel() for n, p in zip(new_params, params, strict=True)])

    keys = jax.random.split(jax.random.key(11), num_runs)
    return np.asarray(jax.lax.map(gradient, keys, batch_size=64), np.float64)


def projected_gradients(estimates, exact_grad, num_directions: int = 4):
    """``(mean, standard error, exact)`` of the estimates projected on the exact gradient's
    direction and on ``num_directions − 1`` random ones."""
    directions = np.random.default_rng(0).normal(size=(num_directions, exact_grad.size))
    directions[0] = exact_grad / np.linalg.norm(exact_grad)
    projected = estimates @ directions.T  # [R, directions]
    mean, error = mean_and_standard_error(projected)
    return mean, error, directions @ exact_grad


def rl_squared_residuals(fixed: Samples, log_psi) -> jax.Array:
    """``[N]``: RL's per-sequence ``½ Σ_t (log ψ_t − target_t)²`` with the bootstrapped
    target ``log Σ_v p0(v) ψ_{t+1}`` (``fixed``'s twist, no gradient) and ``log φ`` at the
    last valid step; the exact loss is its expectation under q."""
    steps = log_psi.shape[1]
    bootstrap = fixed.log_next_normalizer()[:, 1:]
    log_phi = fixed.log_potential[:, None]
    target = jnp.concatenate([bootstrap, log_phi], axis=1)
    length = fixed.valid.sum(1)
    target = jnp.where(jnp.arange(steps)[None] >= (length - 1)[:, None], log_phi, target)
    residual = jnp.where(fixed.valid, log_psi - target, 0.0)
    return 0.5 * jnp.sum(residual**2, axis=1)
