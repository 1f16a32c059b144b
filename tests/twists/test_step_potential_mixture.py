"""Twist training with per-step potentials m_t on the default mixture batch, by enumeration.

With per-step potentials (a banned token; a regex automaton, whose state the potential
carries) the untwisted sweep draws from ``q0_t ∝ p0 m_t`` and the twisted one from
``q_t ∝ p0 m_t ψ_t``; the targets are ``π_t ∝ p0 Π_{k≤t} m_k ψ_t`` and
``σ ∝ p0 Π m φ``. The defensive mixture must weight its pooled draws with exactly these
densities: each loss's mean gradient estimate is compared with the exact gradient of its
stated objective (every sequence enumerated), within Monte Carlo standard errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import lmppl
from lmppl import potentials
from lmppl.infer.program import ProgramError
from lmppl.twists.mixture import defensive_mixture
from tests.fixtures import SMALL_LM, banned, table_lm
from tests.statistical import assert_within_standard_errors
from tests.twists.enumeration import (
    enumerate_samples,
    estimated_gradients,
    log_q,
    projected_gradients,
    rl_squared_residuals,
)

REGEX_LM = table_lm(("a", "b", "ab"), context_length=12, seed=4, scale=1.2)  # <s> </s> a b ab
AUTOMATON = potentials.regex("(ab|b)+a?", REGEX_LM)
BANNED = 3  # token "b" of SMALL_LM (tests.fixtures.banned forbids it)


def regex():
    """A stateful per-step constraint (the automaton's state) with EOS, and a factor."""
    s = numpyro.sample("s", lmppl.LM(REGEX_LM, "a", 3))
    potentials.constrain("pattern", s, AUTOMATON)
    numpyro.factor("likes_a", 0.8 * jnp.sum(s == 2))


PROGRAMS = {"banned": banned, "regex": regex}
NUM_PARTICLES = 128
NUM_RUNS = 128


def random_twist(program, seed=0):
    site = lmppl.infer.discover(program, (), {}).lm_site
    twist = lmppl.twists.TabularTwist(site.model.vocab_size, site.max_new_tokens)
    keys = jax.random.split(jax.random.key(seed), len(twist.params))
    params = [0.7 * jax.random.normal(k, p.shape) for k, p in zip(keys, twist.params, strict=True)]
    return twist.with_params(params)


def _masked(weights, values):
    """``Σ weights · values`` with ``0 · ±inf = 0`` (sequences outside the support)."""
    return jnp.sum(jnp.where(weights > 0, weights * values, 0.0))


def exact_objective(method, program, twist, params, frozen):
    """Each loss's stated objective by enumeration, with σ ∝ p0 Π m φ, π_t ∝ p0 Π_{k≤t} m_k ψ_t
    and q ∝ p0 m ψ (the sweep's densities)."""
    samples = enumerate_samples(program, (), twist, params)
    sigma = jax.nn.softmax(samples.log_weights)
    log_psi = samples.log_psi_tokens()  # [M, T]
    if method == "ctl":
        # Z_t = Σ_s p0(s) Π_{k≤t} m_k ψ_t(s_1:t): the suffix after t weighs by p0 alone
        prefix = jnp.cumsum(samples.log_target_tokens(), axis=1)  # log p0 Π_{k≤t} m_k
        cum_p0 = jnp.cumsum(samples.log_p0_tokens(), axis=1)
        suffix = cum_p0[:, -1:] - cum_p0
        log_normalizers = jax.scipy.special.logsumexp(prefix + suffix + log_psi, axis=0)
        return jnp.sum(log_normalizers) - _masked(sigma[:, None], log_psi)
    if method == "dpg":
        return -_masked(sigma, log_q(samples))
    if method == "rl":  # an expectation under q: the sequences q can draw (no dead states)
        fixed = enumerate_samples(program, (), twist, frozen)
        keep = np.asarray(jnp.exp(log_q(fixed)) > 0)
        fixed = jax.tree.map(lambda x: x[keep], fixed._replace(log_weight_history=None))
        log_psi = log_psi[keep]
        return _masked(jnp.exp(log_q(fixed)), rl_squared_residuals(fixed, log_psi))
    raise ValueError(method)


def test_step_densities_by_enumeration():
    """q ∝ p0 m ψ and q0 ∝ p0 m are distributions on σ's support; p0 Π m φ is Exact's σ̃;
    the pooled weights are the balance heuristic with q0 (not p0) as the second component."""
    for name, program in PROGRAMS.items():
        twist = random_twist(program)
        every = enumerate_samples(program, (), twist, twist.params)
        exact = lmppl.infer.Exact(program).run(None)
        # (a sequence through a dead automaton state has no proposal row: NaN, never drawn)
        dead = lambda x: np.where(np.isnan(x), -np.inf, np.asarray(x, np.float64))
        lq = dead(log_q(every))
        lq0 = dead(every.log_base_q_tokens().sum(1))
        target = np.asarray(every.log_target_tokens().sum(1), np.float64)
        print(name, "Σq =", np.exp(lq).sum(), "Σq0 =", np.exp(lq0).sum())
        assert np.exp(lq).sum() == pytest.approx(1.0, abs=1e-5)
        assert np.exp(lq0).sum() == pytest.approx(1.0, abs=1e-5)
        support = np.isfinite(np.asarray(exact.log_weights))
        assert 0 < support.sum() < len(support)  # the step potential forbids some sequences
        assert np.all(np.isneginf(lq[~support])) and np.all(np.isneginf(lq0[~support]))
        # log p0 Π m + log φ (φ without m, as the sweep reports it) is Exact's log σ̃
        log_phi = np.asarray(exact.log_potential, np.float64)  # = Σ log m + log φ on support
        np.testing.assert_allclose(
            target[support] + log_phi[support],
            np.asarray(exact.log_weights, np.float64)[support],
            atol=1e-4,
        )
        split = 40
        first, second = (
            jax.tree.map(lambda x, a=a, b=b: x[a:b], every)._replace(
                log_weight_history=jnp.zeros((3, b - a))
            )
            for a, b in ((0, split), (split, len(lq)))
        )
        pooled = defensive_mixture(first, second)
        alpha = split / len(lq)
        cum_target = np.cumsum(np.asarray(every.log_target_tokens(), np.float64), 1)
        cum_q = np.cumsum(np.asarray(every.log_q_tokens(), np.float64)[support], 1)
        cum_q0 = np.cumsum(np.asarray(every.log_base_q_tokens(), np.float64)[support], 1)
        mixture = np.logaddexp(np.log(alpha) + cum_q, np.log(1 - alpha) + cum_q0)
        psi = np.asarray(every.log_psi_tokens(), np.float64)[support]
        history = np.asarray(pooled.log_weight_history, np.float64).T[support]
        # (sequences off the support are never drawn: their weights are not checked)
        expected = cum_target[support] + psi - mixture
        np.testing.assert_allclose(history, expected, atol=1e-4)
        log_phi = np.asarray(every.log_potential, np.float64)[support]
        final = cum_target[support, -1] + log_phi - mixture[:, -1]
        np.testing.assert_allclose(np.asarray(pooled.log_weights)[support], final, atol=1e-4)


CASES = [
    ("ctl", "banned", "mixture"),
    ("ctl", "regex", "mixture"),
    ("dpg", "banned", "mixture"),
    ("rl", "regex", "proposal"),
]


@pytest.mark.parametrize(("method", "target", "batch"), CASES)
def test_gradient_estimate_matches_exact_gradient(method, target, batch):
    """The mean estimated gradient, projected on the exact gradient and on random
    directions, agrees with the exact one within 4 Monte Carlo standard errors."""
    program = PROGRAMS[target]
    twist = random_twist(program)
    estimates = estimated_gradients(
        program, (), twist, method, NUM_PARTICLES, NUM_RUNS, batch=batch
    )
    params = twist.params
    frozen = jax.lax.stop_gradient(params)
    exact_grad = jax.grad(lambda p: exact_objective(method, program, twist, p, frozen))(params)
    exact_grad = np.concatenate([np.asarray(g).ravel() for g in exact_grad]).astype(np.float64)
    assert np.all(np.isfinite(exact_grad)) and np.linalg.norm(exact_grad) > 1e-3
    mean, error, expected = projected_gradients(estimates, exact_grad)
    print(method, target, batch, "z =", np.round((mean - expected) / error, 2))
    assert_within_standard_errors(mean, expected, k=4, standard_error=error)
    assert abs(mean[0] - expected[0]) < 0.1 * abs(expected[0])


def kl_sigma_q(program, twist) -> float:
    """Exact KL(σ‖q) of the twist-induced proposal q ∝ p0 m ψ (a sum over σ's support)."""
    samples = enumerate_samples(program, (), twist, twist.params)
    log_sigma = np.asarray(jax.nn.log_softmax(samples.log_weights), np.float64)
    keep = np.isfinite(log_sigma)
    lq = np.asarray(log_q(samples), np.float64)[keep]
    return float(np.sum(np.exp(log_sigma[keep]) * (log_sigma[keep] - lq)))


def test_fit_with_defaults_learns_the_constrained_target():
    """``fit(..., "ctl")`` with the default mixture batch on a banned-token program: the
    twist's exact KL(σ‖q) drops far below the untwisted proposal's (q0 ∝ p0 m, already
    constrained; p0's own KL(σ‖p0) is infinite, p0 draws the banned token), towards
    Exact's optimal twist's (zero); twisted SMC with it never samples the banned token."""
    twist = lmppl.twists.TabularTwist(SMALL_LM.vocab_size, 3)
    trained, history = lmppl.twists.fit(
        banned,
        twist,
        "ctl",
        num_steps=200,
        num_particles=64,
        learning_rate=0.05,
        rng_key=jax.random.key(0),
        progress=False,
    )
    assert np.all(np.isfinite(history["loss"]))
    before, after = kl_sigma_q(banned, twist), kl_sigma_q(banned, trained)
    optimal = lmppl.infer.Exact(banned).optimal_twist()  # ψ*_t, the same table layout
    optimal_kl = kl_sigma_q(banned, twist.with_params([jnp.asarray(t) for t in optimal.log_psi]))
    print(f"KL(σ‖q): untwisted {before:.4f}, trained {after:.4f}, optimal {optimal_kl:.2e}")
    assert before > 0.1
    assert abs(optimal_kl) < 1e-4
    assert after < 0.1 * before
    sampler = lmppl.infer.TwistedSMC(banned, 64, {"s": trained})
    result = sampler.run(jax.random.key(3))
    assert not np.any(np.asarray(result.samples["s"]) == BANNED)


def with_prefix_latent():
    z = numpyro.sample("z", dist.Categorical(probs=jnp.ones(2) / 2))
    s = numpyro.sample("s", lmppl.LM(SMALL_LM, "a", 3, stop_at_eos=False))
    potentials.banned_tokens("no_b", s, [BANNED], SMALL_LM.vocab_size)
    numpyro.factor("likes_c", z * jnp.sum(s == 4))


@pytest.mark.parametrize(
    ("program", "method", "batch", "message"),
    [
        (banned, "sixo", "mixture", "does not support method='sixo'"),
        (banned, "sixo", "proposal", "does not support method='sixo'"),
        (banned, "fudge", "mixture", "does not support method='fudge'"),
        (with_prefix_latent, "ctl", "mixture", "latent sites before the LM site \\(z\\)"),
        (with_prefix_latent, "rl", "proposal", "supports method='ctl' with batch='proposal'"),
    ],
)
def test_unsupported_losses_are_refused_in_one_line(program, method, batch, message):
    site = lmppl.infer.discover(program, (), {}).lm_site
    output = "log_sigmoid" if method == "fudge" else "log"
    twist = lmppl.twists.TabularTwist(site.model.vocab_size, 3, output=output)
    with pytest.raises(ProgramError, match=message) as error:
        lmppl.twists.fit(
            program,
            twist,
            method,
            num_steps=1,
            num_particles=4,
            rng_key=jax.random.key(0),
            batch=batch,
            progress=False,
        )
    assert "\n" not in str(error.value) and "no_b" in str(error.value)
