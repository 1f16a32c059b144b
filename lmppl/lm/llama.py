"""The Llama family (Llama 2/3, Mistral, Qwen2/3, Phi-3/4, SmolLM) as a Flax NNX network.

One block, with RMSNorm ``n(.)``, rotary embeddings on queries and keys, grouped-query
attention (``H_kv`` key/value heads each serving ``H_q / H_kv`` query heads) and a SwiGLU MLP:

    h <- h + W_o Attention(RoPE(W_q n1(h)), RoPE(W_k n1(h)), W_v n1(h))
    h <- h + W_down (silu(W_gate n2(h)) * W_up n2(h))

and ``logits = W_out n(h)``, with ``W_out`` the token embedding when the output is tied.
The family's variants are config switches: Qwen2 adds biases to ``W_q, W_k, W_v``
(``config.attention_bias``); Qwen3 normalises each query and key head with its own RMSNorm
before RoPE (``config.qk_norm``); Phi-3 stores ``[W_q; W_k; W_v]`` as one ``qkv_proj`` and
``[W_gate; W_up]`` as one ``gate_up_proj`` (``config.fused_projections``) and may rotate
only part of each head (``config.partial_rotary_factor``); Llama 3.1+ and others rescale
RoPE (``config.rope_scaling``, see :mod:`lmppl.lm.rope`); layers marked ``"local"`` in
``config.attention_layers`` attend through a sliding window. Parameters are read from
tensors named as in ``transformers``' ``LlamaForCausalLM`` state dict
(``model.layers.{i}.self_attn.q_proj.weight``, ...; Phi-3's fused ones, Qwen3's
``self_attn.q_norm.weight``). The attention module is shared with :mod:`lmppl.lm.gemma`.

A block is told whether it is a local layer by a flag, so every layer has the same
structure whatever ``config.attention_layers`` says: the blocks are an unrolled ``nnx.List``
(each call passes its layer's static flag) or, after :func:`lmppl.lm.scanned`, one
:class:`~lmppl.lm.layers.LayerStack` applied by ``jax.lax.scan``.
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
    LayerStack,
    Linear,
    ParameterSource,
    RMSNorm,
    apply_rope,
    cached_attention,
    default_inverse_frequencies,
    default_scale,
    empty_cache,
    layer_window,
    linear_from_torch,
    next_cache,
    run_layers,
    token_positions,
    transposed,
)
from lmppl.lm.rope import rope_frequencies

__all__ = ["LlamaAttention", "LlamaBlock", "LlamaMLP", "LlamaNetwork"]


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v biases, no output bias.

    Also the attention of Qwen3 (per-head q/k RMSNorm), Phi-3 (fused ``qkv_proj``, partial
    rotary), and Gemma (q/k norms with ``1 + w``, score scale, soft-capping), each switched
    on by ``config``; the call's ``local`` flag selects the sliding window and RoPE of local
    layers.
    """

    def __init__(self, config: ModelConfig, get: ParameterSource, prefix: str):
        hidden, head_dim = config.hidden_size, config.head_dim
        query_width = config.num_heads * head_dim
        kv_width = config.num_kv_heads * head_dim
        bias = config.attention_bias
        if config.fused_projections:
            fused = transposed(
                get(f"{prefix}.qkv_proj.weight", (query_width + 2 * kv_width, hidden))
            )
            self.q_proj = Linear(fused[:, :query_width])
            self.k_proj = Linear(fused[:, query_width : query_width + kv_width])
            self.v_proj = Linear(fused[:, query_width + kv_width :])
        else:
            self.q_proj = linear_from_torch(get, f"{prefix}.q_proj", hidden, query_width, bias)
            self.k_proj = linear_from_torch(get, f"{prefix}.k_proj", hidden, kv_width, bias)
            self.v_proj = linear_from_torch(get, f"{prefix}.v_proj", hidden, kv_width, bias)
        self.o_proj = linear_from_torch(get, f"{prefix}.o_proj", query_width, hidden, False)
        if config.qk_norm:
            eps, offset = config.norm_eps, config.norm_weight_offset
            self.q_norm = RMSNorm(get(f"{prefix}.q_norm.weight", (head_dim,)), eps, offset)
            self.k_norm = RMSNorm(get(f"{prefix}.k_norm.weight", (head_dim,)), eps, offset)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = head_dim
        self.window = config.window_size if config.attention_layers else None
        self.global_rope = _rope(config, config.rope_theta, config.rope_scaling)
        self.local_rope = self.global_rope
        if config.local_rope_theta is not None:
            self.local_rope = _rope(config, config.local_rope_theta, config.local_rope_scaling)
        self.scale = config.query_scale or default_scale(head_dim)
        self.softcap = config.attention_softcap

    def _rope_arguments(
        self, local: bool | jax.Array
    ) -> tuple[float, jax.Array | None, float | jax.Array]:
        """``(theta, inverse frequencies or None, attention factor)`` of a (local) layer.

        Static when ``local`` is a Python bool or both kinds of layer rotate alike; else the
        frequencies and factor are selected per layer by ``where`` from the two sets, each
        computed exactly as the static path computes it.
        """
        if isinstance(local, bool) or self.local_rope == self.global_rope:
            rope = self.local_rope if local is True else self.global_rope
            theta, frequencies, factor = rope
            return (
                theta,
                None if frequencies is None else jnp.asarray(frequencies, jnp.float32),
                factor,
            )

        def frequencies_of(rope: tuple) -> jax.Array:
            theta, frequencies, _ = rope
            if frequencies is None:
                return default_inverse_frequencies(self.head_dim, theta)
            return jnp.asarray(frequencies, jnp.float32)

        inverse = jnp.where(
            local, frequencies_of(self.local_rope), frequencies_of(self.global_rope)
        )
        local_factor, global_factor = self.local_rope[2], self.global_rope[2]
        factor = (
            global_factor
            if local_factor == global_factor
            else jnp.where(local, jnp.float32(local_factor), jnp.float32(global_factor))
        )
        return self.global_rope[0], inverse, factor

    def __call__(
        self,
        x: jax.Array,
        cache_keys: jax.Array,
        cache_values: jax.Array,
        positions: jax.Array,
        layer: jax.Array | int,
        local: bool | jax.Array = False,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x`` ``[B, S, H]`` at ``positions`` ``[B, S]`` -> (output, cache keys, cache values).

        ``cache_keys`` / ``cache_values`` are every layer's ``[B, layers, L, H_kv, D]``; this
        layer writes and reads slot ``layer``. ``local``: the layer attends through the
        sliding window (and uses the local RoPE base).
        """
        batch, steps, _ = x.shape
        query = self.q_proj(x).reshape(batch, steps, self.num_heads, self.head_dim)
        key = self.k_proj(x).reshape(batch, steps, self.num_kv_heads, self.head_dim)
        value = self.v_proj(x).reshape(batch, steps, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        theta, frequencies, factor = self._rope_arguments(local)
        query = apply_rope(query, positions, theta, frequencies, factor)
        key = apply_rope(key, positions, theta, frequencies, factor)
        output, cache_keys, cache_values = cached_attention(
            query,
            key,
            value,
            cache_keys,
            cache_values,
            positions,
            layer,
            scale=self.scale,
            window=layer_window(self.window, local),
            softcap=self.softcap,
        )
        return self.o_proj(output.reshape(batch, steps, -1)), cache_keys, cache_values


def _rope(config: ModelConfig, theta: float, scaling) -> tuple:
    """``(theta, inverse frequencies, attention factor)`` as static (hashable) values.

    Plain RoPE keeps ``None`` frequencies (:func:`apply_rope` derives them from ``theta``
    in float32, as it always has); scaled or partial RoPE stores the frequencies as a tuple
    of floats, trace-time constants rather than parameters.
    """
    if scaling is None and config.partial_rotary_factor == 1.0:
        return (theta, None, 1.0)
    frequencies, factor = rope_frequencies(
        config.head_dim, theta, scaling, config.partial_rotary_factor
    )
    return (theta, tuple(float(f) for f in frequencies), float(factor))


class LlamaMLP(nnx.Module):
    """Gated MLP ``W_down (act(W_gate x) * W_up x)`` (SwiGLU when ``act`` is SiLU)."""

    def __init__(self, config: ModelConfig, get: ParameterSource, prefix: str):
        hidden, inner = config.hidden_size, config.intermediate_size
        if config.fused_projections:  # Phi-3: gate_up_proj = [W_gate; W_up]
            fused = transposed(get(f"{prefix}.gate_up_proj.weight", (2 * inner, hidden)))
            self.gate_proj, self.up_proj = Linear(fused[:, :inner]), Linear(fused[:, inner:])
        else:
            self.gate_proj = linear_from_torch(get, f"{prefix}.gate_proj", hidden, inner, False)
            self.up_proj = linear_from_torch(get, f"{prefix}.up_proj", hidden, inner, False)
        self.down_proj = linear_from_torch(get, f"{prefix}.down_proj", inner, hidden, False)
        self.activation = config.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = ACTIVATIONS[self.activation](self.gate_proj(x))
        return self.down_proj(gate * self.up_proj(x))


class LlamaBlock(nnx.Module):
    """Pre-norm residual block: attention then gated MLP."""

    def __init__(self, config: ModelConfig, get: ParameterSource, prefix: str):
        hidden, eps = config.hidden_size, config.norm_eps
        self.input_layernorm = RMSNorm(get(f"{prefix}.input_layernorm.weight", (hidden,)), eps)
        self.self_attn = LlamaAttention(config, get, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(
            get(f"{prefix}.post_attention_layernorm.weight", (hidden,)), eps
        )
        self.mlp = LlamaMLP(config, get, f"{prefix}.mlp")

    def __call__(self, x, cache_keys, cache_values, positions, layer, local=False):
        attended, cache_keys, cache_values = self.self_attn(
            self.input_layernorm(x), cache_keys, cache_values, positions, layer, local
        )
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache_keys, cache_values


class LlamaNetwork(nnx.Module):
    """A Llama-family decoder implementing the :mod:`lmppl.lm.base` network interface."""

    def __init__(self, config: ModelConfig, get: ParameterSource):
        vocab, hidden = config.vocab_size, config.hidden_size
        self.config = config
        self.embed_tokens = Embedding(get("model.embed_tokens.weight", (vocab, hidden)))
        self.layers = nnx.List(
            [LlamaBlock(config, get, f"model.layers.{i}") for i in range(config.num_layers)]
        )
        self.norm = RMSNorm(get("model.norm.weight", (hidden,)), config.norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Embedding(get("lm_head.weight", (vocab, hidden)))
        )

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> KVCache:
        """An empty cache of length 0 (per layer ``[batch_size, max_length, H_kv, D]``; one
        ``[batch_size, L, max_length, H_kv, D]`` buffer when the blocks are scanned)."""
        c = self.config
        stacked = isinstance(self.layers, LayerStack)
        return empty_cache(
            c.num_layers, batch_size, max_length, c.num_kv_heads, c.head_dim, dtype, stacked
        )

    def __call__(
        self, tokens: jax.Array, cache: KVCache, token_counts: jax.Array | None = None
    ) -> LMOutput:
        """Feed ``tokens`` ``[B, S]`` at positions ``cache.length + (0..S-1)``."""
        steps = tokens.shape[1]
        positions = token_positions(cache.length, steps)
        x = self.embed_tokens(tokens)
        x, keys, values = run_layers(self.layers, x, cache, positions, self.config)
        hidden = self.norm(x)
        output_embedding = self.embed_tokens if self.lm_head is None else self.lm_head
        return LMOutput(
            logits=output_embedding.attend(hidden),
            hidden=hidden,
            cache=next_cache(cache, keys, values, token_counts, steps),
        )
