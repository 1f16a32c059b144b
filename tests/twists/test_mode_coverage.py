"""CTL must not drop a mode of σ, and a twist that does must be flagged by its bounds.

The target (tiny table LM, every sequence enumerable) has two modes of equal σ mass: the
most likely sequence A under p0 (p0 ≈ 0.15) and a rare one B (p0 ≈ 0.003), φ = 0
elsewhere. With SIS positives an MLP twist learns A first, the proposal stops visiting B
and never learns it (exact KL(σ‖q) ≈ 8–11 nats over seeds); with the default defensive
mixture of p0 rollouts in the batch both modes are learned (KL < 0.01).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import lmppl
from lmppl.twists.monitor import TwistGapWarning
from tests.twists.enumeration import LM, enumerate_samples, log_q

STEPS = 3


def _two_mode_target():
    def p0_only():
        numpyro.sample("s", lmppl.LM(LM, "a", STEPS, stop_at_eos=False))

    exact = lmppl.infer.Exact(p0_only).run(None)
    codes = np.asarray(exact.samples["s"]) @ np.array([25, 5, 1])
    log_p0 = np.full(125, -np.inf)
    log_p0[codes] = np.asarray(jax.nn.log_softmax(exact.log_weights))
    order = np.argsort(log_p0)
    mode_a = order[-1]
    mode_b = order[np.argmin(np.abs(log_p0[order] - np.log(0.003)))]
    log_phi = np.full(125, -np.inf)
    log_phi[mode_b] = 0.0
    log_phi[mode_a] = log_p0[mode_b] - log_p0[mode_a]  # σ(A) = σ(B) = 1/2
    table = jnp.asarray(log_phi, jnp.float32)

    def two_modes():
        s = numpyro.sample("s", lmppl.LM(LM, "a", STEPS, stop_at_eos=False))
        numpyro.factor("phi", table[s[0] * 25 + s[1] * 5 + s[2]])

    return two_modes, np.exp(log_p0[[mode_a, mode_b]])


def _kl_sigma_q(program, twist) -> float:
    samples = enumerate_samples(program, (), twist, twist.params)
    log_sigma = np.asarray(jax.nn.log_softmax(samples.log_weights), np.float64)
    lq = np.asarray(log_q(samples), np.float64)
    keep = np.isfinite(log_sigma)
    return float(np.sum(np.exp(log_sigma[keep]) * (log_sigma[keep] - lq[keep])))


@pytest.fixture(scope="module")
def target():
    program, p0_modes = _two_mode_target()
    assert p0_modes[0] > 0.1 and 0.002 < p0_modes[1] < 0.005
    exact = lmppl.evaluation.enumeration_sample(program, jax.random.key(7), 64)
    assert len({tuple(row) for row in exact.samples.tolist()}) == 2
    return program, exact


def _train(program, exact, batch, **options):
    twist = lmppl.twists.MLPTwist(LM, hidden_size=32, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained, history = lmppl.twists.fit(
            program,
            twist,
            "ctl",
            num_steps=200,
            num_particles=32,
            learning_rate=1e-2,
            rng_key=jax.random.key(0),
            batch=batch,
            eval_every=100,
            exact_samples=exact,
            eval_particles=16,
            eval_runs=16,
            progress=False,
            **options,
        )
    gap_warnings = [w for w in caught if issubclass(w.category, TwistGapWarning)]
    return trained, history, gap_warnings


@pytest.fixture(scope="module")
def trained(target):
    program, exact = target
    return {batch: _train(program, exact, batch) for batch in ("proposal", "mixture")}


def test_sis_positives_drop_a_mode_and_the_bounds_say_so(target, trained):
    program, exact = target
    trained, history, gap_warnings = trained["proposal"]
    kl = _kl_sigma_q(program, trained)
    print("SIS positives: exact KL(σ‖q) =", kl, "gaps", history["bound_gap"][99::100])
    assert kl > 2.0  # half of σ's mass is (all but) never proposed
    gaps = np.asarray(history["bound_gap"])
    assert np.isnan(gaps[[0, 50, 150]]).all() and np.isfinite(gaps[[99, 199]]).all()
    assert history["best_step"] in (100, 200)
    assert min(gaps[99], gaps[199]) > 1.0
    assert len(gap_warnings) == 1 and "nats apart" in str(gap_warnings[0].message)


def test_default_mixture_batch_keeps_both_modes(target, trained):
    program, exact = target
    trained, history, gap_warnings = trained["mixture"]
    kl = _kl_sigma_q(program, trained)
    print("mixture: exact KL(σ‖q) =", kl, "gaps", history["bound_gap"][99::100])
    assert kl < 0.05
    assert not gap_warnings
    assert abs(history["bound_gap"][history["best_step"] - 1]) < 0.2


def test_exact_positives_keep_both_modes_even_with_sis_negatives(target):
    """Positives from a pool of exact σ samples (held apart from the evaluation's): the σ
    term of CTL's gradient sees both modes from the first step, so even the SIS batch's
    negatives (which alone drop B) learn both."""
    program, exact = target
    pool = lmppl.evaluation.enumeration_sample(program, jax.random.key(11), 64)
    sampler = lmppl.twists.pool_sampler(pool)
    trained, history, gap_warnings = _train(program, exact, "proposal", target_sampler=sampler)
    kl = _kl_sigma_q(program, trained)
    samples = enumerate_samples(program, (), trained, trained.params)
    modes = np.isfinite(np.asarray(samples.log_weights))
    q_modes = np.exp(np.asarray(log_q(samples), np.float64)[modes])
    print("exact positives, SIS negatives: KL(σ‖q) =", kl, "q(modes) =", q_modes)
    # a dropped mode has q(B) ≈ 0 and KL(σ‖q) ≥ ½ log(½ / q(B)) > 2 (the SIS-positive run)
    assert len(q_modes) == 2 and np.all(q_modes > 0.3)
    assert kl < 0.1
    assert not gap_warnings


def test_pool_sampler_draws_rows_of_the_pool_uniformly():
    pool = np.array([[1, 2], [3, 4], [0, 0]], np.int32)
    draws = np.asarray(
        jax.jit(lmppl.twists.pool_sampler(pool), static_argnums=1)(jax.random.key(0), 3000)
    )
    assert draws.shape == (3000, 2) and draws.dtype == np.int32
    rows, counts = np.unique(draws, axis=0, return_counts=True)
    assert sorted(map(tuple, rows.tolist())) == [(0, 0), (1, 2), (3, 4)]
    assert np.all(np.abs(counts - 1000) < 4 * np.sqrt(3000 * (1 / 3) * (2 / 3)))
    with pytest.raises(ValueError, match=r"\[M, T\] token ids"):
        lmppl.twists.pool_sampler(np.zeros((0, 2), np.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        lmppl.twists.pool_sampler(np.zeros((2, 2)))
    joint = lmppl.evaluation.ExactSamples(pool, "s", conditions=np.zeros((3, 1)))
    with pytest.raises(ValueError, match="its own condition"):
        lmppl.twists.pool_sampler(joint)


def test_diagnose_gives_the_verdict_the_exact_kl_implies(target, trained):
    program, exact = target
    verdicts = {}
    for batch, (twist, _, _) in trained.items():
        sampler = lmppl.infer.TwistedSMC(program, 16, twists={"s": twist})
        verdicts[batch] = lmppl.evaluation.diagnose(
            program, sampler, jax.random.key(5), exact=exact, num_runs=16
        )
        print(verdicts[batch])
    dropped, kept = verdicts["proposal"], verdicts["mixture"]
    assert dropped.trusted is False and dropped.gap > 1.0 and "NOT trustworthy" in dropped.verdict
    assert kept.trusted is True and abs(kept.gap) < 0.2 and kept.ess > 0.5
    # the dropped-mode sampler is precise: a small spread, which the verdict must not trust
    assert np.std(dropped.lower.values) < 0.1
    unverified = lmppl.evaluation.diagnose(
        program,
        lmppl.infer.TwistedSMC(program, 16, twists={"s": trained["proposal"][0]}),
        jax.random.key(6),
        num_runs=4,
    )
    assert unverified.trusted is None and unverified.upper is None
    assert "unverified" in unverified.verdict and "says nothing about bias" in unverified.verdict


def test_bad_batch_and_evaluation_arguments_are_named(target):
    program, exact = target
    twist = lmppl.twists.MLPTwist(LM, hidden_size=8)
    common = dict(num_steps=1, num_particles=4, rng_key=jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match="batch must be one of"):
        lmppl.twists.fit(program, twist, "ctl", batch="smc", **common)
    with pytest.raises(ValueError, match="eval_every"):
        lmppl.twists.fit(program, twist, "ctl", exact_samples=exact, **common)
    with pytest.raises(ValueError, match="eval_every must be a positive integer"):
        lmppl.twists.fit(program, twist, "ctl", eval_every=0, **common)


def test_mixture_weights_match_the_balance_heuristic():
    """``defensive_mixture`` weights σ̃ / (α q + (1 − α) p0) and p0 ψ_t / m_t, by enumeration."""
    from lmppl.twists.mixture import defensive_mixture
    from tests.twists.enumeration import classifier

    twist = lmppl.twists.TabularTwist(5, STEPS)
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.normal(size=np.shape(p)), jnp.float32) for p in twist.params]
    every = enumerate_samples(classifier, (), twist, params)  # all 125 sequences
    split = 40

    def rows(start, stop):
        part = jax.tree.map(lambda x: x[start:stop], every._replace(log_weight_history=None))
        return part._replace(log_weight_history=jnp.zeros((STEPS, stop - start)))

    pooled = defensive_mixture(rows(0, split), rows(split, 125))
    alpha = split / 125
    cum_p0 = np.cumsum(np.asarray(every.log_p0_tokens(), np.float64), 1)
    cum_q = np.cumsum(np.asarray(every.log_q_tokens(), np.float64), 1)
    log_mixture = np.logaddexp(np.log(alpha) + cum_q, np.log(1 - alpha) + cum_p0)
    log_phi = np.asarray(every.log_potential, np.float64)
    np.testing.assert_allclose(
        np.asarray(pooled.log_weights), cum_p0[:, -1] + log_phi - log_mixture[:, -1], atol=1e-4
    )
    psi = np.asarray(every.log_psi_tokens(), np.float64)
    np.testing.assert_allclose(
        np.asarray(pooled.log_weight_history).T, cum_p0 + psi - log_mixture, atol=1e-4
    )
