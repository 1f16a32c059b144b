"""DeRa between two T5 checkpoints sharing a vocabulary and a source.

``lmppl.realign(ref, aligned, λ)`` of two tiny random ``T5ForConditionalGeneration`` folders
(same tokenizer, different weights), conditioned with ``LM(r, source=..., ...)``: each model
runs its own encoder on the shared source. Checked against transformers' teacher-forced
log-probabilities of each model alone (a path through neither lmppl's networks nor its
decoding): λ = 0 / 1 reproduce ref / aligned in both modes; in token mode every step is the
normalised ``softmax(λ log π_al + (1 − λ) log π_ref)``; in global mode ``Exact`` gives
``log Σ_s π_ref^(1−λ) π_al^λ φ`` and SMC's ``Ẑ`` is unbiased for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from jax.scipy.special import logsumexp

import lmppl
from tests.fixtures import all_sequences
from tests.lm.t5_models import t5_folder, torch_log_probs
from tests.lm.test_t5_lm import expected_log_probs
from tests.statistical import assert_within_standard_errors

STEPS = 3
EOS = 1
SEQUENCES = all_sequences(6, STEPS)
TEXT, SOURCE_IDS = "abca", [3, 4, 5, 3, EOS]
(REF_FOLDER, REF_TORCH), (AL_FOLDER, AL_TORCH) = t5_folder("gated", 0), t5_folder("gated", 1)
REF, ALIGNED = lmppl.load(str(REF_FOLDER)), lmppl.load(str(AL_FOLDER))
LOG_REF = torch_log_probs(REF_TORCH, SOURCE_IDS, SEQUENCES)  # [M, T, V]
LOG_AL = torch_log_probs(AL_TORCH, SOURCE_IDS, SEQUENCES)
_MODELS: dict = {}


def realigned(mode: str):
    if mode not in _MODELS:
        _MODELS[mode] = lmppl.realign(REF, ALIGNED, 0.0, mode=mode)
    return _MODELS[mode]


def log_probs(model, lam: float, stop_at_eos: bool) -> np.ndarray:
    dist = lmppl.LM(
        model,
        source=TEXT,
        max_new_tokens=STEPS,
        stop_at_eos=stop_at_eos,
        params=model.with_lam(model.params, lam),
    )
    return np.asarray(dist.log_prob(jnp.asarray(SEQUENCES)), np.float64)


def assert_close(got: np.ndarray, want: np.ndarray, tolerance: float = 1e-4) -> float:
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    finite = np.isfinite(want)
    difference = float(np.abs(got[finite] - want[finite]).max())
    assert difference <= tolerance, difference
    return difference


@pytest.mark.parametrize("mode", ["token", "global"])
def test_endpoints_reproduce_reference_and_aligned(mode):
    model = realigned(mode)
    assert model.is_encoder_decoder
    for lam, reference in ((0.0, LOG_REF), (1.0, LOG_AL)):
        for stop_at_eos in (False, True):
            want = expected_log_probs(reference, SEQUENCES, EOS if stop_at_eos else None)
            difference = assert_close(log_probs(model, lam, stop_at_eos), want)
            print(f"{mode} λ={lam} stop_at_eos={stop_at_eos}: max |Δ| {difference:.2e}")


@pytest.mark.parametrize("lam", [0.5, 1.7])
def test_token_mode_is_the_normalised_per_step_mixture(lam):
    mixed = lam * LOG_AL + (1 - lam) * LOG_REF
    per_step = mixed - logsumexp(mixed, axis=-1, keepdims=True)
    for stop_at_eos in (False, True):
        got = log_probs(realigned("token"), lam, stop_at_eos)
        want = expected_log_probs(np.asarray(per_step), SEQUENCES, EOS if stop_at_eos else None)
        difference = assert_close(got, want)
        total = float(logsumexp(got[np.isfinite(got)]))
        print(f"λ={lam} stop_at_eos={stop_at_eos}: max |Δ| {difference:.2e}, log Σ p {total:.1e}")
        assert abs(total) < 1e-5


def likes_c(s):
    return 0.8 * jnp.sum(s == 5, axis=-1) - 0.5 * jnp.sum(s == 3, axis=-1)


def global_program():
    model = realigned("global")
    s = numpyro.sample("s", lmppl.LM(model, source=TEXT, max_new_tokens=STEPS))
    numpyro.factor("likes_c", likes_c(s))


def test_global_mode_exact_and_smc_target_the_sequence_mixture():
    lam = 0.5
    model = realigned("global")
    model.params = model.with_lam(model.params, lam)
    try:
        log_target = (
            (1 - lam) * expected_log_probs(LOG_REF, SEQUENCES, EOS)
            + lam * expected_log_probs(LOG_AL, SEQUENCES, EOS)
            + np.asarray(likes_c(SEQUENCES), np.float64)
        )
        log_z = float(logsumexp(log_target))
        exact = float(lmppl.infer.Exact(global_program).run(None).log_marginal)
        print(f"global λ={lam}: Exact log Z {exact:.6f} vs enumeration {log_z:.6f}")
        assert abs(exact - log_z) < 1e-4
        runs = 300
        sampler = lmppl.infer.SMC(global_program, 8, ess_threshold=1.0)
        estimates = np.asarray(sampler.log_marginals(jax.random.key(3), runs), np.float64)
        ratios = np.exp(estimates - log_z)
        print(
            f"global SMC: mean Ẑ/Z {ratios.mean():.4f} ± {ratios.std(ddof=1) / np.sqrt(runs):.4f}"
        )
        assert_within_standard_errors(ratios, 1.0, k=4)
    finally:
        model.params = model.with_lam(model.params, 0.0)


def test_a_t5_and_a_differently_started_t5_are_refused():
    other = REF.with_params(REF.params)
    other.config = REF.config.replace(decoder_start_token_id=2)
    with pytest.raises(ValueError, match="decoder start tokens 0 .ref. vs 2"):
        lmppl.realign(REF, other, 0.5)
