"""DeRa global mode: the exact sequence-level mixture σ ∝ π_ref^(1−λ) π_aligned^λ φ.

Exact enumeration must equal brute force computed in NumPy from the two models alone;
SMC and importance sampling must be unbiased for Z_λ and their weighted samples must
approach σ; twisted SMC with the optimal twist must be exact on every run; a λ sweep of
the compiled SMC sweep is one vmap.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from numpyro.infer.util import log_density

import lmppl
from tests.fixtures import all_sequences
from tests.realign.realign_models import (
    PAIRS,
    PROMPT,
    log_sum_exp,
    sequence_log_probs,
    step_log_probs,
)
from tests.statistical import assert_within_standard_errors, mean_and_standard_error

STEPS = 3
NUM_RUNS = 300


def likes_c(s):
    """An extra potential: the program's own ``numpyro.factor``."""
    return 1.2 * jnp.sum(s == 4, axis=-1) - 0.6 * jnp.sum(s == 2, axis=-1)


def make_program(model, factor: bool, stop_at_eos: bool):
    def program():
        s = numpyro.sample("s", lmppl.LM(model, PROMPT, STEPS, stop_at_eos=stop_at_eos))
        if factor:
            numpyro.factor("likes_c", likes_c(s))

    return program


def brute_force(pair: str, lam: float, factor: bool, stop_at_eos: bool):
    """``(sequences, log σ̃)`` in NumPy: (1−λ) log π_ref(s) + λ log π_al(s) + log φ(s)."""
    ref, aligned = PAIRS[pair]
    sequences = all_sequences(ref.vocab_size, STEPS)
    prompt_ids = ref.tokenizer.encode(PROMPT)
    eos = 1 if stop_at_eos else None
    log_ref = sequence_log_probs(step_log_probs(ref, prompt_ids, sequences), sequences, eos)
    log_aligned = sequence_log_probs(step_log_probs(aligned, prompt_ids, sequences), sequences, eos)
    valid = np.isfinite(log_ref)  # EOS padding rule; both models agree on it
    with np.errstate(invalid="ignore"):
        log_target = np.where(valid, (1 - lam) * log_ref + lam * log_aligned, -np.inf)
    if factor:
        log_target = log_target + np.asarray(likes_c(jnp.asarray(sequences)), np.float64)
    return sequences, log_target


CASES = [
    ("table", 0.5, False, False),
    ("table", 2.0, False, False),
    ("table", 0.5, True, False),
    ("table", 2.0, True, True),
    ("table", -0.7, True, False),
    ("transformer", 0.5, True, False),
    ("transformer", 2.0, False, True),
]


@pytest.mark.parametrize(("pair", "lam", "factor", "stop_at_eos"), CASES)
def test_exact_is_the_geometric_mixture(pair, lam, factor, stop_at_eos):
    realigned = lmppl.realign(*PAIRS[pair], lam, mode="global")
    program = make_program(realigned, factor, stop_at_eos)
    result = lmppl.infer.Exact(program).run(None)
    sequences, log_target = brute_force(pair, lam, factor, stop_at_eos)
    # log Z = log Σ_s π_ref^(1−λ) π_al^λ φ.
    assert float(result.log_marginal) == pytest.approx(log_sum_exp(log_target), abs=2e-5)
    # σ, sequence by sequence, on the same support.
    want = {tuple(s): v for s, v in zip(sequences.tolist(), log_target, strict=True)}
    got = dict(
        zip(
            map(tuple, np.asarray(result.samples["s"]).tolist()),
            np.asarray(result.log_weights, np.float64),
            strict=True,
        )
    )
    assert set(got) == {s for s, v in want.items() if np.isfinite(v)}
    for seq, value in got.items():
        assert value == pytest.approx(want[seq], abs=2e-5)
    # The normalised σ too (what the weighted result reports).
    sigma = np.exp(log_target - log_sum_exp(log_target))
    weights = dict(zip(got, np.asarray(result.weights, np.float64), strict=True))
    assert (
        max(
            abs(weights[s] - sigma[i])
            for i, s in enumerate(map(tuple, sequences.tolist()))
            if s in weights
        )
        < 1e-5
    )
    # NumPyro's own log_density sees the same unnormalised target.
    index = int(np.argmax(np.isfinite(log_target) * np.arange(len(sequences))))
    seq = jnp.asarray(sequences[index])
    value = float(log_density(program, (), {}, {"s": seq})[0])
    assert value == pytest.approx(log_target[index], abs=2e-5)


def test_global_endpoints_are_the_models_with_unit_normaliser():
    for lam in (0.0, 1.0):
        program = make_program(lmppl.realign(*PAIRS["table"], lam, mode="global"), False, True)
        assert float(lmppl.infer.Exact(program).run(None).log_marginal) == pytest.approx(
            0.0, abs=1e-5
        )


def ratio_mean_and_error(log_marginals, log_z):
    return mean_and_standard_error(np.exp(np.asarray(log_marginals, np.float64) - log_z))


BACKENDS = {
    "smc_always": lambda p: lmppl.infer.SMC(p, 8, ess_threshold=1.0),
    "smc_adaptive": lambda p: lmppl.infer.SMC(p, 8, resampling="systematic"),
    "is": lambda p: lmppl.infer.ImportanceSampling(p, 8),
}


@pytest.mark.parametrize(
    ("pair", "lam", "factor", "stop_at_eos", "backend"),
    [
        ("table", 0.5, True, False, "smc_always"),
        ("table", 2.0, True, False, "smc_always"),
        ("table", 0.5, False, True, "smc_adaptive"),
        ("table", 2.0, True, True, "is"),
        ("transformer", 0.5, True, False, "smc_always"),
        ("transformer", 2.0, False, False, "smc_always"),
    ],
)
def test_marginal_likelihood_is_unbiased(pair, lam, factor, stop_at_eos, backend):
    """E[Ẑ] = Z_λ: the mean of Ẑ/Z over 300 runs is 1 within 4 standard errors."""
    _, log_target = brute_force(pair, lam, factor, stop_at_eos)
    log_z = log_sum_exp(log_target)
    realigned = lmppl.realign(*PAIRS[pair], lam, mode="global")
    program = make_program(realigned, factor, stop_at_eos)
    estimates = BACKENDS[backend](program).log_marginals(jax.random.key(11), NUM_RUNS)
    mean, error = ratio_mean_and_error(estimates, log_z)
    assert error > 0
    assert_within_standard_errors(mean, 1.0, k=4, standard_error=error)
    # The check can tell the global target from the token-mode one (no increments).
    token = make_program(lmppl.realign(*PAIRS[pair], lam), factor, stop_at_eos)
    log_z_token = float(lmppl.infer.Exact(token).run(None).log_marginal)
    assert abs(np.exp(log_z_token - log_z) - 1.0) > 10 * error


def total_variation(result, sequences, sigma) -> float:
    target = {tuple(s): p for s, p in zip(sequences.tolist(), sigma, strict=True)}
    approx: dict = {}
    for seq, w in zip(
        map(tuple, np.asarray(result.samples["s"]).tolist()),
        np.asarray(result.weights, np.float64),
        strict=True,
    ):
        approx[seq] = approx.get(seq, 0.0) + w
    keys = set(target) | set(approx)
    return 0.5 * sum(abs(target.get(k, 0.0) - approx.get(k, 0.0)) for k in keys)


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_weighted_samples_approach_sigma(lam):
    sequences, log_target = brute_force("table", lam, True, False)
    sigma = np.exp(log_target - log_sum_exp(log_target))
    program = make_program(lmppl.realign(*PAIRS["table"], lam, mode="global"), True, False)
    distances = []
    for num in (16, 256, 4096, 16384):
        sampler = lmppl.infer.SMC(program, num, ess_threshold=1.0)
        runs = [sampler.run(jax.random.key(seed)) for seed in range(4)]
        distances.append(np.mean([total_variation(r, sequences, sigma) for r in runs]))
    assert distances[0] > distances[1] > distances[2] > distances[3], distances
    assert distances[3] < 0.05, distances
    # The token-mode law (the proposal alone) is much farther from σ: the weights matter.
    proposal = make_program(lmppl.realign(*PAIRS["table"], lam), True, False)
    proposal_tv = total_variation(lmppl.infer.Exact(proposal).run(None), sequences, sigma)
    assert proposal_tv > 2.5 * distances[3], (proposal_tv, distances)


def test_twisted_smc_with_the_optimal_twist_is_exact_on_every_run():
    realigned = lmppl.realign(*PAIRS["table"], 2.0, mode="global")
    program = make_program(realigned, True, True)
    exact = lmppl.infer.Exact(program)
    log_z = float(exact.run(None).log_marginal)
    sampler = lmppl.infer.TwistedSMC(program, 4, twists={"s": exact.optimal_twist()})
    estimates = np.asarray(sampler.log_marginals(jax.random.key(3), 20))
    np.testing.assert_allclose(estimates, log_z, atol=5e-5)


def test_lambda_sweep_of_the_smc_sweep_is_one_vmap():
    """One vmap over λ of the compiled sweep equals the Python loop over λ."""
    lams = jnp.asarray([0.0, 0.5, 1.0, 2.0], jnp.float32)
    realigned = lmppl.realign(*PAIRS["table"], 0.0, mode="global")
    program = make_program(realigned, True, False)
    smc = lmppl.infer.SMC(program, 16, ess_threshold=1.0)
    structure, sweep, arrays, _ = smc.compile()
    key = jax.random.key(5)

    def at(lam):  # the models' parameters keyed by model, λ replaced
        return structure.model_params({realigned.name: realigned.with_lam(realigned.params, lam)})

    def log_marginal(lam):
        return sweep(key, at(lam), None, arrays, None).log_marginal

    swept = np.asarray(jax.vmap(log_marginal)(lams))
    loop = np.asarray([log_marginal(float(lam)) for lam in lams])
    np.testing.assert_allclose(swept, loop, atol=1e-5)
    # Many runs per λ: Ẑ/Z is unbiased at every λ of the sweep.
    keys = jax.random.split(jax.random.key(9), NUM_RUNS)
    many = jax.vmap(
        jax.vmap(
            lambda lam, k: sweep(k, at(lam), None, arrays, None).log_marginal,
            in_axes=(None, 0),
        ),
        in_axes=(0, None),
    )(lams, keys)
    for lam, estimates in zip(np.asarray(lams), np.asarray(many), strict=True):
        _, log_target = brute_force("table", float(lam), True, False)
        mean, error = ratio_mean_and_error(estimates, log_sum_exp(log_target))
        assert_within_standard_errors(
            mean, 1.0, k=4, standard_error=error, atol=1e-6, context=f"lambda {lam}"
        )


def test_temperature_must_be_one():
    realigned = lmppl.realign(*PAIRS["table"], 0.5, mode="global")
    with pytest.raises(
        ValueError, match="unnormalised sequence-level logits: temperature must be 1"
    ):
        lmppl.LM(realigned, PROMPT, STEPS, temperature=0.7)
    with pytest.raises(ValueError, match="temperature must be 1"):
        lmppl.generate(realigned, PROMPT, max_new_tokens=STEPS, temperature=0.7)
    lmppl.generate(realigned, PROMPT, max_new_tokens=STEPS, temperature=0.0)  # greedy is fine


def test_sampling_a_global_model_draws_from_the_token_mode_law():
    """``generate``/``LM.sample`` propose from softmax(m_t): the same draws as token mode."""
    ref, aligned = PAIRS["table"]
    key = jax.random.key(2)
    a = lmppl.generate(
        lmppl.realign(ref, aligned, 2.0, mode="global"),
        PROMPT,
        num_samples=32,
        max_new_tokens=4,
        rng_key=key,
    )
    b = lmppl.generate(
        lmppl.realign(ref, aligned, 2.0), PROMPT, num_samples=32, max_new_tokens=4, rng_key=key
    )
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


@pytest.mark.slow
def test_stories260k_global_mode_smoke():
    """A real model and a perturbed copy: Ẑ ≤ 1 for λ ∈ [0, 1] (Hölder), Ẑ = 1 at λ = 0,
    and the site's log_prob is (1−λ) log π_ref + λ log π_aligned on SMC's samples."""
    ref = lmppl.load("stories260k")
    aligned = ref.astype(jnp.float32)
    leaves, tree = jax.tree.flatten(ref.params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    aligned.params = jax.tree.unflatten(
        tree,
        [
            x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ],
    )
    prompt, steps = "Once upon a time", 12
    for lam, bound in ((0.0, "equal"), (0.5, "below")):
        realigned = lmppl.realign(ref, aligned, lam, mode="global")

        def program(realigned=realigned):
            numpyro.sample("story", lmppl.LM(realigned, prompt, steps))

        smc = lmppl.infer.SMC(program, 32, ess_threshold=1.0)
        estimates = np.asarray(smc.log_marginals(jax.random.key(1), 4))
        assert np.isfinite(estimates).all()
        if bound == "equal":
            np.testing.assert_allclose(estimates, 0.0, atol=1e-4)
        else:
            assert (estimates <= 1e-4).all() and estimates.min() < -1e-3, estimates
        result = smc.run(jax.random.key(2))
        story = result.samples["story"]
        got = lmppl.LM(realigned, prompt, steps).log_prob(story)
        want = (1 - lam) * lmppl.LM(ref, prompt, steps).log_prob(story) + lam * lmppl.LM(
            aligned, prompt, steps
        ).log_prob(story)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3)
        assert all(isinstance(t, str) for t in result.text("story"))
