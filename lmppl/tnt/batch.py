"""Training data of TNT: teacher-forced next-token laws over generations, and the batch.

For generations ``x`` ``[B, T]`` after prompts ``c``, :func:`sequence_log_probs` returns
``log p_θ(· | c, x_<t)`` ``[B, T, V]`` for every position t in one prefill plus one
teacher-forced pass (the KV cache of :mod:`lmppl.decoding`). The frozen old model's
laws ``log p_o`` are computed once (:func:`old_log_probs`) and travel in the
:class:`TNTBatch` next to the tokens and masks; a loss is ``loss(params, batch)``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmppl.decoding import force_rows, next_token_log_probs
from lmppl.lm.base import LanguageModel

__all__ = ["TNTBatch", "old_log_probs", "sequence_log_probs"]


class TNTBatch(NamedTuple):
    """One batch of annotated generations.

    Fields:
      prompt_tokens: ``[B, P]`` int32 right-padded prompts.
      prompt_length: ``[B]`` int32 real prompt lengths.
      tokens: ``[B, T]`` int32 generations x of the old model.
      mask: ``[B, T]`` bool, annotated (negative) tokens.
      valid: ``[B, T]`` bool, real tokens (through the first EOS).
      old_log_probs: ``[B, T, V]`` float32 ``log p_o(· | c, x_<t)`` of the frozen old model.
      weights: ``[B]`` float32 sequence weights (ones for a sample of generations;
        probabilities for an enumeration, which turns the batch average into an
        expectation).
    """

    prompt_tokens: jax.Array
    prompt_length: jax.Array
    tokens: jax.Array
    mask: jax.Array
    valid: jax.Array
    old_log_probs: jax.Array
    weights: jax.Array


def sequence_log_probs(
    model: LanguageModel,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_length: jax.Array,
    tokens: jax.Array,
    temperature: float = 1.0,
) -> jax.Array:
    """``log p_θ(· | c, x_<t)`` ``[B, T, V]`` for generations ``tokens`` ``[B, T]``.

    ``prompt_tokens`` ``[B, P]`` (or ``[P]``, shared) with lengths ``[B]`` (or ``[]``).
    Pure and differentiable in ``params``.
    """
    logits = force_rows(model, params, prompt_tokens, prompt_length, tokens).logits
    return next_token_log_probs(logits, temperature)


@partial(jax.jit, static_argnames=("model",))
def _old_chunk(params, prompt_tokens, prompt_length, tokens, *, model):
    return sequence_log_probs(model, params, prompt_tokens, prompt_length, tokens)


def old_log_probs(
    model: LanguageModel,
    prompt_tokens: Any,
    prompt_length: Any,
    tokens: Any,
    *,
    params: Any = None,
    chunk_size: int = 256,
) -> np.ndarray:
    """The frozen old model's ``log p_o`` ``[B, T, V]`` (host float32), in chunks of rows.

    Memory is ``B · T · V · 4`` bytes (512 stories × 48 tokens × 512 tokens: 50 MB).
    """
    params = model.params if params is None else params
    tokens = jnp.asarray(tokens, jnp.int32)
    rows = tokens.shape[0]
    prompt_tokens = jnp.broadcast_to(
        jnp.asarray(prompt_tokens, jnp.int32), (rows, np.shape(prompt_tokens)[-1])
    )
    prompt_length = jnp.broadcast_to(jnp.asarray(prompt_length, jnp.int32), (rows,))
    pieces = []
    for start in range(0, rows, chunk_size):
        part = slice(start, start + chunk_size)
        pieces.append(
            np.asarray(
                _old_chunk(
                    params, prompt_tokens[part], prompt_length[part], tokens[part], model=model
                )
            )
        )
    return np.concatenate(pieces, axis=0)
