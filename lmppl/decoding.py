"""Batched, cached decoding shared by ``LM.sample``, ``LM.log_prob`` and the SMC sweeps.

The prompt is prefilled once (one row, or one row per distinct prompt) into a cache of
``P + T`` positions and broadcast to the particle rows; each decoding step then feeds
``[N, 1]`` tokens against the ``[N, P + T, ...]`` cache. Everything here is a pure
function of the model parameters, so it runs inside ``jax.jit``/``lax.scan``.

Unnormalised models. A model with the attribute ``unnormalised_logits = True`` (e.g.
``lmppl.realign(..., mode="global")``) returns logits that are per-token log-weights
m_t(v) of a sequence-level target, ``p̃0(s_1:T) = Π_t exp m_t(s_t)``, rather than
logits to be normalised per step. :func:`next_token_log_weights` is the one place that
tells the two apart: ``log softmax(logits / temperature)`` for ordinary models (so their
results are unchanged), the raw ``m_t`` for unnormalised ones (temperature must be 1).
:func:`score_tokens` therefore returns ``log p̃0(s) = Σ_t m_t(s_t)``, while
:func:`sample_tokens` still draws from the per-step law ``softmax(m_t)`` (a proposal
for p̃0, whose weights the SMC sweep supplies).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lmppl.lm.base import LanguageModel, broadcast_cache

__all__ = [
    "DecodeState",
    "advance",
    "feed",
    "next_token_log_probs",
    "next_token_log_weights",
    "prefill",
    "sample_tokens",
    "score_tokens",
    "teacher_force",
    "token_log_weights",
    "valid_mask",
]


class DecodeState(NamedTuple):
    """What a decoding step needs about the particles' prefixes.

    Fields:
      cache: the network cache, every leaf ``[N, ...]``.
      logits: ``[N, V]`` next-token logits after the last fed token.
      hidden: ``[N, H]`` final hidden state of the last fed token (read by twists).
    """

    cache: Any
    logits: jax.Array
    hidden: jax.Array


def valid_mask(tokens: jax.Array, eos: int | None) -> jax.Array:
    """``[..., T]`` bool: the positions up to and including the first EOS (all without EOS).

    The one "after the first EOS" rule: positions after it are padding, scored 0 when they
    hold EOS and impossible otherwise (:func:`token_log_weights`).
    """
    if eos is None:
        return jnp.ones(tokens.shape, bool)
    is_eos = tokens == eos
    return jnp.cumsum(is_eos, axis=-1) - is_eos == 0


def next_token_log_probs(logits: jax.Array, temperature: float) -> jax.Array:
    """``log softmax(logits / temperature)`` in float32."""
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _check_unnormalised_temperature(model: Any, temperature: float) -> None:
    if getattr(model, "unnormalised_logits", False) and temperature != 1:
        raise ValueError(
            f"{model.name} has unnormalised sequence-level logits: temperature must be 1, "
            f"got {temperature}"
        )


def next_token_log_weights(model: Any, logits: jax.Array, temperature: float) -> jax.Array:
    """``log p0(v | s_<t)`` as the sequence target sees it (float32).

    ``next_token_log_probs(logits, temperature)`` for ordinary models; the raw logits
    (unnormalised per-token log-weights m_t) when ``model.unnormalised_logits`` is true.
    """
    if getattr(model, "unnormalised_logits", False):
        _check_unnormalised_temperature(model, temperature)
        return logits.astype(jnp.float32)
    return next_token_log_probs(logits, temperature)


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
    state = DecodeState(out.cache, logits, hidden)
    if shared and num_rows != 1:
        state = DecodeState(
            broadcast_cache(state.cache, num_rows),
            jnp.broadcast_to(logits, (num_rows, logits.shape[-1])),
            jnp.broadcast_to(hidden, (num_rows, hidden.shape[-1])),
        )
    return state


def feed(model: LanguageModel, params: Any, state: DecodeState, tokens: jax.Array) -> DecodeState:
    """Feed one token per row (``[N]``) and return the advanced state."""
    out = model.apply(params, tokens[:, None], state.cache)
    return DecodeState(out.cache, out.logits[:, 0], out.hidden[:, 0])


def advance(
    model: LanguageModel,
    params: Any,
    state: DecodeState,
    tokens: jax.Array,
    done: jax.Array,
    eos: int | None,
) -> tuple[DecodeState, jax.Array, jax.Array]:
    """One decoding step after sampling: the EOS rule, then feed the tokens.

    The one EOS rule: a row that is ``done`` emits EOS (padding), and a row is done from
    the step it emits EOS on; without ``eos`` no row ever ends.

    Args:
      tokens: ``[N]`` the sampled tokens; done: ``[N]`` rows that had already ended.
    Returns:
      the advanced state, the tokens actually emitted ``[N]`` and the new ``done`` ``[N]``.
    """
    if eos is not None:
        tokens = jnp.where(done, eos, tokens)
        done = done | (tokens == eos)
    return feed(model, params, state, tokens), tokens, done


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
        _check_unnormalised_temperature(model, temperature)
    state = prefill(model, params, prompt_tokens, prompt_length, num_rows, max_new_tokens)

    def step(carry, key):
        state, done = carry
        if temperature == 0:
            log_probs = jax.nn.log_softmax(state.logits.astype(jnp.float32), axis=-1)
            token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
            token_log_prob = jnp.zeros(token.shape, jnp.float32)
        else:
            log_probs = next_token_log_probs(state.logits, temperature)
            token = jax.random.categorical(key, log_probs).astype(jnp.int32)
            token_log_prob = jnp.take_along_axis(log_probs, token[:, None], axis=1)[:, 0]
        if eos is not None:
            token_log_prob = jnp.where(done, 0.0, token_log_prob)
        state, token, done = advance(model, params, state, token, done, eos)
        return (state, done), (token, token_log_prob)

    done = jnp.zeros((num_rows,), bool)
    keys = jax.random.split(rng_key, max_new_tokens)
    _, (tokens, log_probs) = jax.lax.scan(step, (state, done), keys)
    return tokens.T, log_probs.sum(axis=0)


def teacher_force(
    model: LanguageModel, params: Any, state: DecodeState, values: jax.Array
) -> jax.Array:
    """``[M, T, V]`` next-token logits before each token of ``values`` ``[M, T]``.

    One batched pass of ``values[:, :-1]`` against the prefilled ``state`` (its logits are
    those before ``values[:, 0]``).
    """
    logits = state.logits[:, None]
    if values.shape[1] > 1:
        out = model.apply(params, values[:, :-1], state.cache)
        logits = jnp.concatenate([logits, out.logits], axis=1)
    return logits


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
    rows, steps = values.shape
    prompt_tokens = jnp.broadcast_to(prompt_tokens, (rows, prompt_tokens.shape[-1]))
    lengths = jnp.broadcast_to(jnp.asarray(prompt_length, jnp.int32), (rows,))
    state = prefill(model, params, prompt_tokens, lengths, rows, steps)
    logits = teacher_force(model, params, state, values)
    return token_log_weights(model, logits, values, temperature, eos).sum(axis=-1)
