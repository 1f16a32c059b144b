"""Each loss's gradient estimate (one jitted training step) against the exact gradient of
its stated objective, computed by enumeration of every sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmppl
from lmppl.twists.losses import log1mexp
from tests.statistical import assert_within_standard_errors
from tests.twists.enumeration import (
    TARGETS,
    enumerate_samples,
    estimated_gradients,
    log_p0,
    log_q,
    projected_gradients,
    rl_squared_residuals,
)

NUM_PARTICLES = 256
NUM_RUNS = 256


def exact_objective(method, program, args, twist, params, frozen):
    """The objective each loss's docstring states, by enumeration (σ, p0 and q exact)."""
    samples = enumerate_samples(program, args, twist, params)
    sigma = jax.nn.softmax(samples.log_weights)
    p0_log = log_p0(samples)
    log_psi = samples.log_psi_tokens()  # [M, T]
    if method == "ctl":
        log_normalizers = jax.scipy.special.logsumexp(p0_log[:, None] + log_psi, axis=0)
        return jnp.sum(-(sigma[:, None] * log_psi).sum(0) + log_normalizers)
    if method == "sixo":
        p0 = jnp.exp(p0_log)
        return -jnp.sum(
            sigma[:, None] * jax.nn.log_sigmoid(log_psi)
            + p0[:, None] * jax.nn.log_sigmoid(-log_psi)
        )
    if method == "fudge":
        p0 = jnp.exp(p0_log)[:, None]
        label = jnp.exp(samples.log_potential)[:, None]
        return -jnp.sum(p0 * (label * log_psi + (1 - label) * log1mexp(log_psi)))
    if method == "dpg":
        return -jnp.sum(sigma * log_q(samples))
    if method == "rl":
        fixed = enumerate_samples(program, args, twist, frozen)
        return jnp.sum(jnp.exp(log_q(fixed)) * rl_squared_residuals(fixed, log_psi))
    raise ValueError(method)


def exact_sampler(program, args):
    exact = lmppl.infer.Exact(program).run(None, *args)
    table, logits = jnp.asarray(exact.samples["s"]), jnp.asarray(exact.log_weights)
    return lambda key, n: table[jax.random.categorical(key, logits, shape=(n,))]


def random_twist(method, program, args, seed=0):
    structure = lmppl.infer.discover(program, args, {})
    site = structure.lm_site
    output = "log_sigmoid" if method == "fudge" else "log"
    twist = lmppl.twists.TabularTwist(site.model.vocab_size, site.max_new_tokens, output=output)
    keys = jax.random.split(jax.random.key(seed), len(twist.params))
    params = [0.7 * jax.random.normal(k, p.shape) for k, p in zip(keys, twist.params, strict=True)]
    return twist.with_params(params)


CASES = [
    (method, target, False)
    for method in ("ctl", "rl", "sixo", "fudge", "dpg")
    for target in ("classifier", "short")
] + [(method, "classifier", True) for method in ("ctl", "sixo", "dpg")]


@pytest.mark.parametrize(("method", "target", "exact_positives"), CASES)
def test_gradient_estimate_matches_exact_gradient(method, target, exact_positives):
    """Projections of the mean estimated gradient on the exact gradient and on random
    directions agree with the exact ones within 4 Monte Carlo standard errors."""
    program, args = TARGETS[target]
    twist = random_twist(method, program, args)
    sampler = exact_sampler(program, args) if exact_positives else None
    estimates = estimated_gradients(
        program, args, twist, method, NUM_PARTICLES, NUM_RUNS, target_sampler=sampler
    )
    params = twist.params
    frozen = jax.lax.stop_gradient(params)
    exact_grad = jax.grad(lambda p: exact_objective(method, program, args, twist, p, frozen))(
        params
    )
    exact_grad = np.concatenate([np.asarray(g).ravel() for g in exact_grad]).astype(np.float64)
    assert np.linalg.norm(exact_grad) > 1e-3
    mean, error, expected = projected_gradients(estimates, exact_grad)
    assert estimates.shape[0] == NUM_RUNS
    z = (mean - expected) / error
    print(
        method,
        target,
        exact_positives,
        "z =",
        np.round(z, 2),
        "rel =",
        (mean - expected)[0] / expected[0],
    )
    assert_within_standard_errors(mean, expected, k=4, standard_error=error)
    assert abs(mean[0] - expected[0]) < 0.1 * abs(expected[0])
