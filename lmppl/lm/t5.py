"""T5 / Flan-T5 (encoder-decoder) as a Flax NNX network and a source-conditioned language model.

:class:`T5Network` is the maths: the encoder runs once per source
(:meth:`T5Network.start_cache`), which also computes every decoder layer's cross-attention
keys and values; the decoder then follows the :mod:`lmppl.lm.base` network interface
(``__call__(tokens, cache, token_counts)``) against a :class:`T5Cache` whose every leaf leads
with the batch axis, so ``reorder_cache`` and ``broadcast_cache`` apply unchanged.

:class:`T5LanguageModel` (what ``lmppl.load`` returns for a ``model_type: "t5"`` folder, and
``lmppl.random_lm("t5")``) makes the decoder a sequential distribution conditioned on a
source, ``p0(s_1:T | x) = prod_t softmax(decoder(x, [d_0, s_<t]))[s_t]`` with ``d_0`` the
decoder start token, without any change to the inference stack: the source travels in the
*prompt*. ``lmppl.LM(t5, source=x, max_new_tokens=T)`` resolves ``x`` into the packed prompt

    [d_0, x_1, ..., x_S]   (right-padded; real length 1 + S)

and the model reads it on its first call. ``init_cache`` returns a :class:`T5StartCache` (no
encoder states yet); ``apply`` against it runs the encoder on ``x`` *with the parameters it
is given* (so TNT gradients reach the encoder and DeRa runs each model's own encoder), builds
the :class:`T5Cache` with the cross-attention keys/values and feeds ``d_0`` to the decoder.
Every later call is the cached decoder. A prompt shared by all particles is prefilled once
and broadcast, so the encoder runs once per source. Because the source is a pytree leaf of
``LM`` (its prompt), batched and per-particle sources (``[..., 1 + S]``), sources in TNT
datasets (``[N, 1 + S]``) and vmapped sweeps work as prompts do.

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
import numpy as np
from flax import nnx

from lmppl.lm.base import LanguageModel, LMOutput, Tokenizer
from lmppl.lm.layers import (
    ACTIVATIONS,
    Embedding,
    ParameterSource,
    RMSNorm,
    linear_from_torch,
    token_positions,
    write_rows,
)

__all__ = [
    "T5_MODEL_TYPES",
    "T5Cache",
    "T5Config",
    "T5LanguageModel",
    "T5Network",
    "T5StartCache",
    "is_t5_config",
    "t5_config_from_hf",
    "t5_language_model",
]

# Hugging Face ``model_type`` values read as T5 (Flan-T5 checkpoints say "t5").
T5_MODEL_TYPES: tuple[str, ...] = ("t5",)


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

    @property
    def architecture(self) -> str:
        return "t5"

    @property
    def bos_token_id(self) -> None:
        """T5 has no beginning-of-sequence token (the decoder starts from its start token)."""
        return None

    def replace(self, **changes: Any) -> T5Config:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def is_t5_config(d: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` dictionary describes a T5 / Flan-T5 checkpoint."""
    architectures = d.get("architectures") or []
    return d.get("model_type") in T5_MODEL_TYPES or (
        d.get("model_type") is None and bool(architectures) and architectures[0].startswith("T5")
    )


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


class T5StartCache(NamedTuple):
    """A :class:`T5LanguageModel`'s cache before its packed prompt is fed (no encoder yet).

    Fields:
      slots: ``[B, L, 2 · decoder_layers · num_heads · head_dim]`` zeros of the cache dtype.
        Only its shape and dtype are read: ``L`` (the positions the inference stack asked
        for: packed prompt ``1 + S`` plus ``T`` new tokens) and the dtype of the keys and
        values. Its size is that of the :class:`T5Cache` the first call builds (``S``
        cross-attention plus ``1 + T`` self-attention keys and values per layer), so memory
        estimates from ``init_cache``'s shape (``lmppl.infer.run_bytes``) hold; under
        ``jit`` the unused zeros are never materialised.
      length: ``[B]`` int32 zeros (nothing written yet).
    """

    slots: jax.Array
    length: jax.Array


class T5LanguageModel(LanguageModel):
    """A T5 checkpoint as a language model whose prompt is the packed source (module doc).

    ``apply(params, tokens, cache, token_counts)`` against a fresh :class:`T5StartCache`
    reads ``tokens`` ``[B, 1 + S]`` as ``[d_0, x_1..x_S]`` with ``token_counts - 1`` real
    source tokens, runs the encoder and returns the logits after ``d_0`` at *every* prompt
    position (the inference stack reads the one at ``token_counts - 1``) and a
    :class:`T5Cache` of ``L - S`` decoder positions (``d_0`` written). Against a
    :class:`T5Cache` it is the cached decoder.

    Example::

        from lmppl.prompt import sequence_length

        t5 = lmppl.load("google/flan-t5-small")  # a T5 folder or a cached hub id

        def program():
            source = "summarize: " + document  # text: tokenized, EOS appended
            summary = numpyro.sample("summary", lmppl.LM(t5, source=source, max_new_tokens=24))
            numpyro.factor("short", -0.1 * sequence_length(summary, t5.eos_token_id))

        result = lmppl.infer.SMC(program, 64).run(jax.random.key(0))

    ``lmppl.generate(t5, source=..., ...)``, ``lmppl.realign(t5_a, t5_b, λ)`` and
    ``lmppl.tnt.train(t5, None, ..., source=...)`` take sources the same way.

    Attributes:
      config: the :class:`T5Config`.
      is_encoder_decoder: True: ``lmppl.LM`` takes ``source=`` instead of ``prompt=``.
    """

    is_encoder_decoder = True
    config: T5Config  # type: ignore[assignment]

    def __init__(
        self,
        network: T5Network,
        config: T5Config,
        tokenizer: Tokenizer | None = None,
        name: str = "t5",
    ):
        super().__init__(network, config, tokenizer, name)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"T5LanguageModel({self.name!r}, vocab={c.vocab_size}, "
            f"layers={c.encoder_layers}+{c.decoder_layers}, hidden={c.hidden_size}, "
            f"source and decoder lengths <= {c.context_length})"
        )

    @property
    def context_length(self) -> int:
        """The longest packed prompt plus new tokens: ``1 + S + T <= 2 · n_positions``
        (the source and the decoder sequence ``1 + T`` each within ``n_positions``;
        :meth:`source_prompt` checks them separately)."""
        return 2 * self.config.context_length

    @property
    def decoder_start_token_id(self) -> int:
        return self.config.decoder_start_token_id

    def init_cache(
        self, batch_size: int, max_length: int, dtype: Any | None = None
    ) -> T5StartCache:
        """A :class:`T5StartCache`: the encoder runs on the first ``apply``."""
        if max_length > self.context_length:
            raise ValueError(
                f"a cache of {max_length} positions exceeds the packed context length "
                f"{self.context_length} of {self.name}"
            )
        c = self.config
        width = 2 * c.decoder_layers * c.num_heads * c.head_dim
        return T5StartCache(
            slots=jnp.zeros((batch_size, max_length, width), dtype or self.dtype),
            length=jnp.zeros((batch_size,), jnp.int32),
        )

    def apply(
        self,
        params: Any,
        tokens: jax.Array,
        cache: Any,
        token_counts: jax.Array | None = None,
    ) -> LMOutput:
        """The encoder and the start token (fresh cache), else the cached decoder (pure)."""
        network: Any = nnx.merge(self.graphdef, params)
        if not isinstance(cache, T5StartCache):
            return network(tokens, cache, token_counts)
        rows, width = tokens.shape
        if width < 2:
            raise ValueError(
                f"{self.name}: the packed prompt needs the decoder start token and at least "
                "one source token (build it with lmppl.LM(..., source=...))"
            )
        counts = (
            jnp.full((rows,), width, jnp.int32)
            if token_counts is None
            else jnp.asarray(token_counts).astype(jnp.int32)
        )
        decoder_length = cache.slots.shape[1] - (width - 1)
        if decoder_length > self.config.context_length:
            raise ValueError(
                f"{self.name}: {decoder_length} decoder positions exceed n_positions "
                f"{self.config.context_length}"
            )
        start = network.start_cache(tokens[:, 1:], counts - 1, decoder_length, cache.slots.dtype)
        out = network(tokens[:, :1], start)
        return LMOutput(
            logits=jnp.broadcast_to(out.logits, (rows, width, out.logits.shape[-1])),
            hidden=jnp.broadcast_to(out.hidden, (rows, width, out.hidden.shape[-1])),
            cache=out.cache,
        )

    def encode_source(self, text: str) -> list[int]:
        """The encoder ids of ``text``: the tokenizer's pieces without special tokens, then
        EOS (as T5's tokenizer writes a source)."""
        if self.tokenizer is None:
            raise ValueError(f"a text source needs a model with a tokenizer; {self.name} has none")
        ids = list(self.tokenizer.encode(text, add_bos=False))
        eos = self.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids

    def source_prompt(self, source: Any, max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
        """The packed prompt ``([..., 1 + S] tokens, [...] lengths)`` of a source.

        Args:
          source: text (encoded by :meth:`encode_source`, EOS appended), token ids ``[S]``
            or ``[..., S]`` (used exactly as given, every one real), or a list of texts
            and/or id lists of different lengths (a batch ``[n]``, right-padded with the
            pad id, 0).
          max_new_tokens: T; ``1 + T`` decoder positions must fit ``n_positions``.

        Raises:
          ValueError: an empty or too long source, ids outside the vocabulary, too many new
            tokens (one line each).
        """
        limit = self.config.context_length
        if max_new_tokens + 1 > limit:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} plus the decoder start token exceeds the "
                f"{limit} decoder positions (n_positions) of {self.name}"
            )
        if isinstance(source, str):
            ids = jnp.asarray(self.encode_source(source), jnp.int32)
            lengths = jnp.asarray(ids.shape[-1], jnp.int32)
        elif isinstance(source, list | tuple) and any(
            isinstance(part, str | list | tuple | np.ndarray) for part in source
        ):
            rows = [
                self.encode_source(part) if isinstance(part, str) else [int(i) for i in part]
                for part in source
            ]
            width = max(len(row) for row in rows)
            padded = np.zeros((len(rows), width), np.int32)
            for i, row in enumerate(rows):
                padded[i, : len(row)] = row
            ids = jnp.asarray(padded)
            lengths = jnp.asarray([len(row) for row in rows], jnp.int32)
            if int(lengths.min()) == 0:
                raise ValueError(
                    f"the source of {self.name} is empty (row {int(lengths.argmin())})"
                )
        else:
            ids = jnp.asarray(source)
            if ids.ndim == 0:
                ids = ids[None]
            if ids.shape[-1] == 0:
                raise ValueError(f"the source of {self.name} is empty: give at least one token")
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise TypeError(f"a source must be text or integer token ids, got {ids.dtype}")
            ids = ids.astype(jnp.int32)
            lengths = jnp.full(ids.shape[:-1], ids.shape[-1], jnp.int32)
        width = ids.shape[-1]
        if width == 0:
            raise ValueError(f"the source of {self.name} is empty: give at least one token")
        if width > limit:
            raise ValueError(
                f"the source ({width} tokens) exceeds the {limit} encoder positions "
                f"(n_positions) of {self.name}; shorten it"
            )
        if not isinstance(ids, jax.core.Tracer):
            values = np.asarray(ids)
            if values.min() < 0 or values.max() >= self.vocab_size:
                raise ValueError(
                    f"source token ids must lie in [0, {self.vocab_size}); got "
                    f"{values.min()}..{values.max()}"
                )
        start = jnp.full((*ids.shape[:-1], 1), self.decoder_start_token_id, jnp.int32)
        return jnp.concatenate([start, ids], axis=-1), lengths + 1


def t5_tensors(tensors: Mapping[str, Any], tied: bool) -> dict[str, Any]:
    """``tensors`` with the names :class:`T5Network` reads filled in from their tied
    aliases: ``shared.weight`` from ``encoder.embed_tokens.weight``, and a missing
    ``lm_head.weight`` from ``shared.weight`` when the output is ``tied``
    (``tie_word_embeddings``, default true: ``save_pretrained`` drops tied duplicates, and
    ``transformers`` 5 ties every T5's output, scaled or not)."""
    named = dict(tensors)
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if "shared.weight" not in named and alias in named:
            named["shared.weight"] = named[alias]
    if "lm_head.weight" not in named and tied and "shared.weight" in named:
        named["lm_head.weight"] = named["shared.weight"]
    return named


def t5_language_model(
    config_dict: Mapping[str, Any],
    tensors: Mapping[str, Any],
    tokenizer: Tokenizer | None,
    dtype: Any,
    name: str,
) -> T5LanguageModel:
    """A :class:`T5LanguageModel` from a ``config.json`` dictionary and named tensors (the
    ``T5ForConditionalGeneration`` state dict); a missing tensor or wrong shape is a
    one-line ``ValueError`` naming it."""
    from lmppl.lm.build import TensorTable

    config = t5_config_from_hf(config_dict)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{name}: tokenizer of {tokenizer.vocab_size} tokens for a model of {config.vocab_size}"
        )
    tied = config_dict.get("tie_word_embeddings", True) is not False
    network = T5Network(config, TensorTable(t5_tensors(tensors, tied), dtype, "t5"))
    return T5LanguageModel(network, config, tokenizer, name=name)
