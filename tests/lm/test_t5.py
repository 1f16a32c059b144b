"""T5 networks: encoder + cached decoder against transformers' T5ForConditionalGeneration.

Tiny random configs in float32: original T5 (ReLU MLP, tied output scaled by d_model^-1/2)
and T5 v1.1 / Flan-T5 (gated GELU, untied). Checked: the decoder's full forward pass over a
right-padded batch of sources of different lengths, and prefill-then-one-token-at-a-time
decoding through the cache; max |Δlogit| <= 1e-4 (float32 round-off over a few layers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmppl.lm.build import TensorTable
from lmppl.lm.t5 import T5Network, relative_position_bucket, t5_config_from_hf

FLOAT32_PARITY = 1e-4
VOCAB = 61
# Weight spreads: larger ones make the unscaled attention scores (T5 has no 1/sqrt(D)) so
# large that float32 itself is off by ~1e-4 (torch float32 vs float64: 7.7e-5 for the gated
# model at 0.3); at these it is 6e-6 (relu) and 1.8e-5 (gated).
SPREAD = {"relu": 0.3, "gated": 0.2}


@functools.cache
def twin(kind: str):
    import torch
    import transformers

    from tests.fixtures import randomise_

    options = {
        "relu": dict(feed_forward_proj="relu"),
        "gated": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    }
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        **options[kind],
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = randomise_(
        transformers.T5ForConditionalGeneration(config), 0, spread=SPREAD[kind]
    ).eval()
    tensors = {name: t.detach().numpy().copy() for name, t in model.state_dict().items()}
    t5_config = t5_config_from_hf(config.to_dict())
    network = T5Network(t5_config, TensorTable(tensors, jnp.float32, "t5"))
    return model, network


def torch_logits(model, source, source_lengths, decoder_tokens):
    import torch

    mask = (np.arange(source.shape[1])[None, :] < source_lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        output = model(
            input_ids=torch.as_tensor(source, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            decoder_input_ids=torch.as_tensor(decoder_tokens, dtype=torch.long),
        )
    return output.logits.numpy()


@pytest.mark.parametrize("kind", ["relu", "gated"])
def test_encoder_and_cached_decoder_match_torch(kind):
    model, network = twin(kind)
    rng = np.random.default_rng(1)
    source_lengths = np.array([7, 20, 3], np.int32)  # 20 > max_distance: the log buckets
    source = rng.integers(2, VOCAB, (3, 20)).astype(np.int32)
    for row, length in enumerate(source_lengths):
        source[row, length:] = 0
    decoder = rng.integers(2, VOCAB, (3, 16)).astype(np.int32)
    decoder[:, 0] = 0  # the decoder start token
    reference = torch_logits(model, source, source_lengths, decoder)

    cache = network.start_cache(jnp.asarray(source), jnp.asarray(source_lengths), 16)
    full = network(jnp.asarray(decoder), cache)
    full_difference = np.abs(np.asarray(full.logits) - reference).max()

    step = jax.jit(lambda tokens, cache: network(tokens, cache))
    output = step(jnp.asarray(decoder[:, :4]), cache)
    logits, cache = [np.asarray(output.logits)], output.cache
    for position in range(4, 16):
        output = step(jnp.asarray(decoder[:, position : position + 1]), cache)
        logits.append(np.asarray(output.logits))
        cache = output.cache
    cached_difference = np.abs(np.concatenate(logits, axis=1) - reference).max()
    print(
        f"{kind}: full {full_difference:.2e}, cached {cached_difference:.2e}, scale {np.abs(reference).max():.1f}"
    )
    assert full_difference <= FLOAT32_PARITY, f"{kind}: full forward {full_difference:.2e}"
    assert cached_difference <= FLOAT32_PARITY, f"{kind}: cached decode {cached_difference:.2e}"
    np.testing.assert_array_equal(cache.length, [16] * 3)


def test_relative_position_buckets_match_torch():
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-40, 41)[None, :] - np.zeros((1, 1), np.int64)
    for bidirectional in (True, False):
        expected = T5Attention._relative_position_bucket(
            torch.as_tensor(relative), bidirectional=bidirectional, num_buckets=8, max_distance=12
        ).numpy()
        actual = relative_position_bucket(jnp.asarray(relative, jnp.int32), bidirectional, 8, 12)
        np.testing.assert_array_equal(np.asarray(actual), expected)
