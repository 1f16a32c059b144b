"""T5 / Flan-T5 (encoder-decoder) as a Flax NNX network, not yet reachable from ``lmppl.load``.

The encoder runs once per source (:meth:`T5Network.start_cache`), which also computes every
decoder layer's cross-attention keys and values; the decoder then follows the
:mod:`lmppl.lm.base` network interface (``__call__(tokens, cache, token_counts)``) against a
:class:`T5Cache` whose every leaf leads with the batch axis, so ``reorder_cache`` and
``broadcast_cache`` apply unchanged. Not yet wired into ``lmppl.LM`` (``source=...``).

T5's maths, as ``transformers``' ``modeling_t5.py``: RMS layer norms without bias
(``w * x / sqrt(mean(x^2) + eps)``), attention scores ``<q, k>`` without the ``1/sqrt(D)``
scale plus a learned relative position bias (bucketed distances, bidirectional in the
encoder, causal in the decoder; the first layer's table serves every layer), a ReLU MLP
(T5) or a gated GELU one (T5 v1.1, Flan-T5), and, when the output is tied to the input
embedding (original T5), decoder outputs scaled by ``d_model^-1/2`` before the logits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmppl.lm.base import LMOutput
from lmppl.lm.layers import (
    ACTIVATIONS,
    Embedding,
    ParameterSource,
    RMSNorm,
    linear_from_torch,
    token_positions,
    write_rows,
)

__all__ = ["T5Cache", "T5Config", "T5Network", "t5_config_from_hf"]


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 checkpoint (``config.json`` names in brackets).

    Attributes:
      vocab_size: [vocab_size].
      hidden_size: [d_model].
      head_dim: [d_kv].
      num_heads: [num_heads].
      intermediate_size: [d_ff].
      encoder_layers: [num_layers].
      decoder_layers: [num_decoder_layers].
      num_buckets, max_distance: relative position buckets
        [relative_attention_num_buckets, relative_attention_max_distance].
      activation: the MLP non-linearity (``"relu"``, ``"gelu_new"``).
      gated: gated MLP ``wo(act(wi_0 x) * wi_1 x)`` (``feed_forward_proj = "gated-gelu"``).
      scale_decoder_outputs: multiply the final decoder states by ``d_model^-1/2`` before
        the output projection (original T5, whose output is tied).
      norm_eps: [layer_norm_epsilon].
      decoder_start_token_id: the first decoder token (T5: the pad id, 0).
      eos_token_id: [eos_token_id].
      context_length: the longest decoder sequence (T5 has no absolute limit; 512 default).
    """

    vocab_size: int
    hidden_size: int
    head_dim: int
    num_heads: int
    intermediate_size: int
    encoder_layers: int
    decoder_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    activation: str = "relu"
    gated: bool = False
    scale_decoder_outputs: bool = True
    norm_eps: float = 1e-6
    decoder_start_token_id: int = 0
    eos_token_id: int | None = 1
    context_length: int = 512


def t5_config_from_hf(d: Mapping[str, Any]) -> T5Config:
    """A :class:`T5Config` from a Hugging Face T5 ``config.json`` dictionary."""
    projection = str(d.get("feed_forward_proj", "relu"))
    parts = projection.split("-")
    gated = parts[0] == "gated"
    activation = parts[-1]
    if projection == "gated-gelu":
        activation = "gelu_new"
    if activation not in ACTIVATIONS:
        raise ValueError(f"t5: feed_forward_proj {projection!r} is not supported")
    layers = int(d.get("num_layers", 6))
    start = d.get("decoder_start_token_id")
    return T5Config(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d.get("d_model", 512)),
        head_dim=int(d.get("d_kv", 64)),
        num_heads=int(d.get("num_heads", 8)),
        intermediate_size=int(d.get("d_ff", 2048)),
        encoder_layers=layers,
        decoder_layers=int(d.get("num_decoder_layers") or layers),
        num_buckets=int(d.get("relative_attention_num_buckets", 32)),
        max_distance=int(d.get("relative_attention_max_distance", 128)),
        activation=activation,
        gated=gated,
        # transformers 5 saves scale_decoder_outputs (and always tie_word_embeddings=True);
        # older files say tie_word_embeddings=false for the unscaled T5 v1.1 / Flan-T5.
        scale_decoder_outputs=bool(
            d["scale_decoder_outputs"]
            if "scale_decoder_outputs" in d
            else d.get("tie_word_embeddings", True) is not False
        ),
        norm_eps=float(d.get("layer_norm_epsilon", 1e-6)),
        decoder_start_token_id=int(start if start is not None else d.get("pad_token_id") or 0),
        eos_token_id=d.get("eos_token_id", 1),
        context_length=int(d.get("n_positions") or 512),
    )


class T5Cache(NamedTuple):
    """Decoder state for one source per row, batch axis leading.

    Fields:
      keys, values: per decoder layer ``[B, L, H, D]`` self-attention keys/values.
      cross_keys, cross_values: per decoder layer ``[B, S, H, D]``, the encoder output's
        cross-attention keys/values (computed once per source).
      source_mask: ``[B, S]`` bool, the real (unpadded) source positions.
      length: ``[B]`` int32, decoder positions already written.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    cross_keys: tuple[jax.Array, ...]
    cross_values: tuple[jax.Array, ...]
    source_mask: jax.Array
    length: jax.Array


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of ``key position - query position`` (exact below ``num_buckets/4`` (or
    /2 causal), logarithmic up to ``max_distance``, one bucket beyond)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    scaled = (
        jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    )
    large = max_exact + scaled.astype(relative_position.dtype)  # truncation, as .to(long)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


def _attend(
    query: jax.Array, keys: jax.Array, values: jax.Array, bias: jax.Array, visible: jax.Array
) -> jax.Array:
    """``softmax(<q, k> + bias)`` over visible keys, float32 scores; ``[B, S, H, D]``.

    Args:
      query: ``[B, S, H, D]``; keys, values: ``[B, K, H, D]``; bias: broadcastable to
        ``[B, H, S, K]``; visible: broadcastable to ``[B, H, S, K]``.
    """
    scores = jnp.einsum("bshd,bkhd->bhsk", query, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(visible, scores + bias, jnp.finfo(jnp.float32).min)
    probabilities = jax.nn.softmax(scores, axis=-1)
    output = jnp.einsum(
        "bhsk,bkhd->bshd",
        probabilities.astype(values.dtype),
        values,
        preferred_element_type=jnp.float32,
    )
    return output.astype(query.dtype)


class T5Attention(nnx.Module):
    """Multi-head attention without score scaling (``q``, ``k``, ``v``, ``o``; no biases)."""

    def __init__(self, config: T5Config, get: ParameterSource, prefix: str):
        hidden, inner = config.hidden_size, config.num_heads * config.head_dim
        self.q = linear_from_torch(get, f"{prefix}.q", hidden, inner, False)
        self.k = linear_from_torch(get, f"{prefix}.k", hidden, inner, False)
        self.v = linear_from_torch(get, f"{prefix}.v", hidden, inner, False)
        self.o = linear_from_torch(get, f"{prefix}.o", inner, hidden, False)
        self.num_heads, self.head_dim = config.num_heads, config.head_dim

    def heads(self, projection, x: jax.Array) -> jax.Array:
        return projection(x).reshape(*x.shape[:2], self.num_heads, self.head_dim)

    def output(self, attended: jax.Array) -> jax.Array:
        return self.o(attended.reshape(*attended.shape[:2], -1))


class T5MLP(nnx.Module):
    """``wo(act(wi x))`` (T5) or ``wo(act(wi_0 x) * wi_1 x)`` (T5 v1.1, Flan-T5)."""

    def __init__(self, config: T5Config, get: ParameterSource, prefix: str):
        hidden, inner = config.hidden_size, config.intermediate_size
        if config.gated:
            self.wi = None
            self.wi_0 = linear_from_torch(get, f"{prefix}.wi_0", hidden, inner, False)
            self.wi_1 = linear_from_torch(get, f"{prefix}.wi_1", hidden, inner, False)
        else:
            self.wi = linear_from_torch(get, f"{prefix}.wi", hidden, inner, False)
            self.wi_0 = self.wi_1 = None
        self.wo = linear_from_torch(get, f"{prefix}.wo", inner, hidden, False)
        self.activation = config.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        if self.wi is not None:
            return self.wo(act(self.wi(x)))
        return self.wo(act(self.wi_0(x)) * self.wi_1(x))


def _norm(config: T5Config, get: ParameterSource, name: str) -> RMSNorm:
    return RMSNorm(get(name, (config.hidden_size,)), config.norm_eps)


class T5Network(nnx.Module):
    """T5's encoder and cached decoder (see the module docstring)."""

    def __init__(self, config: T5Config, get: ParameterSource):
        vocab, hidden = config.vocab_size, config.hidden_size
        self.config = config
        self.shared = Embedding(get("shared.weight", (vocab, hidden)))
        buckets = (config.num_buckets, config.num_heads)
        self.encoder_bias = nnx.Param(
            get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", buckets)
        )
        self.decoder_bias = nnx.Param(
            get("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", buckets)
        )
        e, d = "encoder.block", "decoder.block"
        self.encoder_attention = nnx.List(
            [T5Attention(config, get, f"{e}.{i}.layer.0.SelfAttention") for i in _n(config, 0)]
        )
        self.encoder_attention_norm = nnx.List(
            [_norm(config, get, f"{e}.{i}.layer.0.layer_norm.weight") for i in _n(config, 0)]
        )
        self.encoder_mlp = nnx.List(
            [T5MLP(config, get, f"{e}.{i}.layer.1.DenseReluDense") for i in _n(config, 0)]
        )
        self.encoder_mlp_norm = nnx.List(
            [_norm(config, get, f"{e}.{i}.layer.1.layer_norm.weight") for i in _n(config, 0)]
        )
        self.encoder_norm = _norm(config, get, "encoder.final_layer_norm.weight")
        self.self_attention = nnx.List(
            [T5Attention(config, get, f"{d}.{i}.layer.0.SelfAttention") for i in _n(config, 1)]
        )
        self.self_attention_norm = nnx.List(
            [_norm(config, get, f"{d}.{i}.layer.0.layer_norm.weight") for i in _n(config, 1)]
        )
        self.cross_attention = nnx.List(
            [T5Attention(config, get, f"{d}.{i}.layer.1.EncDecAttention") for i in _n(config, 1)]
        )
        self.cross_attention_norm = nnx.List(
            [_norm(config, get, f"{d}.{i}.layer.1.layer_norm.weight") for i in _n(config, 1)]
        )
        self.decoder_mlp = nnx.List(
            [T5MLP(config, get, f"{d}.{i}.layer.2.DenseReluDense") for i in _n(config, 1)]
        )
        self.decoder_mlp_norm = nnx.List(
            [_norm(config, get, f"{d}.{i}.layer.2.layer_norm.weight") for i in _n(config, 1)]
        )
        self.decoder_norm = _norm(config, get, "decoder.final_layer_norm.weight")
        self.lm_head = Embedding(get("lm_head.weight", (vocab, hidden)))

    def encode(self, source: jax.Array, source_lengths: jax.Array) -> jax.Array:
        """Encoder states ``[B, S, H]`` of right-padded ``source`` ``[B, S]``."""
        c = self.config
        steps = source.shape[1]
        mask = jnp.arange(steps)[None, :] < source_lengths[:, None]  # [B, S]
        relative = jnp.arange(steps)[None, :] - jnp.arange(steps)[:, None]  # key - query
        buckets = relative_position_bucket(relative, True, c.num_buckets, c.max_distance)
        bias = jnp.transpose(self.encoder_bias[...][buckets], (2, 0, 1))[None]  # [1, H, S, S]
        bias = bias.astype(jnp.float32)
        visible = mask[:, None, None, :]
        x = self.shared(source)
        for attention, norm, mlp, mlp_norm in zip(
            self.encoder_attention,
            self.encoder_attention_norm,
            self.encoder_mlp,
            self.encoder_mlp_norm,
            strict=True,
        ):
            h = norm(x)
            q, k, v = (attention.heads(p, h) for p in (attention.q, attention.k, attention.v))
            x = x + attention.output(_attend(q, k, v, bias, visible))
            x = x + mlp(mlp_norm(x))
        return self.encoder_norm(x)

    def start_cache(
        self,
        source: jax.Array,
        source_lengths: jax.Array,
        max_length: int,
        dtype: Any = jnp.float32,
    ) -> T5Cache:
        """Run the encoder once and return an empty decoder cache holding the
        cross-attention keys/values of every decoder layer."""
        c = self.config
        encoded = self.encode(source, source_lengths)
        batch, steps = source.shape
        shape = (batch, max_length, c.num_heads, c.head_dim)
        cross_keys = tuple(a.heads(a.k, encoded).astype(dtype) for a in self.cross_attention)
        cross_values = tuple(a.heads(a.v, encoded).astype(dtype) for a in self.cross_attention)
        return T5Cache(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(c.decoder_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(c.decoder_layers)),
            cross_keys=cross_keys,
            cross_values=cross_values,
            source_mask=jnp.arange(steps)[None, :] < source_lengths[:, None],
            length=jnp.zeros((batch,), jnp.int32),
        )

    def __call__(
        self, tokens: jax.Array, cache: T5Cache, token_counts: jax.Array | None = None
    ) -> LMOutput:
        """Feed decoder ``tokens`` ``[B, S]`` at positions ``cache.length + (0..S-1)``."""
        c = self.config
        steps = tokens.shape[1]
        positions = token_positions(cache.length, steps)  # [B, S]
        cache_length = cache.keys[0].shape[1]
        key_positions = jnp.arange(cache_length, dtype=jnp.int32)
        relative = key_positions[None, None, :] - positions[:, :, None]  # [B, S, L]
        buckets = relative_position_bucket(relative, False, c.num_buckets, c.max_distance)
        bias = jnp.transpose(self.decoder_bias[...][buckets], (0, 3, 1, 2))  # [B, H, S, L]
        bias = bias.astype(jnp.float32)
        causal = (relative <= 0)[:, None]  # [B, 1, S, L]
        source_visible = cache.source_mask[:, None, None, :]
        x = self.shared(tokens)
        keys, values = [], []
        for layer in range(c.decoder_layers):
            attention = self.self_attention[layer]
            h = self.self_attention_norm[layer](x)
            q, k, v = (attention.heads(p, h) for p in (attention.q, attention.k, attention.v))
            layer_keys = write_rows(cache.keys[layer], k, positions)
            layer_values = write_rows(cache.values[layer], v, positions)
            x = x + attention.output(_attend(q, layer_keys, layer_values, bias, causal))
            keys.append(layer_keys)
            values.append(layer_values)
            cross = self.cross_attention[layer]
            h = self.cross_attention_norm[layer](x)
            attended = _attend(
                cross.heads(cross.q, h),
                cache.cross_keys[layer],
                cache.cross_values[layer],
                jnp.float32(0.0),
                source_visible,
            )
            x = x + cross.output(attended)
            x = x + self.decoder_mlp[layer](self.decoder_mlp_norm[layer](x))
        hidden = self.decoder_norm(x)
        scaled = hidden * (c.hidden_size**-0.5) if c.scale_decoder_outputs else hidden
        advance = (
            jnp.full_like(cache.length, steps)
            if token_counts is None
            else jnp.asarray(token_counts).astype(jnp.int32)
        )
        return LMOutput(
            logits=self.lm_head.attend(scaled.astype(hidden.dtype)),
            hidden=hidden,
            cache=cache._replace(
                keys=tuple(keys), values=tuple(values), length=cache.length + advance
            ),
        )


def _n(config: T5Config, decoder: int) -> range:
    return range(config.decoder_layers if decoder else config.encoder_layers)
