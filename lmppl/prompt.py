"""Prompts: text, token ids, and earlier sampled sequences joined into one token array.

A resolved prompt is a right-padded token array ``tokens`` ``[..., P]`` with a per-row
``length`` ``[...]``: the first ``length`` entries are real, the rest padding. ``P`` is
static (the sum of the parts' static sizes) while ``length`` may be traced, which is what
lets the prompt of a later ``LM`` site contain a sequence sampled earlier in the program
(``lmppl.concat("Once upon a time", story)``) inside a jitted, particle-batched sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmppl.lm.base import Tokenizer

__all__ = ["Concat", "concat", "resolve_model_prompt", "resolve_prompt", "sequence_length"]


class Concat:
    """Parts of a prompt waiting for a tokenizer: ``str``, token ids, or sampled sequences.

    Created by :func:`concat`; resolved by :func:`resolve_prompt` when an ``LM`` site
    (which knows its tokenizer) receives it.
    """

    def __init__(self, parts: Sequence[Any], drop_after_eos: bool):
        self.parts = tuple(parts)
        self.drop_after_eos = drop_after_eos

    def __repr__(self) -> str:
        kinds = ", ".join(
            repr(p) if isinstance(p, str) else f"ids{np.shape(p)}" for p in self.parts
        )
        return f"concat({kinds})"


def concat(*parts: Any, drop_after_eos: bool = True) -> Concat:
    """Join text, token ids and sampled sequences into one prompt.

    Text parts are encoded with the receiving model's tokenizer (a beginning-of-sequence
    token only before a leading text part). Integer arrays are used as given, except
    that with ``drop_after_eos`` everything from the first end-of-sequence token of a
    sampled sequence on is padding and is dropped (sequences sampled by ``lmppl.LM``
    are padded with EOS after they stop).

    Args:
      *parts: ``str``, ``list[int]``, integer arrays ``[..., n]`` (batched arrays make a
        batched prompt) or other :class:`Concat` objects.
      drop_after_eos: drop each array part from its first EOS on.
    """
    flat: list[Any] = []
    for part in parts:
        flat.extend(part.parts if isinstance(part, Concat) else [part])
    if not flat:
        raise ValueError("concat() needs at least one part")
    return Concat(flat, drop_after_eos)


def sequence_length(tokens: jax.Array, eos_token_id: int | None) -> jax.Array:
    """Number of tokens before the first ``eos_token_id`` (all of them if none) ``[...]``."""
    size = tokens.shape[-1]
    if eos_token_id is None:
        return jnp.full(tokens.shape[:-1], size, jnp.int32)
    is_eos = tokens == eos_token_id
    first = jnp.argmax(is_eos, axis=-1)
    return jnp.where(jnp.any(is_eos, axis=-1), first, size).astype(jnp.int32)


def _as_ids(part: Any, name: str) -> jax.Array:
    ids = jnp.asarray(part)
    if ids.ndim == 0:
        ids = ids[None]
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    return ids.astype(jnp.int32)


def resolve_prompt(
    prompt: Any,
    tokenizer: Tokenizer | None,
    vocab_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Turn a prompt into ``(tokens [..., P], length [...])``.

    Text is encoded with ``tokenizer`` (with its BOS convention); token ids are used
    exactly as given. Raises a one-line error for empty prompts, text without a
    tokenizer, and ids outside the vocabulary (checked when the ids are concrete).
    """
    parts = prompt.parts if isinstance(prompt, Concat) else (prompt,)
    drop_after_eos = prompt.drop_after_eos if isinstance(prompt, Concat) else False
    eos = tokenizer.eos_token_id if tokenizer is not None else None

    pieces: list[tuple[jax.Array, jax.Array]] = []
    for index, part in enumerate(parts):
        if isinstance(part, str):
            if tokenizer is None:
                raise ValueError("a text prompt needs a model with a tokenizer; pass token ids")
            ids = jnp.asarray(tokenizer.encode(part, add_bos=index == 0), jnp.int32)
            pieces.append((ids, jnp.asarray(ids.shape[-1], jnp.int32)))
            continue
        ids = _as_ids(part, "a prompt part")
        length = (
            sequence_length(ids, eos)
            if drop_after_eos and not isinstance(part, list | tuple | np.ndarray)
            else jnp.full(ids.shape[:-1], ids.shape[-1], jnp.int32)
        )
        pieces.append((ids, length))

    if sum(ids.shape[-1] for ids, _ in pieces) == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. the BOS token)")
    for ids, _ in pieces:
        if not isinstance(ids, jax.core.Tracer):
            bad = np.asarray(ids)
            if bad.size and (bad.min() < 0 or bad.max() >= vocab_size):
                raise ValueError(
                    f"prompt token ids must lie in [0, {vocab_size}); got {bad.min()}..{bad.max()}"
                )
    if len(pieces) == 1:
        ids, length = pieces[0]
        return ids, jnp.broadcast_to(length, ids.shape[:-1])

    batch_shape = jnp.broadcast_shapes(*(ids.shape[:-1] for ids, _ in pieces))
    total = sum(ids.shape[-1] for ids, _ in pieces)
    tokens = jnp.zeros((*batch_shape, total), jnp.int32)
    offset = jnp.zeros(batch_shape, jnp.int32)
    for ids, length in pieces:
        ids = jnp.broadcast_to(ids, (*batch_shape, ids.shape[-1]))
        length = jnp.broadcast_to(length, batch_shape)
        tokens = _place(tokens, ids, offset, length)
        offset = offset + length
    return tokens, offset


def resolve_model_prompt(
    model: Any, prompt: Any, source: Any, max_new_tokens: int
) -> tuple[jax.Array, jax.Array]:
    """``(tokens [..., P], length [...])`` of what conditions ``model``'s next tokens.

    A decoder-only model takes ``prompt`` (:func:`resolve_prompt`). An encoder-decoder
    model (``model.is_encoder_decoder``, e.g. T5) takes ``source``: its packed prompt
    ``[d_0, x_1..x_S]`` (decoder start token, then the encoder's ids) from
    ``model.source_prompt(source, max_new_tokens)`` (see :mod:`lmppl.lm.t5`). A source for
    a decoder-only model, or an encoder-decoder model without a source or with a prompt,
    is a one-line ``ValueError``.
    """
    name = getattr(model, "name", type(model).__name__)
    if not getattr(model, "is_encoder_decoder", False):
        if source is not None:
            raise ValueError(
                f"source= conditions an encoder-decoder model (T5); {name} is decoder-only: "
                "give its context as prompt="
            )
        if prompt is None:
            raise ValueError(f"{name} needs a prompt (text, token ids or lmppl.concat(...))")
        return resolve_prompt(prompt, model.tokenizer, model.vocab_size)
    if prompt is not None:
        raise ValueError(
            f"{name} is an encoder-decoder model: give its input as source=, not prompt= "
            "(the decoder starts from its start token)"
        )
    if source is None:
        raise ValueError(
            f"{name} is an encoder-decoder model: give source= (the text or token ids its "
            "encoder reads)"
        )
    return model.source_prompt(source, max_new_tokens)


def _place(tokens: jax.Array, ids: jax.Array, offset: jax.Array, length: jax.Array) -> jax.Array:
    """Write ``ids[..., :length]`` into ``tokens`` at ``offset`` (per row; rest untouched)."""
    size, width = ids.shape[-1], tokens.shape[-1]

    def one_row(row, row_ids, row_offset, row_length):
        index = row_offset + jnp.arange(size)
        index = jnp.where(jnp.arange(size) < row_length, index, width)  # out of range: dropped
        return row.at[index].set(row_ids, mode="drop")

    flat = lambda x, extra: x.reshape((-1, *x.shape[x.ndim - extra :]))
    out = jax.vmap(one_row)(flat(tokens, 1), flat(ids, 1), offset.reshape(-1), length.reshape(-1))
    return out.reshape(tokens.shape)
