"""lmppl networks against ``transformers``' PyTorch models on the same random weights.

Every case (Llama tied, Llama GQA untied, Qwen2 with q/k/v biases, Mistral with one KV
head, GPT-2, GPT-Neo with a window shorter than the sequence) is checked three ways in
float32: a full forward pass, prefill-then-decode one token at a time, and a right-padded
batch of different-length prompts. The bound 1e-4 is float32 round-off accumulated over a
few layers of width 32 (observed differences are ~2e-6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

FLOAT32_PARITY = 1e-4
SEQUENCE_LENGTH = 11
CACHE_LENGTH = 16


def random_tokens(seed: int, shape: tuple[int, ...], vocab: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def test_full_forward_matches_torch(twin):
    lm = twin.lm
    tokens = random_tokens(1, (2, SEQUENCE_LENGTH), lm.vocab_size)
    output = jax.jit(lm.apply)(lm.params, jnp.asarray(tokens), lm.init_cache(2, CACHE_LENGTH))
    assert output.logits.dtype == jnp.float32
    assert output.logits.shape == (2, SEQUENCE_LENGTH, lm.vocab_size)
    assert output.hidden.shape == (2, SEQUENCE_LENGTH, lm.hidden_size)
    np.testing.assert_array_equal(output.cache.length, [SEQUENCE_LENGTH] * 2)
    difference = np.abs(np.asarray(output.logits) - twin.torch_logits(tokens)).max()
    assert difference <= FLOAT32_PARITY, f"{lm.name}: max |logit difference| {difference:.2e}"


def test_cached_decoding_matches_torch_and_never_retraces(twin):
    lm = twin.lm
    tokens = random_tokens(2, (2, SEQUENCE_LENGTH), lm.vocab_size)
    reference = twin.torch_logits(tokens)
    traces = []

    def step(params, step_tokens, cache):
        traces.append(step_tokens.shape)
        return lm.apply(params, step_tokens, cache)

    step = jax.jit(step)
    prompt_length = 4
    output = step(lm.params, jnp.asarray(tokens[:, :prompt_length]), lm.init_cache(2, CACHE_LENGTH))
    logits = [np.asarray(output.logits)]
    cache = output.cache
    for position in range(prompt_length, SEQUENCE_LENGTH):
        output = step(lm.params, jnp.asarray(tokens[:, position : position + 1]), cache)
        logits.append(np.asarray(output.logits))
        cache = output.cache
    decoded = np.concatenate(logits, axis=1)
    difference = np.abs(decoded - reference).max()
    assert difference <= FLOAT32_PARITY, f"{lm.name}: max |logit difference| {difference:.2e}"
    np.testing.assert_array_equal(cache.length, [SEQUENCE_LENGTH] * 2)
    assert traces == [(2, prompt_length), (2, 1)], f"retraced: {traces}"


def test_right_padded_prompts_match_unpadded_rows(twin):
    """Rows of lengths 3, 8, 5 padded to 8, then one decode step at three different positions."""
    lm = twin.lm
    lengths = np.array([3, 8, 5], np.int32)
    full = random_tokens(3, (3, lengths.max() + 1), lm.vocab_size)
    padded = full[:, : lengths.max()].copy()
    for row, length in enumerate(lengths):
        padded[row, length:] = 0
    apply = jax.jit(lm.apply)
    cache = lm.init_cache(3, CACHE_LENGTH)
    output = apply(lm.params, jnp.asarray(padded), cache, jnp.asarray(lengths))
    np.testing.assert_array_equal(output.cache.length, lengths)
    next_tokens = full[np.arange(3), lengths][:, None]
    stepped = apply(lm.params, jnp.asarray(next_tokens), output.cache)
    np.testing.assert_array_equal(stepped.cache.length, lengths + 1)
    for row, length in enumerate(lengths):
        reference = twin.torch_logits(full[row : row + 1, : length + 1])[0]
        prefill_difference = np.abs(np.asarray(output.logits[row, :length]) - reference[:length])
        step_difference = np.abs(np.asarray(stepped.logits[row, 0]) - reference[length])
        assert prefill_difference.max() <= FLOAT32_PARITY, f"{lm.name} row {row} prefill"
        assert step_difference.max() <= FLOAT32_PARITY, f"{lm.name} row {row} decode"


@pytest.mark.parametrize("case", ["llama_gqa_untied", "gpt_neo"])
def test_bfloat16_parameters_give_float32_logits_close_to_float32(get_twin, case):
    twin = get_twin(case)
    lm16 = twin.lm.astype(jnp.bfloat16)
    tokens = jnp.asarray(random_tokens(4, (1, 6), lm16.vocab_size))
    with jax.numpy_dtype_promotion("strict"):  # no silent bfloat16 -> float32 upcasts
        output = jax.jit(lm16.apply)(lm16.params, tokens, lm16.init_cache(1, 8))
    assert lm16.dtype == jnp.bfloat16
    assert output.logits.dtype == jnp.float32
    assert output.cache.keys[0].dtype == jnp.bfloat16
    full = jax.jit(twin.lm.apply)(twin.lm.params, tokens, twin.lm.init_cache(1, 8)).logits
    # bfloat16 keeps 8 significant bits: relative error ~ 2^-8 per operation, a few layers deep.
    relative = np.abs(np.asarray(output.logits - full)).max() / np.abs(np.asarray(full)).max()
    assert relative < 0.1, f"{lm16.name}: bfloat16 relative logit error {relative:.3f}"


def test_unjitted_forward_matches_torch(get_twin):
    twin = get_twin("llama_gqa_untied")
    lm = twin.lm
    tokens = random_tokens(5, (1, 5), lm.vocab_size)
    output = lm.apply(lm.params, jnp.asarray(tokens), lm.init_cache(1, 8))
    difference = np.abs(np.asarray(output.logits) - twin.torch_logits(tokens)).max()
    assert difference <= FLOAT32_PARITY, f"{lm.name}: max |logit difference| {difference:.2e}"
