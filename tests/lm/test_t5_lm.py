"""T5 as a source-conditioned ``lmppl.LM``: loading, exactness against transformers, errors.

A tiny random ``T5ForConditionalGeneration`` (vocabulary 6, 2 + 2 layers) saved as a Hugging
Face folder and read by ``lmppl.load``: ``LM(t5, source=..., max_new_tokens=3)`` scores all
216 sequences as transformers' teacher-forced pass does (max |Δ log p| <= 1e-4, float32
round-off), sources of different lengths in one batch are masked, sampling follows p0, and
misuse is a one-line ``ValueError``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmppl
from lmppl.lm.t5 import T5LanguageModel, T5StartCache
from tests.fixtures import all_sequences
from tests.lm.t5_models import random_t5, t5_folder, torch_log_probs
from tests.statistical import assert_within_standard_errors

FLOAT32_PARITY = 1e-4
STEPS = 3
SEQUENCES = all_sequences(6, STEPS)
EOS = 1
_LOADED: dict = {}


def loaded(kind: str) -> T5LanguageModel:
    if kind not in _LOADED:
        _LOADED[kind] = lmppl.load(str(t5_folder(kind)[0]))
    return _LOADED[kind]


def expected_log_probs(per_token: np.ndarray, sequences: np.ndarray, eos: int | None):
    """``[M]`` log p(s | x) from per-token log-probs ``[M, T, V]`` with lmppl's EOS rule:
    tokens up to the first EOS count, EOS padding after it scores 0, anything else -inf."""
    picked = np.take_along_axis(per_token, sequences[..., None], -1)[..., 0]
    if eos is None:
        return picked.sum(axis=1)
    before = np.cumsum(sequences == eos, axis=1) - (sequences == eos) == 0
    padding = np.where(sequences == eos, 0.0, -np.inf)
    return np.where(before, picked, padding).sum(axis=1)


@pytest.mark.parametrize("kind", ["gated", "relu"])
def test_loaded_t5_scores_every_sequence_as_transformers(kind):
    folder, torch_model = t5_folder(kind)
    lm = loaded(kind)
    assert isinstance(lm, T5LanguageModel) and lm.eos_token_id == EOS
    from transformers import AutoTokenizer

    hf_source = AutoTokenizer.from_pretrained(folder)("abca").input_ids  # EOS appended
    assert hf_source == [3, 4, 5, 3, EOS]
    per_token = torch_log_probs(torch_model, hf_source, SEQUENCES)
    for stop_at_eos in (False, True):
        dist = lmppl.LM(lm, source="abca", max_new_tokens=STEPS, stop_at_eos=stop_at_eos)
        np.testing.assert_array_equal(dist.prompt_tokens, [0, *hf_source])  # [d_0, x]
        got = np.asarray(dist.log_prob(jnp.asarray(SEQUENCES)), np.float64)
        want = expected_log_probs(per_token, SEQUENCES, EOS if stop_at_eos else None)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        finite = np.isfinite(want)
        difference = np.abs(got[finite] - want[finite]).max()
        print(f"{kind} stop_at_eos={stop_at_eos}: max |Δ log p| {difference:.2e}")
        assert difference <= FLOAT32_PARITY
        # a normalised law over the sequences (EOS-padded ones included)
        assert abs(float(jax.scipy.special.logsumexp(got[finite]))) < 1e-5


def test_batched_sources_of_different_lengths_are_masked():
    _, torch_model = t5_folder("gated")
    lm = loaded("gated")
    sources = ["ab", "cabcab", [4]]
    dist = lmppl.LM(lm, source=sources, max_new_tokens=STEPS, stop_at_eos=False)
    assert dist.batch_shape == (3,)
    np.testing.assert_array_equal(dist.prompt_length, [4, 8, 2])  # 1 + |x| (EOS on texts)
    got = np.asarray(dist.log_prob(jnp.asarray(SEQUENCES)[:, None, :]), np.float64)
    assert got.shape == (len(SEQUENCES), 3)
    unpadded = [[3, 4, EOS], [5, 3, 4, 5, 3, 4, EOS], [4]]
    for column, source in enumerate(unpadded):
        want = expected_log_probs(torch_log_probs(torch_model, source, SEQUENCES), SEQUENCES, None)
        difference = np.abs(got[:, column] - want).max()
        print(f"source {source}: max |Δ log p| {difference:.2e}")
        assert difference <= FLOAT32_PARITY


def test_samples_follow_the_first_token_law():
    _, torch_model = t5_folder("relu")
    lm = loaded("relu")
    n = 4000
    generated = lmppl.generate(
        lm, source="cab", num_samples=n, max_new_tokens=2, rng_key=jax.random.key(0)
    )
    first = np.asarray(generated.tokens[:, 0])
    p = np.exp(torch_log_probs(torch_model, [5, 3, 4, EOS], SEQUENCES[:1, :1])[0, 0])
    frequency = np.bincount(first, minlength=6) / n
    assert_within_standard_errors(
        frequency, p, k=4, standard_error=np.sqrt(p * (1 - p) / n), atol=1e-3
    )


def test_random_t5_is_source_conditioned_and_caches_the_encoder_once():
    lm = random_t5(2)
    assert isinstance(lm, T5LanguageModel) and lm.vocab_size == 6
    cache = lm.init_cache(1, 9)
    assert isinstance(cache, T5StartCache)
    one = lmppl.LM(lm, source="ab", max_new_tokens=STEPS, stop_at_eos=False)
    other = lmppl.LM(lm, source="dcd", max_new_tokens=STEPS, stop_at_eos=False)
    sequences = jnp.asarray(SEQUENCES)
    a, b = np.asarray(one.log_prob(sequences)), np.asarray(other.log_prob(sequences))
    assert abs(float(jax.scipy.special.logsumexp(a))) < 1e-5
    assert np.abs(a - b).max() > 0.1  # the source changes the law
    # After the packed prompt the cache is the decoder's, 1 + T positions, start token written.
    start = lm.init_cache(1, 4 + STEPS)
    out = lm.apply(lm.params, one.prompt_tokens[None], start)
    assert out.logits.shape == (1, 4, 6)
    assert out.cache.keys[0].shape[1] == 1 + STEPS and int(out.cache.length[0]) == 1
    assert out.cache.cross_keys[0].shape[1] == 3  # the source "ab</s>"
    # The fresh cache's size is the built one's (memory estimates read init_cache's shape).

    def key_value_bytes(cache):
        leaves = jax.tree.leaves(cache)
        return sum(x.size * x.dtype.itemsize for x in leaves if x.dtype == jnp.float32)

    assert key_value_bytes(start) == key_value_bytes(out.cache) > 0


def test_misuse_is_a_one_line_error():
    t5 = random_t5(2)
    llama = lmppl.random_lm("llama", symbols=4)
    cases = [
        (lambda: lmppl.LM(llama, source="ab", max_new_tokens=2), "is decoder-only"),
        (lambda: lmppl.LM(t5, "ab", 2), "give its input as source="),
        (lambda: lmppl.LM(t5, max_new_tokens=2), "give source="),
        (lambda: lmppl.LM(t5, source="abcd" * 4, max_new_tokens=2), "exceeds the 16 encoder"),
        (lambda: lmppl.LM(t5, source="ab", max_new_tokens=16), "16 decoder positions"),
        (lambda: lmppl.LM(t5, source=[2, 9], max_new_tokens=2), r"must lie in \[0, 6\)"),
        (lambda: lmppl.LM(t5, source=[], max_new_tokens=2), "is empty"),
        (lambda: lmppl.generate(t5, "ab", max_new_tokens=2), "give its input as source="),
        (lambda: lmppl.realign(t5, llama, 0.5), "only the ref model is an encoder-decoder"),
        (lambda: lmppl.random_lm("t6"), "'t5'"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            make()
        assert "\n" not in str(error.value), str(error.value)
