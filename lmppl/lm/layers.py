"""Pieces shared by the decoder networks: projections, norms, RoPE and cached attention.

Every network in :mod:`lmppl.lm` is built from a :class:`ParameterSource`, a callable that
returns the tensor of a given Hugging Face name, checked against the shape the config
implies and cast to the network's dtype (see :func:`lmppl.lm.build.build_network`). The
modules here hold those tensors as ``nnx.Param`` leaves; they never initialise randomly.

Attention runs against a static-shape cache (:class:`lmppl.lm.base.KVCache`): the ``S`` new
keys and values of row ``b`` are written at positions ``length[b] + (0..S-1)`` and each
query at position ``q`` attends the cache positions ``j`` with ``j <= q`` (and
``q - j < window`` for local attention). Scores and the softmax are computed in float32
whatever the parameter dtype. Positions at or past the cache length ``L`` are not written
(the caller sizes the cache for prompt plus generation); positions a row has written beyond
its ``length`` (right padding) are never visible to its real queries and are overwritten by
the row's next tokens.

The ``L`` blocks of a network are applied in one of two ways. By default they are an
``nnx.List`` unrolled in Python (:func:`run_blocks`): XLA compiles ``L`` copies of the block,
each specialised to its layer (window, RoPE base), and the cache holds one buffer
``[B, L, H_kv, D]`` per layer. :func:`lmppl.lm.scanned` turns them into one
:class:`LayerStack`: a single block whose parameters carry a leading layer axis
``[layers, ...]``, applied by ``jax.lax.scan`` so that XLA compiles one block body whatever
the depth; its cache holds every layer in one buffer ``[B, layers, L, H_kv, D]`` (batch axis
still leading), layer ``l`` writing into and attending slot ``l``. Layers that differ
(sliding-window ``"local"`` layers among global ones, Gemma 3's local RoPE base) share the
scanned block and are told apart by a per-layer flag scanned with the parameters (see
:func:`local_layer_flags`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmppl.lm.base import KVCache
from lmppl.lm.config import ModelConfig

__all__ = [
    "ACTIVATIONS",
    "Embedding",
    "LayerNorm",
    "LayerStack",
    "Linear",
    "ParameterSource",
    "RMSNorm",
    "apply_rope",
    "cached_attention",
    "transposed",
    "default_inverse_frequencies",
    "default_scale",
    "empty_cache",
    "gelu_new",
    "layer_slot",
    "layer_window",
    "linear_from_torch",
    "local_layer_flags",
    "next_cache",
    "run_blocks",
    "run_layers",
    "token_positions",
    "write_rows",
]


class ParameterSource(Protocol):
    """Where a network's constructor reads its parameters from."""

    def __call__(self, name: str, shape: tuple[int, ...]) -> jax.Array:
        """The tensor called ``name`` (Hugging Face PyTorch naming), in the network's dtype.

        Raises ``ValueError`` naming the tensor when it is missing or its shape is not
        ``shape`` (the shape as stored, before any transposition).
        """
        ...


def gelu_new(x: jax.Array) -> jax.Array:
    """GPT-2's tanh GELU: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


class Linear(nnx.Module):
    """``y = x W + b`` with ``W`` ``[in, out]`` (the JAX layout) and an optional bias ``[out]``."""

    def __init__(self, kernel: jax.Array, bias: jax.Array | None = None):
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(bias) if bias is not None else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


def transposed(matrix: jax.Array) -> jax.Array:
    """``matrix.T``; for a concrete array done in NumPy, so that loading a checkpoint
    (eager code) does not compile one XLA transpose per weight shape (seconds for a model
    with a dozen shapes, paid on every load)."""
    if isinstance(matrix, jax.core.Tracer):
        return matrix.T
    return jnp.asarray(np.ascontiguousarray(np.asarray(matrix).T))


def linear_from_torch(
    get: ParameterSource, name: str, in_features: int, out_features: int, bias: bool
) -> Linear:
    """A :class:`Linear` from a ``torch.nn.Linear`` stored as ``name.weight`` ``[out, in]``."""
    kernel = transposed(get(f"{name}.weight", (out_features, in_features)))
    return Linear(kernel, get(f"{name}.bias", (out_features,)) if bias else None)


class Embedding(nnx.Module):
    """A token (or position) table ``E`` ``[V, H]``; ``attend`` gives tied logits ``h E^T``."""

    def __init__(self, table: jax.Array):
        self.table = nnx.Param(table)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], ids, axis=0, mode="clip")

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits ``[..., V]`` of hidden states ``[..., H]`` against the table."""
        return jnp.einsum(
            "...h,vh->...v", hidden, self.table[...], preferred_element_type=jnp.float32
        )


class RMSNorm(nnx.Module):
    """``y = (offset + w) * x / sqrt(mean(x^2) + eps)``, normalised in float32.

    ``offset`` 0 is Hugging Face Llama's norm (the normalised ``x`` is cast back to the input
    dtype, then scaled by ``w``); ``offset`` 1 is Gemma's ``1 + w``, applied in float32
    before the cast, as ``transformers``' Gemma does.
    """

    def __init__(self, weight: jax.Array, eps: float, offset: float = 0.0):
        self.weight = nnx.Param(weight)
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            scale = self.offset + self.weight[...].astype(jnp.float32)
            return (normed * scale).astype(x.dtype)
        return self.weight[...] * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """``y = w * (x - mean(x)) / sqrt(var(x) + eps) + b``, normalised in float32."""

    def __init__(self, weight: jax.Array, bias: jax.Array, eps: float):
        self.weight = nnx.Param(weight)
        self.bias = nnx.Param(bias)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(variance + self.eps)
        weight = self.weight[...].astype(jnp.float32)
        return (normed * weight + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def token_positions(lengths: jax.Array, steps: int) -> jax.Array:
    """Positions ``[B, S]`` of ``S`` new tokens: ``lengths[b] + i``."""
    return lengths[:, None].astype(jnp.int32) + jnp.arange(steps, dtype=jnp.int32)[None, :]


def default_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Plain RoPE's float32 frequencies ``f_k = theta^(-2k/D)``, ``k < D/2``."""
    half = head_dim // 2
    exponents = jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)  # 2k / D
    return 1.0 / (theta**exponents)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    theta: float,
    inverse_frequencies: jax.Array | None = None,
    attention_factor: float | jax.Array = 1.0,
) -> jax.Array:
    """Rotary position embedding in the half-split (Hugging Face) layout.

    With ``D`` the head width, ``f_k = theta^(-2k/D)`` for ``k < D/2`` and the angle
    ``a_k = p f_k`` at position ``p``, the pair ``(x_k, x_{k+D/2})`` is rotated to
    ``(x_k cos a_k - x_{k+D/2} sin a_k, x_{k+D/2} cos a_k + x_k sin a_k)``. Given
    ``inverse_frequencies`` ``[d/2]`` (scaled RoPE, see :mod:`lmppl.lm.rope`) they replace
    ``f``, only the first ``d`` of the ``D`` features are rotated (partial rotary embeddings;
    the rest pass through), and cos and sin are multiplied by ``attention_factor``.

    Args:
      x: ``[B, S, heads, D]``.
      positions: ``[B, S]`` int positions.
      theta: the base frequency (unused when ``inverse_frequencies`` is given).
      inverse_frequencies: ``[d/2]`` float32 frequencies, ``d <= D``.
      attention_factor: multiplier of cos and sin (YaRN's and LongRoPE's attention scaling);
        a traced scalar when it differs between the layers of a scanned stack.
    """
    if inverse_frequencies is None:
        inverse_frequencies = default_inverse_frequencies(x.shape[-1], theta)
    half = inverse_frequencies.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * inverse_frequencies  # [B, S, d/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    if isinstance(attention_factor, jax.Array) or attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    x32 = x.astype(jnp.float32)
    first, second = x32[..., :half], x32[..., half : 2 * half]
    rotated = [first * cos - second * sin, second * cos + first * sin]
    if 2 * half < x.shape[-1]:
        rotated.append(x32[..., 2 * half :])
    return jnp.concatenate(rotated, axis=-1).astype(x.dtype)


def write_rows(
    buffer: jax.Array, new: jax.Array, positions: jax.Array, layer: jax.Array | None = None
) -> jax.Array:
    """Write ``new[b, i]`` at ``buffer[b, positions[b, i]]``; positions past the end are dropped.

    With ``layer``, ``buffer`` is a stacked cache ``[B, layers, L, ...]`` and ``new[b, i]`` goes
    to ``buffer[b, layer, positions[b, i]]``: only the new rows are written (in place when
    ``buffer`` is a loop carry), never a whole layer.

    Args:
      buffer: ``[B, L, ...]`` (or ``[B, layers, L, ...]`` with ``layer``).
      new: ``[B, S, ...]``.
      positions: ``[B, S]`` int.
      layer: a scalar int layer slot, or ``None``.
    """
    rows = jnp.arange(buffer.shape[0])[:, None]
    if layer is None:
        return buffer.at[rows, positions].set(new.astype(buffer.dtype), mode="drop")
    return buffer.at[rows, layer, positions].set(new.astype(buffer.dtype), mode="drop")


def layer_slot(buffer: jax.Array, layer: jax.Array | int | None) -> jax.Array:
    """Layer ``layer``'s ``[B, L, H_kv, D]`` of a stacked cache buffer ``[B, layers, L, H_kv, D]``
    (``layer`` ``None``: ``buffer`` is already one layer's)."""
    if layer is None:
        return buffer
    return jax.lax.dynamic_index_in_dim(buffer, layer, axis=1, keepdims=False)


def cached_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    cache_keys: jax.Array,
    cache_values: jax.Array,
    positions: jax.Array,
    layer: jax.Array | int | None = None,
    *,
    scale: float,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write the new keys/values into the layer's cache, then attend with a causal (windowed) mask.

    For query head ``h`` (served by key/value head ``h // G``, ``G = H_q / H_kv``) at position
    ``q``: ``out = sum_j softmax_j(scale * <query, K_j>) V_j`` over cache positions ``j <= q``
    (and ``q - j < window`` when ``window`` is given). Scores and softmax are float32; with
    ``softcap`` ``c`` the scaled scores ``s`` become ``c tanh(s / c)`` before masking (Gemma 2).

    Args:
      query: ``[B, S, H_q, D]``.
      key, value: ``[B, S, H_kv, D]``, the new tokens' keys and values.
      cache_keys, cache_values: this layer's cache ``[B, L, H_kv, D]``, or with ``layer``
        every layer's ``[B, layers, L, H_kv, D]``.
      positions: ``[B, S]`` positions of the new tokens.
      layer: this layer's slot in a stacked cache (a traced scalar inside the layer scan),
        or ``None`` for a per-layer cache.
      scale: score multiplier (``1/sqrt(D)``, or 1 for GPT-Neo).
      window: local attention width, or ``None`` for global attention (a traced scalar
        when local and global layers share one scanned block; global ones then get a
        window no query can reach past).
      softcap: the score soft-capping constant, or ``None``.

    Returns:
      ``(output [B, S, H_q, D], cache_keys, cache_values)`` with the layer's slot updated.
    """
    cache_keys = write_rows(cache_keys, key, positions, layer)
    cache_values = write_rows(cache_values, value, positions, layer)
    layer_keys, layer_values = layer_slot(cache_keys, layer), layer_slot(cache_values, layer)
    batch, steps, query_heads, head_dim = query.shape
    kv_heads, cache_length = layer_keys.shape[2], layer_keys.shape[1]
    key_positions = jnp.arange(cache_length, dtype=jnp.int32)
    visible = _visible(positions[:, :, None] - key_positions[None, None, :], window)  # [B, S, L]
    if steps == 1:
        output = _single_query_attention(
            query, layer_keys, layer_values, visible[:, 0], scale=scale, softcap=softcap
        )
        return output, cache_keys, cache_values
    grouped = query.reshape(batch, steps, kv_heads, query_heads // kv_heads, head_dim)
    scores = jnp.einsum(
        "bskgd,blkd->bkgsl", grouped, layer_keys, preferred_element_type=jnp.float32
    )
    scores = _final_scores(scores, visible[:, None, None], scale=scale, softcap=softcap)
    probabilities = jax.nn.softmax(scores, axis=-1)
    output = jnp.einsum(
        "bkgsl,blkd->bskgd",
        probabilities.astype(layer_values.dtype),
        layer_values,
        preferred_element_type=jnp.float32,
    )
    output = output.reshape(batch, steps, query_heads, head_dim).astype(query.dtype)
    return output, cache_keys, cache_values


def _visible(distance: jax.Array, window: int | jax.Array | None) -> jax.Array:
    """Causal (and windowed) visibility from ``query position − key position``."""
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance < window)
    return visible


def _final_scores(
    scores: jax.Array, visible: jax.Array, *, scale: float, softcap: float | None
) -> jax.Array:
    """Scale, soft-cap (``c tanh(s / c)``) and mask float32 attention scores."""
    if scale != 1.0:
        scores = scores * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    return jnp.where(visible, scores, jnp.finfo(jnp.float32).min)


def _single_query_attention(
    query: jax.Array,
    cache_keys: jax.Array,
    cache_values: jax.Array,
    visible: jax.Array,
    *,
    scale: float,
    softcap: float | None,
) -> jax.Array:
    """:func:`cached_attention` for one new token per row (a decoding step).

    The same sums as the general path, written as broadcast products reduced over ``D`` and
    then over ``L`` in the cache's own ``[B, L, H_kv, D]`` layout: a batched matrix product
    with a query of one row would first transpose the whole cache on every step (on CPU
    that copy and the tiny matrix products cost more than the arithmetic).

    Args:
      visible: ``[B, L]`` which cache positions the query sees.
    """
    batch, _, query_heads, head_dim = query.shape
    kv_heads = cache_keys.shape[2]
    grouped = query.reshape(batch, 1, kv_heads, query_heads // kv_heads, head_dim)
    scores = jnp.sum(
        grouped.astype(jnp.float32) * cache_keys[:, :, :, None, :].astype(jnp.float32), axis=-1
    )  # [B, L, H_kv, G]
    scores = _final_scores(scores, visible[:, :, None, None], scale=scale, softcap=softcap)
    probabilities = jax.nn.softmax(scores, axis=1)
    output = jnp.sum(
        probabilities[..., None] * cache_values[:, :, :, None, :].astype(jnp.float32), axis=1
    )  # [B, H_kv, G, D]
    return output.reshape(batch, 1, query_heads, head_dim).astype(query.dtype)


def default_scale(head_dim: int) -> float:
    """The usual score scale ``1/sqrt(D)``."""
    return 1.0 / math.sqrt(head_dim)


def empty_cache(
    num_layers: int,
    batch_size: int,
    max_length: int,
    kv_heads: int,
    head_dim: int,
    dtype,
    stacked: bool = False,
) -> KVCache:
    """A zero :class:`KVCache` of length 0: per layer keys/values ``[B, L, H_kv, D]``, or
    with ``stacked`` (a :class:`LayerStack`) one ``[B, layers, L, H_kv, D]`` buffer each."""
    if stacked:
        shape = (batch_size, num_layers, max_length, kv_heads, head_dim)
        return KVCache(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            length=jnp.zeros((batch_size,), jnp.int32),
        )
    shape = (batch_size, max_length, kv_heads, head_dim)
    return KVCache(
        keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
        values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
        length=jnp.zeros((batch_size,), jnp.int32),
    )


def next_cache(
    cache: KVCache,
    keys: jax.Array | Sequence[jax.Array],
    values: jax.Array | Sequence[jax.Array],
    token_counts: jax.Array | None,
    steps: int,
) -> KVCache:
    """The cache after a call: the new buffers, ``length + token_counts`` (default S)."""
    if token_counts is None:
        advance = jnp.full_like(cache.length, steps)
    else:
        advance = jnp.asarray(token_counts).astype(jnp.int32)
    if not isinstance(keys, jax.Array):
        keys, values = tuple(keys), tuple(values)
    return KVCache(keys=keys, values=values, length=cache.length + advance)


# A window no query reaches past: what a global layer gets when it shares a scanned block
# with local ones (positions are int32 and below the cache length).
_NO_WINDOW = jnp.iinfo(jnp.int32).max


def local_layer_flags(config: ModelConfig) -> bool | np.ndarray:
    """Which layers attend through a sliding window: one Python bool when every layer is of
    the same kind (the scanned block is then specialised at trace time, exactly the
    unstacked block), else a bool array ``[L]`` scanned with the layers' parameters."""
    flags = [config.is_local_layer(layer) for layer in range(config.num_layers)]
    if len(set(flags)) <= 1:
        return bool(flags[0]) if flags else False
    return np.asarray(flags, dtype=bool)


def layer_window(window: int | None, local: bool | jax.Array) -> int | jax.Array | None:
    """The attention window of a layer: ``window`` for local layers, none for global ones;
    a traced ``where`` (global: :data:`_NO_WINDOW`) when ``local`` is traced."""
    if window is None or local is False:
        return None
    if local is True:
        return window
    return jnp.where(local, jnp.int32(window), jnp.int32(_NO_WINDOW))


class LayerStack(nnx.Module):
    """``L`` residual blocks of one structure, stored as one block whose parameters carry a
    leading layer axis, and applied in order by ``jax.lax.scan``.

    With ``h_0 = x`` and ``theta_l`` layer ``l``'s parameters (row ``l`` of every stacked
    leaf), the stack computes ``h_{l+1} = block(h_l; theta_l, local_l)`` for ``l < L``, each
    layer writing its keys and values into slot ``l`` of the stacked cache; the scan body is
    traced and compiled once, so compile time does not grow with ``L``.

    Attributes:
      block: the block module; every ``nnx.Param`` leaf is ``[L, ...]``.
      num_layers: ``L``.
    """

    def __init__(self, block: nnx.Module, num_layers: int):
        self.block = block
        self.num_layers = num_layers

    @classmethod
    def from_blocks(cls, blocks: Sequence[nnx.Module]) -> LayerStack:
        """Stack ``blocks`` (same class, same static attributes, same parameter shapes)."""
        if not blocks:
            raise ValueError("a layer stack needs at least one block")
        graphdef, first = nnx.split(blocks[0])
        states = [first]
        for index, block in enumerate(blocks[1:], start=1):
            other, state = nnx.split(block)
            if other != graphdef:
                raise ValueError(
                    f"block {index} differs in structure from block 0; a layer stack needs "
                    "blocks with the same structure and static attributes"
                )
            states.append(state)
        flat = [jax.tree.leaves(state) for state in states]
        treedef = jax.tree.structure(first)
        del states, first
        stacked = []
        for position in range(len(flat[0])):
            stacked.append(jnp.stack([leaves[position] for leaves in flat]))
            for leaves in flat:  # free each layer's copy once it is stacked
                leaves[position] = None
        return cls(nnx.merge(graphdef, jax.tree.unflatten(treedef, stacked)), len(blocks))

    def truncated(self, num_layers: int) -> LayerStack:
        """The first ``num_layers`` layers (parameters sliced, not copied per layer)."""
        graphdef, state = nnx.split(self.block)
        sliced = jax.tree.map(lambda leaf: leaf[:num_layers], state)
        return LayerStack(nnx.merge(graphdef, sliced), num_layers)

    def __call__(
        self,
        x: jax.Array,
        cache: KVCache,
        positions: jax.Array,
        local: bool | np.ndarray = False,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Run every layer on ``x`` ``[B, S, H]``: ``block(x, keys, values, positions, layer,
        local)`` with ``layer`` the (traced) slot index and ``local`` the layer's flag (a
        Python bool shared by all layers, or row ``layer`` of a ``[L]`` array).

        Returns the last hidden states and the updated stacked keys and values.
        """
        graphdef, state = nnx.split(self.block)
        shared = isinstance(local, bool)
        flags = jnp.zeros((self.num_layers,), bool) if shared else jnp.asarray(local)
        if flags.shape != (self.num_layers,):
            raise ValueError(f"{flags.shape[0]} layer flags for {self.num_layers} layers")

        def body(carry, layer_inputs):
            x, keys, values = carry
            layer_state, layer, layer_local = layer_inputs
            block = nnx.merge(graphdef, layer_state)
            x, keys, values = block(
                x, keys, values, positions, layer, local if shared else layer_local
            )
            return (x, keys, values), None

        layers = jnp.arange(self.num_layers, dtype=jnp.int32)
        (x, keys, values), _ = jax.lax.scan(
            body, (x, cache.keys, cache.values), (state, layers, flags)
        )
        return x, keys, values


def run_blocks(
    blocks: Sequence[nnx.Module],
    x: jax.Array,
    cache: KVCache,
    positions: jax.Array,
    local: Sequence[bool],
) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """Apply residual blocks in order (unrolled), each ``block(x, keys, values, positions,
    None, local[l])`` on its own cache buffers, ``local[l]`` a static Python bool.

    Returns the last hidden states and every layer's updated cache keys and values.
    """
    keys, values = [], []
    for block, layer_keys, layer_values, layer_local in zip(
        blocks, cache.keys, cache.values, local, strict=True
    ):
        x, layer_keys, layer_values = block(
            x, layer_keys, layer_values, positions, None, layer_local
        )
        keys.append(layer_keys)
        values.append(layer_values)
    return x, keys, values


def run_layers(
    layers: nnx.Module, x: jax.Array, cache: KVCache, positions: jax.Array, config: ModelConfig
) -> tuple[jax.Array, jax.Array | list[jax.Array], jax.Array | list[jax.Array]]:
    """Apply a network's blocks: scanned when ``layers`` is a :class:`LayerStack`, else
    unrolled (:func:`run_blocks`, each layer specialised to its kind)."""
    if isinstance(layers, LayerStack):
        return layers(x, cache, positions, local_layer_flags(config))
    local = [config.is_local_layer(layer) for layer in range(config.num_layers)]
    return run_blocks(layers, x, cache, positions, local)
