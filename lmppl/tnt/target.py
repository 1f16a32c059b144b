"""The per-token TNT target ``p_new``.

At an annotated position t (token ``x_t`` negative) the minimal change of the old
next-token law ``p_o(· | c, x_<t)`` that never emits ``x_t`` is ``p_o`` conditioned on
``v ≠ x_t``:

    p_new(v) = p_o(v) 1[v ≠ x_t] / (1 − p_o(x_t)),

and ``p_new = p_o`` at every other position. In log space this is a log-softmax of the
old log-probabilities with ``x_t`` set to ``−inf``,

    log p_new(v) = log p_o(v) − logsumexp_{u ≠ x_t} log p_o(u)    (v ≠ x_t),

which stays exact when ``p_o(x_t) ≈ 1`` (``1 − p_o(x_t)`` is never formed; the other
log-probabilities are finite, e.g. −30, and their logsumexp is computed directly).

Reverse-KL losses need a target with full support: :func:`smoothed_log_p_new` gives
``x_t`` back a mass ε (default 1e-6): ``p̃ = (1 − ε) p_new + ε δ_{x_t}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["log_p_new", "smoothed_log_p_new"]


def _is_token(tokens: jax.Array, vocab_size: int) -> jax.Array:
    return jnp.arange(vocab_size) == jnp.asarray(tokens)[..., None]


def log_p_new(old_log_probs: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """``log p_new`` ``[..., V]``.

    Args:
      old_log_probs: ``[..., V]`` log p_o(· | prefix) at each position.
      tokens: ``[...]`` the generated tokens x_t.
      mask: ``[...]`` bool, annotated positions (x_t's mass removed there).
    """
    old_log_probs = jnp.asarray(old_log_probs, jnp.float32)
    remove = _is_token(tokens, old_log_probs.shape[-1]) & jnp.asarray(mask, bool)[..., None]
    return jax.nn.log_softmax(jnp.where(remove, -jnp.inf, old_log_probs), axis=-1)


def smoothed_log_p_new(
    old_log_probs: jax.Array, tokens: jax.Array, mask: jax.Array, epsilon: float = 1e-6
) -> jax.Array:
    """``log p̃_new`` with ``p̃ = (1 − ε) p_new + ε δ_{x_t}`` at annotated positions.

    Elsewhere ``p̃ = p_o`` (it already has full support). ``ε = 0`` gives ``p_new``.
    """
    exact = log_p_new(old_log_probs, tokens, mask)
    if epsilon == 0:
        return exact
    is_token = _is_token(tokens, exact.shape[-1])
    smoothed = jnp.where(is_token, jnp.log(epsilon), jnp.log1p(-epsilon) + exact)
    return jnp.where(jnp.asarray(mask, bool)[..., None], smoothed, exact)
