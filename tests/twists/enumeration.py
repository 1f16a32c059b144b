"""Exact quantities by enumeration for twist tests: teacher-forced samples and KL (the
models and targets are :mod:`tests.fixtures`')."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import lmppl
from lmppl.infer.program import discover, run_prefix, step_potential_functions
from lmppl.twists.samples import Samples, base_pass, step_log_weights, twist_sequence
from tests.fixtures import classifier_c_not_a, short, small_lm

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
