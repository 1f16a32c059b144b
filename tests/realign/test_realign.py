"""DeRa token mode: endpoints, the mixed per-step law, caches, λ sweeps by vmap, errors."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmppl
from lmppl.lm.base import broadcast_cache, reorder_cache
from lmppl.realign import RealignCache, RealignParams
from tests.fixtures import all_sequences
from tests.realign.realign_models import (
    PAIRS,
    PROMPT,
    forward_logits,
    log_softmax,
    sequence_log_probs,
    step_log_probs,
)

STEPS = 3
_MODELS: dict = {}


def realigned_model(pair: str, mode: str = "token"):
    """One realigned model per (pair, mode), shared by the tests (λ is set through params)."""
    if (pair, mode) not in _MODELS:
        _MODELS[pair, mode] = lmppl.realign(*PAIRS[pair], 0.0, mode=mode)
    return _MODELS[pair, mode]


def per_step_logits(model, params, tokens):
    """``[M, S, V]`` logits of one uncached forward pass of ``tokens`` ``[M, S]``."""
    return np.asarray(forward_logits(model, params, tokens))


@pytest.mark.parametrize("mode", ["token", "global"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_endpoints_reproduce_reference_and_aligned(pair, mode):
    ref, aligned = PAIRS[pair]
    sequences = jnp.asarray(all_sequences(ref.vocab_size, STEPS))
    tokens = np.concatenate(
        [np.tile(ref.tokenizer.encode(PROMPT), (len(sequences), 1)), np.asarray(sequences)], axis=1
    )
    realigned = realigned_model(pair, mode)
    for lam, target in ((0.0, ref), (1.0, aligned)):
        params = realigned.with_lam(realigned.params, lam)
        # Per-step logits: the same next-token law at every position.
        mixed = log_softmax(per_step_logits(realigned, params, tokens))
        direct = log_softmax(per_step_logits(target, target.params, tokens))
        assert np.abs(mixed - direct).max() < 1e-5
        for stop_at_eos in (False, True):
            dist = lmppl.LM(realigned, PROMPT, STEPS, stop_at_eos=stop_at_eos, params=params)
            got = dist.log_prob(sequences)
            want = lmppl.LM(target, PROMPT, STEPS, stop_at_eos=stop_at_eos).log_prob(sequences)
            np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
            finite = np.isfinite(np.asarray(want))
            assert np.abs(np.asarray(got)[finite] - np.asarray(want)[finite]).max() < 1e-5


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_endpoints_generate_the_same_tokens(pair):
    ref, aligned = PAIRS[pair]
    key = jax.random.key(4)
    realigned = lmppl.realign(ref, aligned, 0.0)
    for lam, target in ((0.0, ref), (1.0, aligned)):
        # generate reads realigned.params: set λ there (no recompilation).
        realigned.params = realigned.with_lam(realigned.params, lam)
        for temperature in (1.0, 0.0) if pair == "table" else (1.0,):
            got = lmppl.generate(
                realigned,
                PROMPT,
                num_samples=64,
                max_new_tokens=6,
                temperature=temperature,
                rng_key=key,
            )
            want = lmppl.generate(
                target,
                PROMPT,
                num_samples=64,
                max_new_tokens=6,
                temperature=temperature,
                rng_key=key,
            )
            np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
            np.testing.assert_allclose(
                np.asarray(got.log_probs), np.asarray(want.log_probs), atol=2e-5
            )
            assert got.texts == want.texts


@pytest.mark.parametrize("lam", [0.3, 2.5, -0.5])
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_token_mode_is_the_softmax_of_the_mixed_log_probs(pair, lam):
    """log_prob = Σ_t log softmax((λ log π_al + (1−λ) log π_ref) / τ)[s_t], in NumPy."""
    ref, aligned = PAIRS[pair]
    sequences = all_sequences(ref.vocab_size, STEPS)
    prompt_ids = ref.tokenizer.encode(PROMPT)
    mixed = lam * step_log_probs(aligned, prompt_ids, sequences) + (1 - lam) * step_log_probs(
        ref, prompt_ids, sequences
    )
    realigned = realigned_model(pair)
    params = realigned.with_lam(realigned.params, lam)
    for stop_at_eos, temperature in ((False, 1.0), (True, 1.0), (False, 0.7)):
        eos = 1 if stop_at_eos else None
        want = sequence_log_probs(log_softmax(mixed / temperature), sequences, eos)
        dist = lmppl.LM(
            realigned, PROMPT, STEPS, temperature, stop_at_eos=stop_at_eos, params=params
        )
        got = np.asarray(dist.log_prob(jnp.asarray(sequences)))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], atol=2e-5)
    # A genuine mixture: neither endpoint.
    endpoint = sequence_log_probs(step_log_probs(ref, prompt_ids, sequences), sequences, None)
    assert np.abs(endpoint - sequence_log_probs(log_softmax(mixed), sequences, None)).max() > 0.05


def test_cache_is_a_pair_with_particle_axis_leading():
    ref, aligned = PAIRS["transformer"]
    realigned = lmppl.realign(ref, aligned, 0.5)
    cache = realigned.init_cache(3, 8)
    assert isinstance(cache, RealignCache)
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(cache))
    tokens = jnp.asarray([[0, 2, 3], [0, 4, 2], [0, 3, 3]], jnp.int32)
    apply = jax.jit(realigned.apply)
    out = apply(realigned.params, tokens, cache)
    assert out.logits.shape == (3, 3, 5)
    # The hidden state is the reference model's.
    ref_out = jax.jit(ref.apply)(ref.params, tokens, ref.init_cache(3, 8))
    np.testing.assert_array_equal(np.asarray(out.hidden), np.asarray(ref_out.hidden))
    np.testing.assert_array_equal(np.asarray(out.cache.length), [3, 3, 3])
    # Reordering and broadcasting act on both caches row by row.
    order = jnp.asarray([2, 0, 0])
    moved = reorder_cache(out.cache, order)
    step = jnp.asarray([[4], [4], [4]], jnp.int32)
    a = apply(realigned.params, step, moved).logits
    b = apply(realigned.params, step, out.cache).logits
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[2]), atol=1e-6)
    one = jax.tree.map(lambda x: x[:1], out.cache)
    wide = broadcast_cache(one, 4)
    assert all(leaf.shape[0] == 4 for leaf in jax.tree.leaves(wide))


def test_context_length_is_the_shorter_one():
    ref, aligned = PAIRS["table"]  # 12 and 10
    realigned = lmppl.realign(ref, aligned, 0.5)
    assert realigned.context_length == 10
    lmppl.LM(realigned, PROMPT, 7)  # 3 + 7 = 10 fits
    with pytest.raises(ValueError, match="context length 10"):
        lmppl.LM(realigned, PROMPT, 8)


def test_params_hold_both_models_and_a_float32_lambda():
    ref, aligned = PAIRS["table"]
    realigned = lmppl.realign(ref, aligned, 2)
    params = realigned.params
    assert isinstance(params, RealignParams)
    assert params.lam.dtype == jnp.float32 and params.lam.shape == ()
    assert float(params.lam) == 2.0
    leaves = jax.tree.leaves(params)
    assert (
        len(leaves) == len(jax.tree.leaves(ref.params)) + len(jax.tree.leaves(aligned.params)) + 1
    )
    moved = realigned.with_lam(params, 0.25)
    assert float(moved.lam) == 0.25 and moved.ref is params.ref
    with pytest.raises(ValueError, match="scalar"):
        realigned.with_lam(params, jnp.ones(3))
    with pytest.raises(ValueError, match="finite"):
        realigned.with_lam(params, float("nan"))


LAMS = jnp.asarray([0.0, 0.4, 1.0, 1.7, -0.3], jnp.float32)


@pytest.mark.parametrize("mode", ["token", "global"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_lambda_sweep_of_log_prob_is_one_vmap(pair, mode):
    ref, aligned = PAIRS[pair]
    realigned = realigned_model(pair, mode)
    sequences = jnp.asarray(all_sequences(ref.vocab_size, STEPS)[::7])

    def log_prob(lam):
        params = realigned.with_lam(realigned.params, lam)
        return lmppl.LM(realigned, PROMPT, STEPS, stop_at_eos=False, params=params).log_prob(
            sequences
        )

    swept = np.asarray(jax.vmap(log_prob)(LAMS))
    # The same sweep as a vmap over a params pytree whose λ leaf is batched.
    stacked = realigned.params._replace(lam=LAMS)
    axes = RealignParams(None, None, 0)
    by_params = jax.vmap(
        lambda p: lmppl.LM(realigned, PROMPT, STEPS, stop_at_eos=False, params=p).log_prob(
            sequences
        ),
        in_axes=(axes,),
    )(stacked)
    np.testing.assert_allclose(np.asarray(by_params), swept, atol=1e-6)
    # The Python loop over λ.
    for row, lam in zip(swept, np.asarray(LAMS), strict=True):
        params = realigned.with_lam(realigned.params, float(lam))
        want = np.asarray(
            lmppl.LM(realigned, PROMPT, STEPS, stop_at_eos=False, params=params).log_prob(sequences)
        )
        np.testing.assert_allclose(row, want, atol=1e-5)
    # Setting λ in params is the same as building the model with that λ.
    built = lmppl.realign(ref, aligned, float(LAMS[3]), mode=mode)
    want = np.asarray(lmppl.LM(built, PROMPT, STEPS, stop_at_eos=False).log_prob(sequences))
    np.testing.assert_allclose(swept[3], want, atol=1e-6)
    assert np.ptp(swept, axis=0).max() > 0.1  # λ really changes the law


def test_vocabulary_size_mismatch_is_refused():
    with pytest.raises(
        ValueError, match=r"^realign needs models with one vocabulary: .*vocab_size 5 \(ref\) vs 6"
    ):
        lmppl.realign(lmppl.table_lm(3), lmppl.table_lm(4), 0.5)


def test_different_tokenizers_of_one_size_are_refused():
    with pytest.raises(ValueError, match="one vocabulary.*decode id 4 differently"):
        lmppl.realign(lmppl.table_lm("abc"), lmppl.table_lm("abd"), 0.5)
    with pytest.raises(ValueError, match="one vocabulary.*encode 'abcd' differently"):
        lmppl.realign(lmppl.table_lm("abcd"), lmppl.table_lm("abce"), 0.5)
    other = lmppl.table_lm(3, seed=5)
    other.tokenizer = copy.copy(other.tokenizer)
    other.tokenizer.bos_token_id = 2
    with pytest.raises(ValueError, match="one vocabulary.*bos_token_id 0 \\(ref\\) vs 2"):
        lmppl.realign(lmppl.table_lm(3), other, 0.5)
    other.tokenizer.bos_token_id = 0
    other.tokenizer.eos_token_id = 3
    with pytest.raises(ValueError, match="one vocabulary.*EOS id 1 \\(ref\\) vs 3"):
        lmppl.realign(lmppl.table_lm(3), other, 0.5)
    # Same symbols, different weights and context lengths: accepted.
    lmppl.realign(lmppl.table_lm(3, context_length=9), lmppl.table_lm(3, seed=3), 0.5)


@pytest.mark.parametrize("lam", [float("inf"), float("-inf"), float("nan"), np.float32("nan")])
def test_lambda_must_be_finite(lam):
    ref, aligned = PAIRS["table"]
    with pytest.raises(ValueError, match="λ must be finite"):
        lmppl.realign(ref, aligned, lam)


def test_bad_mode_and_nested_global_models_are_refused():
    ref, aligned = PAIRS["table"]
    with pytest.raises(ValueError, match="mode must be 'token' or 'global'"):
        lmppl.realign(ref, aligned, 0.5, mode="sequence")
    inner = lmppl.realign(ref, aligned, 0.5, mode="global")
    with pytest.raises(ValueError, match="unnormalised"):
        lmppl.realign(inner, aligned, 0.5)
    # Extrapolation and a token-mode realigned model as an input are fine.
    lmppl.realign(lmppl.realign(ref, aligned, 3.0), aligned, -1.0)
