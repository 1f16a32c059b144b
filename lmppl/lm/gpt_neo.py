"""GPT-Neo (the TinyStories architecture) as a Flax NNX network.

GPT-2's shape (learned positions, pre-LayerNorm, ``gelu_new`` MLP, tied output) with three
differences that matter for exactness:

* layers alternate global and local attention (``config.attention_layers``); a local layer
  lets the query at position ``q`` see only keys ``j`` with ``q - window < j <= q``
  (``window = config.window_size``);
* attention scores are **not** scaled by ``1/sqrt(D)``;
* queries, keys and values are separate bias-free ``torch.nn.Linear`` projections
  (``transformer.h.{i}.attn.attention.q_proj.weight`` ``[H, H]``) and ``out_proj`` has a bias;
  the MLP's ``c_fc`` / ``c_proj`` are ``nn.Linear`` too (``[out, in]``), unlike GPT-2's Conv1D.

Scanned (:func:`lmppl.lm.scanned`), the global/local pattern is a per-layer flag array
scanned with the parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmppl.lm.base import KVCache, LMOutput
from lmppl.lm.config import ModelConfig
from lmppl.lm.gpt2 import layer_norm
from lmppl.lm.layers import (
    ACTIVATIONS,
    Embedding,
    LayerStack,
    ParameterSource,
    cached_attention,
    empty_cache,
    layer_window,
    linear_from_torch,
    next_cache,
    run_layers,
    token_positions,
)

__all__ = ["GPTNeoAttention", "GPTNeoBlock", "GPTNeoMLP", "GPTNeoNetwork"]


class GPTNeoAttention(nnx.Module):
    """Unscaled multi-head self-attention, global or local (sliding window)."""

    def __init__(self, config: ModelConfig, get: ParameterSource, prefix: str):
        hidden = config.hidden_size
        self.q_proj = linear_from_torch(get, f"{prefix}.q_proj", hidden, hidden, False)
        self.k_proj = linear_from_torch(get, f"{prefix}.k_proj", hidden, hidden, False)
        self.v_proj = linear_from_torch(get, f"{prefix}.v_proj", hidden, hidden, False)
        self.out_proj = linear_from_torch(get, f"{prefix}.out_proj", hidden, hidden, True)
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.window = config.window_size

    def __call__(self, x, cache_keys, cache_values, positions, layer, local=False):
        """``x`` ``[B, S, H]`` at ``positions`` ``[B, S]`` -> (output, cache keys, cache values);
        the stacked cache's slot ``layer`` is this layer's, ``local`` its attention kind."""
        batch, steps, _ = x.shape
        heads = (batch, steps, self.num_heads, self.head_dim)
        output, cache_keys, cache_values = cached_attention(
            self.q_proj(x).reshape(heads),
            self.k_proj(x).reshape(heads),
            self.v_proj(x).reshape(heads),
            cache_keys,
            cache_values,
            positions,
            layer,
            scale=1.0,
            window=layer_window(self.window, local),
        )
        return self.out_proj(output.reshape(batch, steps, -1)), cache_keys, cache_values


class GPTNeoMLP(nnx.Module):
    """``W_2 act(W_1 x + b_1) + b_2`` from ``nn.Linear`` weights."""

    def __init__(self, config: ModelConfig, get: ParameterSource, prefix: str):
        hidden, inner = config.hidden_size, config.intermediate_size
        self.c_fc = linear_from_torch(get, f"{prefix}.c_fc", hidden, inner, True)
        self.c_proj = linear_from_torch(get, f"{prefix}.c_proj", inner, hidden, True)
        self.activation = config.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x)))


class GPTNeoBlock(nnx.Module):
    """Pre-LayerNorm residual block: (global or local) attention then MLP."""

    def __init__(self, config: ModelConfig, get: ParameterSource, prefix: str):
        hidden, eps = config.hidden_size, config.norm_eps
        self.ln_1 = layer_norm(get, f"{prefix}.ln_1", hidden, eps)
        self.attn = GPTNeoAttention(config, get, f"{prefix}.attn.attention")
        self.ln_2 = layer_norm(get, f"{prefix}.ln_2", hidden, eps)
        self.mlp = GPTNeoMLP(config, get, f"{prefix}.mlp")

    def __call__(self, x, cache_keys, cache_values, positions, layer, local=False):
        attended, cache_keys, cache_values = self.attn(
            self.ln_1(x), cache_keys, cache_values, positions, layer, local
        )
        x = x + attended
        x = x + self.mlp(self.ln_2(x))
        return x, cache_keys, cache_values


class GPTNeoNetwork(nnx.Module):
    """GPT-Neo implementing the :mod:`lmppl.lm.base` network interface."""

    def __init__(self, config: ModelConfig, get: ParameterSource):
        if len(config.attention_layers) != config.num_layers:
            raise ValueError(
                f"GPT-Neo needs one attention kind per layer: got {len(config.attention_layers)} "
                f"for {config.num_layers} layers"
            )
        unknown = sorted(set(config.attention_layers) - {"global", "local"})
        if unknown:
            raise ValueError(f"GPT-Neo attention kinds must be 'global' or 'local', got {unknown}")
        vocab, hidden = config.vocab_size, config.hidden_size
        self.config = config
        self.wte = Embedding(get("transformer.wte.weight", (vocab, hidden)))
        self.wpe = Embedding(get("transformer.wpe.weight", (config.context_length, hidden)))
        self.h = nnx.List(
            [GPTNeoBlock(config, get, f"transformer.h.{i}") for i in range(config.num_layers)]
        )
        self.ln_f = layer_norm(get, "transformer.ln_f", hidden, config.norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Embedding(get("lm_head.weight", (vocab, hidden)))
        )

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> KVCache:
        """An empty cache of length 0 (per layer ``[batch_size, max_length, H, D]``; one
        ``[batch_size, L, max_length, H, D]`` buffer when the blocks are scanned).

        Local layers keep the full ``max_length`` too, so every layer shares one layout and
        the cache reorders and broadcasts like any other.
        """
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
