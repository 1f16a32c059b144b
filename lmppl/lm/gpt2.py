"""GPT-2 as a Flax NNX network.

Learned absolute positions, pre-LayerNorm blocks, fused query/key/value projection,
``gelu_new`` MLP and the output tied to the token embedding:

    h_0 = E[token] + P[position]
    h <- h + W_o Attention(split_qkv(W_qkv ln1(h) + b_qkv)) + b_o     (scores scaled 1/sqrt(D))
    h <- h + W_2 gelu_new(W_1 ln2(h) + b_1) + b_2
    logits = ln_f(h) E^T

Hugging Face stores GPT-2's projections as ``Conv1D`` with weights already ``[in, out]``
(``transformer.h.{i}.attn.c_attn.weight`` is ``[H, 3H]``), so they are used untransposed.
:func:`lmppl.lm.scanned` makes the blocks one scanned :class:`~lmppl.lm.layers.LayerStack`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmppl.lm.base import KVCache, LMOutput
from lmppl.lm.config import ModelConfig
from lmppl.lm.layers import (
    ACTIVATIONS,
    Embedding,
    LayerNorm,
    LayerStack,
    Linear,
    ParameterSource,
    cached_attention,
    default_scale,
    empty_cache,
    next_cache,
    run_layers,
    token_positions,
)

__all__ = ["GPT2Attention", "GPT2Block", "GPT2MLP", "GPT2Network", "conv1d", "layer_norm"]


def conv1d(get: ParameterSource, name: str, in_features: int, out_features: int) -> Linear:
    """A :class:`Linear` from a Hugging Face ``Conv1D`` (weight ``[in, out]``, bias ``[out]``)."""
    return Linear(
        get(f"{name}.weight", (in_features, out_features)), get(f"{name}.bias", (out_features,))
    )


def layer_norm(get: ParameterSource, name: str, width: int, eps: float) -> LayerNorm:
    """A :class:`LayerNorm` from ``name.weight`` and ``name.bias`` ``[width]``."""
    return LayerNorm(get(f"{name}.weight", (width,)), get(f"{name}.bias", (width,)), eps)


class GPT2Attention(nnx.Module):
    """Multi-head self-attention with a fused ``c_attn`` projection and ``c_proj`` output."""

    def __init__(self, config: ModelConfig, get: ParameterSource, prefix: str):
        hidden = config.hidden_size
        self.c_attn = conv1d(get, f"{prefix}.c_attn", hidden, 3 * hidden)
        self.c_proj = conv1d(get, f"{prefix}.c_proj", hidden, hidden)
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim

    def __call__(self, x, cache_keys, cache_values, positions, layer):
        """``x`` ``[B, S, H]`` at ``positions`` ``[B, S]`` -> (output, cache keys, cache values);
        the stacked cache's slot ``layer`` is this layer's."""
        batch, steps, _ = x.shape
        heads = (batch, steps, self.num_heads, self.head_dim)
        query, key, value = jnp.split(self.c_attn(x), 3, axis=-1)
        output, cache_keys, cache_values = cached_attention(
            query.reshape(heads),
            key.reshape(heads),
            value.reshape(heads),
            cache_keys,
            cache_values,
            positions,
            layer,
            scale=default_scale(self.head_dim),
        )
        return self.c_proj(output.reshape(batch, steps, -1)), cache_keys, cache_values


class GPT2MLP(nnx.Module):
    """``W_2 act(W_1 x + b_1) + b_2`` with ``act = gelu_new`` for GPT-2."""

    def __init__(self, config: ModelConfig, get: ParameterSource, prefix: str):
        hidden, inner = config.hidden_size, config.intermediate_size
        self.c_fc = conv1d(get, f"{prefix}.c_fc", hidden, inner)
        self.c_proj = conv1d(get, f"{prefix}.c_proj", inner, hidden)
        self.activation = config.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x)))


class GPT2Block(nnx.Module):
    """Pre-LayerNorm residual block: attention then MLP."""

    def __init__(self, config: ModelConfig, get: ParameterSource, prefix: str):
        hidden, eps = config.hidden_size, config.norm_eps
        self.ln_1 = layer_norm(get, f"{prefix}.ln_1", hidden, eps)
        self.attn = GPT2Attention(config, get, f"{prefix}.attn")
        self.ln_2 = layer_norm(get, f"{prefix}.ln_2", hidden, eps)
        self.mlp = GPT2MLP(config, get, f"{prefix}.mlp")

    def __call__(self, x, cache_keys, cache_values, positions, layer, local=False):
        attended, cache_keys, cache_values = self.attn(
            self.ln_1(x), cache_keys, cache_values, positions, layer
        )
        x = x + attended
        x = x + self.mlp(self.ln_2(x))
        return x, cache_keys, cache_values


class GPT2Network(nnx.Module):
    """GPT-2 implementing the :mod:`lmppl.lm.base` network interface."""

    def __init__(self, config: ModelConfig, get: ParameterSource):
        vocab, hidden = config.vocab_size, config.hidden_size
        self.config = config
        self.wte = Embedding(get("transformer.wte.weight", (vocab, hidden)))
        self.wpe = Embedding(get("transformer.wpe.weight", (config.context_length, hidden)))
        self.h = nnx.List(
            [GPT2Block(config, get, f"transformer.h.{i}") for i in range(config.num_layers)]
        )
        self.ln_f = layer_norm(get, "transformer.ln_f", hidden, config.norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Embedding(get("lm_head.weight", (vocab, hidden)))
        )

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> KVCache:
        """An empty cache of length 0 (per layer ``[batch_size, max_length, H, D]``; one
        ``[batch_size, L, max_length, H, D]`` buffer when the blocks are scanned)."""
        c = self.config
        stacked = isinstance(self.h, LayerStack)
        return empty_cache(
            c.num_layers, batch_size, max_length, c.num_heads, c.head_dim, dtype, stacked
        )

    def __call__(
        self, tokens: jax.Array, cache: KVCache, token_counts: jax.Array | None = None
    ) -> LMOutput:
        """Feed ``tokens`` ``[B, S]`` at positions ``cache.length + (0..S-1)``."""
        steps = tokens.shape[1]
        positions = token_positions(cache.length, steps)
        x = self.wte(tokens) + self.wpe(positions)
        x, keys, values = run_layers(self.h, x, cache, positions, self.config)
        hidden = self.ln_f(x)
        output_embedding = self.wte if self.lm_head is None else self.lm_head
        return LMOutput(
            logits=output_embedding.attend(hidden),
            hidden=hidden,
            cache=next_cache(cache, keys, values, token_counts, steps),
        )
