"""Batched, cached decoding shared by ``LM.sample``, ``LM.log_prob`` and the SMC sweeps.

The prompt is prefilled once (one row, or one row per distinct prompt) into a cache of
``P + T`` positions and broadcast to the particle rows; each decoding step then feeds
``[N, 1]`` tokens against the ``[N, P + T, ...]`` cache. Everything here is a pure
function of the model parameters, so it runs inside ``jax.jit``/``lax.scan``.

One decoding state (:class:`DecodeState`: cache, last logits and hidden state, the tokens
so far, which rows ended, the step) and one step (:func:`advance`) serve ``generate`` and
the SMC kernel; :func:`teacher_force` is the one teacher-forced pass and
:func:`valid_mask` the one "up to the first EOS" rule.

Unnormalised models. The model turns logits into per-token log-weights
(``model.next_token_log_weights(logits, temperature)``, see
:class:`lmppl.types.LanguageModelLike`). For ordinary models that is
``log softmax(logits / temperature)``; a model whose ``locally_normalised`` is False (e.g.
``lmppl.realign(..., mode="global")``) returns per-token log-weights m_t(v) of a
sequence-level target, ``p̃0(s_1:T) = Π_t exp m_t(s_t)`` (temperature must be 1).
:func:`score_tokens` therefore returns ``log p̃0(s) = Σ_t m_t(s_t)``, while
:func:`sample_tokens` still draws from the per-step law ``softmax(m_t)`` (a proposal
for p̃0, whose weights the SMC sweep supplies).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lmppl.lm.base import LanguageModel, broadcast_cache, gather_rows, reorder_cache
from lmppl.token_sampler import sample_categorical

__all__ = [
    "DecodeState",
    "advance",
    "check_temperature",
    "feed",
    "force_rows",
    "next_token_log_probs",
    "next_token_log_weights",
    "prefill",
    "reorder",
    "TeacherForced",
    "sample_tokens",
    "score_tokens",
    "teacher_force",
    "token_log_weights",
    "trim_at_eos",
    "valid_mask",
]


class DecodeState(NamedTuple):
    """Everything a decoding step needs about the rows' prefixes (N rows, T new tokens).

    Fields:
      cache: the network cache, every leaf ``[N, ...]``.
      logits: ``[N, V]`` next-token logits after the last fed token.
      hidden: ``[N, H]`` final hidden state of the last fed token (read by twists).
      tokens: ``[N, T]`` the tokens emitted so far (0 at positions not reached yet).
      done: ``[N]`` bool, the row has emitted EOS (it emits EOS padding from then on).
      step: ``[]`` int32, the number of tokens emitted (the next position to fill).
    """

    cache: Any
    logits: jax.Array
    hidden: jax.Array
    tokens: jax.Array
    done: jax.Array
    step: jax.Array


def valid_mask(tokens: jax.Array, eos: int | None) -> jax.Array:
    """``[..., T]`` bool: the positions up to and including the first EOS (all without EOS).

    The one "after the first EOS" rule: positions after it are padding, scored 0 when they
    hold EOS and impossible otherwise (:func:`token_log_weights`).
    """
    if eos is None:
        return jnp.ones(tokens.shape, bool)
    is_eos = tokens == eos
    return jnp.cumsum(is_eos, axis=-1) - is_eos == 0


def trim_at_eos(row: Sequence[int], eos: int | None, *, keep_eos: bool = False) -> list[int]:
    """A host-side row as a list of ints, cut before its first EOS (after it: ``keep_eos``).

    The host view of :func:`valid_mask` (``keep_eos=True`` keeps exactly its valid
    positions), used to decode texts and compare generations.
    """
    row = [int(v) for v in row]
    if eos is not None and eos in row:
        row = row[: row.index(eos) + int(keep_eos)]
    return row


def next_token_log_probs(logits: jax.Array, temperature: float) -> jax.Array:
    """``log softmax(logits / temperature)`` in float32."""
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def check_temperature(model: Any, temperature: float) -> None:
    """Refuse a temperature other than 1 (or 0, greedy) for a model whose logits are
    per-token log-weights of a sequence-level target (not ``locally_normalised``)."""
    if not model.locally_normalised and temperature not in (0, 1):
        raise ValueError(
            f"{model.name} has unnormalised sequence-level logits: temperature must be 1, "
            f"got {temperature}"
        )


def next_token_log_weights(model: Any, logits: jax.Array, temperature: float) -> jax.Array:
    """``log p0(v | s_<t)`` as the sequence target sees it (float32): the model's own
    ``next_token_log_weights`` (``log softmax(logits / temperature)`` for ordinary models,
    the unnormalised per-token log-weights m_t for a model that is not locally normalised).
    """
    return model.next_token_log_weights(logits, temperature)


def prefill(
    model: LanguageModel,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_length: jax.Array,
    num_rows: int,
    max_new_tokens: int,
) -> DecodeState:
    """Prefill the prompt and broadcast it to ``num_rows`` rows.

    Args:
      prompt_tokens: ``[P]`` (one prompt shared by all rows) or ``[num_rows, P]``.
      prompt_length: ``[]`` or ``[num_rows]`` real prompt lengths (right padding).
      num_rows: N, the number of particles.
      max_new_tokens: T; the cache holds ``P + T`` positions.
    """
    shared = prompt_tokens.ndim == 1
    tokens = prompt_tokens[None] if shared else prompt_tokens
    lengths = jnp.reshape(prompt_length, (-1,)).astype(jnp.int32)
    rows = tokens.shape[0]
    cache = model.init_cache(rows, tokens.shape[-1] + max_new_tokens)
    out = model.apply(params, tokens, cache, lengths)
    last = jnp.maximum(lengths - 1, 0)
    logits = jnp.take_along_axis(out.logits, last[:, None, None], axis=1)[:, 0]
    hidden = jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)[:, 0]
    cache = out.cache
    if shared and num_rows != 1:
        cache = broadcast_cache(cache, num_rows)
        logits = jnp.broadcast_to(logits, (num_rows, logits.shape[-1]))
        hidden = jnp.broadcast_to(hidden, (num_rows, hidden.shape[-1]))
    return DecodeState(
        cache=cache,
        logits=logits,
        hidden=hidden,
        tokens=jnp.zeros((num_rows, max_new_tokens), jnp.int32),
        done=jnp.zeros((num_rows,), bool),
        step=jnp.zeros((), jnp.int32),
    )


def feed(model: LanguageModel, params: Any, state: DecodeState, tokens: jax.Array) -> DecodeState:
    """Feed one token per row (``[N]``): the cache, logits and hidden state advance; the
    token buffer, ``done`` and ``step`` are left to :func:`advance`."""
    out = model.apply(params, tokens[:, None], state.cache)
    return state._replace(cache=out.cache, logits=out.logits[:, 0], hidden=out.hidden[:, 0])


def advance(
    model: LanguageModel, params: Any, state: DecodeState, tokens: jax.Array, eos: int | None
) -> DecodeState:
    """One decoding step after sampling: the EOS rule, record the tokens, feed them.

    The one EOS rule: a row that is ``done`` emits EOS (padding), and a row is done from
    the step it emits EOS on; without ``eos`` no row ever ends. The emitted tokens are
    written at position ``state.step`` of ``state.tokens`` and ``step`` increases by one.

    Args:
      tokens: ``[N]`` the sampled tokens.
      eos: the EOS id (``model``'s ``eos_token_id`` when the site stops at EOS), or None.
    """
    done = state.done
    if eos is not None:
        tokens = jnp.where(done, eos, tokens)
        done = done | (tokens == eos)
    state = feed(model, params, state, tokens)
    return state._replace(
        tokens=jax.lax.dynamic_update_index_in_dim(state.tokens, tokens, state.step, axis=1),
        done=done,
        step=state.step + 1,
    )


def reorder(state: DecodeState, ancestors: jax.Array) -> DecodeState:
    """The rows ``ancestors`` ``[N]`` of every per-row field (resampling); ``step`` is kept."""
    take = lambda x: gather_rows(x, ancestors)
    return state._replace(
        cache=reorder_cache(state.cache, ancestors),
        logits=take(state.logits),
        hidden=take(state.hidden),
        tokens=take(state.tokens),
        done=take(state.done),
    )


@partial(jax.jit, static_argnames=("model", "num_rows", "max_new_tokens", "temperature", "eos"))
def sample_tokens(
    rng_key: jax.Array,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_length: jax.Array,
    *,
    model: LanguageModel,
    num_rows: int,
    max_new_tokens: int,
    temperature: float,
    eos: int | None,
) -> tuple[jax.Array, jax.Array]:
    """Ancestral sampling of ``num_rows`` continuations in one scan.

    ``temperature == 0`` is greedy decoding. With ``eos`` set, a row that emits EOS
    is padded with EOS afterwards and its log-probability stops accumulating. For an
    unnormalised model the tokens follow the per-step law ``softmax(m_t)`` (temperature
    1 or 0 only) and the log-probabilities are that law's.

    Returns:
      tokens ``[N, T]`` int32 and their log-probabilities ``[N]`` under the tempered model.
    """
    if temperature != 0:
        check_temperature(model, temperature)
    state = prefill(model, params, prompt_tokens, prompt_length, num_rows, max_new_tokens)

    def step(state, key):
        if temperature == 0:
            log_probs = jax.nn.log_softmax(state.logits.astype(jnp.float32), axis=-1)
            token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
            token_log_prob = jnp.zeros(token.shape, jnp.float32)
        else:
            log_probs = next_token_log_probs(state.logits, temperature)
            token = sample_categorical(key, log_probs)
            token_log_prob = jnp.take_along_axis(log_probs, token[:, None], axis=1)[:, 0]
        if eos is not None:
            token_log_prob = jnp.where(state.done, 0.0, token_log_prob)
        return advance(model, params, state, token, eos), token_log_prob

    keys = jax.random.split(rng_key, max_new_tokens)
    state, log_probs = jax.lax.scan(step, state, keys)
    return state.tokens, log_probs.sum(axis=0)


class TeacherForced(NamedTuple):
    """The model before each token of given sequences ``[M, T]`` (:func:`teacher_force`).

    Fields:
      logits: ``[M, T, V]`` next-token logits before each token.
      hidden: ``[M, T, H]`` final hidden state before each token.
    """

    logits: jax.Array
    hidden: jax.Array


def teacher_force(
    model: LanguageModel, params: Any, state: DecodeState, values: jax.Array
) -> TeacherForced:
    """The logits and hidden states before each token of ``values`` ``[M, T]``.

    One batched pass of ``values[:, :-1]`` against the prefilled ``state`` (its logits and
    hidden state are those before ``values[:, 0]``).
    """
    logits, hidden = state.logits[:, None], state.hidden[:, None]
    if values.shape[1] > 1:
        out = model.apply(params, values[:, :-1], state.cache)
        logits = jnp.concatenate([logits, out.logits], axis=1)
        hidden = jnp.concatenate([hidden, out.hidden], axis=1)
    return TeacherForced(logits, hidden)


def force_rows(
    model: LanguageModel,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_length: jax.Array,
    values: jax.Array,
) -> TeacherForced:
    """Prefill the prompt(s) and :func:`teacher_force` the rows ``values`` ``[M, T]``.

    ``prompt_tokens`` ``[P]`` (shared; prefilled once) or ``[M, P]`` with lengths ``[]``
    or ``[M]``.
    """
    rows, steps = values.shape
    if prompt_tokens.ndim == 2:
        prompt_length = jnp.broadcast_to(jnp.asarray(prompt_length, jnp.int32), (rows,))
    state = prefill(model, params, prompt_tokens, prompt_length, rows, steps)
    return teacher_force(model, params, state, values)


def token_log_weights(
    model: Any, logits: jax.Array, values: jax.Array, temperature: float, eos: int | None
) -> jax.Array:
    """``[M, T]`` ``log p0(s_t | s_<t)`` of ``values`` given their logits ``[M, T, V]``.

    With ``eos`` set, positions after the first EOS (see :func:`valid_mask`) score 0 when
    they hold EOS (padding) and ``-inf`` otherwise (outside the model's support).
    """
    log_weights = next_token_log_weights(model, logits, temperature)
    per_token = jnp.take_along_axis(log_weights, values[..., None], axis=-1)[..., 0]
    if eos is None:
        return per_token
    padding = jnp.where(values == eos, 0.0, -jnp.inf)
    return jnp.where(valid_mask(values, eos), per_token, padding)


@partial(jax.jit, static_argnames=("model", "temperature", "eos"))
def score_tokens(
    params: Any,
    prompt_tokens: jax.Array,
    prompt_length: jax.Array,
    values: jax.Array,
    *,
    model: LanguageModel,
    temperature: float,
    eos: int | None,
) -> jax.Array:
    """Teacher-forced ``log p(values | prompt)`` for rows of ``values`` ``[M, T]``.

    With ``eos`` set, tokens after the first EOS must be EOS (padding, log-prob 0);
    any other token there makes the sequence impossible (``-inf``). For an unnormalised
    model this is ``Σ_t m_t(s_t)`` (see the module docstring).

    Args:
      prompt_tokens: ``[P]`` shared or ``[M, P]`` per row; ``prompt_length`` ``[]``/``[M]``.
    Returns:
      ``[M]`` float32 log-probabilities.
    """
    logits = force_rows(model, params, prompt_tokens, prompt_length, values).logits
    return token_log_weights(model, logits, values, temperature, eos).sum(axis=-1)
