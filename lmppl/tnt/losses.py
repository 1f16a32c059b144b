"""TNT losses and the likelihood baselines, one signature: ``loss(params, batch) -> scalar``.

Notation at position t of a generation x (context c, x_<t): ``q = p_θ(· | c, x_<t)`` the
model being trained, ``p_o`` the frozen old model, ``p_new`` the per-token target of
:mod:`lmppl.tnt.target` (``p̃_new`` its ε-smoothed version), ``m_t`` the annotation.

    KL_F(p) = KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v))      (forward, mass covering)
    KL_R(p) = KL(q ‖ p) = Σ_v q(v) (log q(v) − log p(v))      (reverse, mode seeking)

| loss | annotated token (m_t = 1) | other tokens (m_t = 0) |
|---|---|---|
| ``tnff`` | KL_F(p_new) | KL_F(p_o) |
| ``tnrr`` | KL_R(p̃_new) | KL_R(p_o) |
| ``tnrf`` | KL_R(p̃_new) | KL_F(p_o) |
| ``tnfll`` | KL_F(p_new) | −log q(x_t) |
| ``tnrll`` | KL_R(p̃_new) | −log q(x_t) |
| ``nl`` | +log q(x_t) (push the negative token down) | −log q(x_t) |
| ``ul`` | −log(1 − q(x_t)) (unlikelihood) | −log q(x_t) |

The per-token terms are weighted ``α`` (default 1e4) at annotated tokens and 1
elsewhere, summed over the valid tokens of a sequence, and averaged over the batch with
the batch's sequence weights:

    L(θ) = Σ_b w_b Σ_t valid_bt [α m_bt ℓ⁺_bt + (1 − m_bt) ℓ⁻_bt] / Σ_b w_b.

At θ = θ_o with no annotation the KL losses (tnff, tnrr, tnrf) are at their minimum 0, so
their gradient vanishes exactly. The NLL-based ones (tnfll, tnrll, nl, ul) reduce to the
sequences' NLL, whose gradient on a finite sample is not zero; only its expectation
under p_o is (the score identity ``E_{p_o}[∇ log p_θ(x)] = 0`` at θ_o), which a batch of
every sequence weighted by ``p_o`` computes exactly. ``1 − q(x_t)`` is formed as
``logsumexp_{v ≠ x_t} log q(v)`` (stable when q(x_t) ≈ 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lmppl.lm.base import LanguageModel
from lmppl.tnt.batch import TNTBatch, sequence_log_probs
from lmppl.tnt.target import log_p_new, smoothed_log_p_new

__all__ = [
    "ANNOTATED_TERMS",
    "LOSSES",
    "OTHER_TERMS",
    "TNTLoss",
    "batch_loss",
    "forward_kl",
    "get_loss",
    "make_loss",
    "reverse_kl",
    "term_weights",
    "token_terms",
]


class TNTLoss(NamedTuple):
    """A loss as a pair of per-token terms.

    Fields:
      name: ``"tnff"``, ...
      annotated: ``"forward"``, ``"reverse"``, ``"nl"`` or ``"ul"`` (term at m_t = 1).
      other: ``"forward"``, ``"reverse"`` or ``"nll"`` (term at m_t = 0).
    """

    name: str
    annotated: str
    other: str


LOSSES = {
    loss.name: loss
    for loss in (
        TNTLoss("tnff", "forward", "forward"),
        TNTLoss("tnrr", "reverse", "reverse"),
        TNTLoss("tnrf", "reverse", "forward"),
        TNTLoss("tnfll", "forward", "nll"),
        TNTLoss("tnrll", "reverse", "nll"),
        TNTLoss("nl", "nl", "nll"),
        TNTLoss("ul", "ul", "nll"),
    )
}


def get_loss(loss: str | TNTLoss) -> TNTLoss:
    """A :class:`TNTLoss` by name (case-insensitive) or as given."""
    if isinstance(loss, TNTLoss):
        return loss
    key = str(loss).lower()
    if key not in LOSSES:
        raise ValueError(f"unknown TNT loss {loss!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[key]


def forward_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``KL(p ‖ q)`` over the last axis; ``p(v) = 0`` entries contribute 0."""
    support = jnp.isfinite(log_p)
    safe_log_p = jnp.where(support, log_p, 0.0)
    terms = jnp.where(support, jnp.exp(safe_log_p) * (safe_log_p - log_q), 0.0)
    return terms.sum(axis=-1)


def reverse_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``KL(q ‖ p)`` over the last axis (``p`` must have full support where q > 0)."""
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)


def _pick(log_probs: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


#: the per-token terms a loss mixes at annotated tokens and at the others. ``KL_F(p_new)``
#: and ``KL_R(p̃_new)`` are ``KL_F(p_o)`` and ``KL_R(p_o)`` at unannotated positions
#: (there ``p_new = p̃_new = p_o``), so one evaluation serves both columns of the table.
ANNOTATED_TERMS = ("forward", "reverse", "nl", "ul")
OTHER_TERMS = ("forward", "reverse", "nll")


def term_weights(loss: str | TNTLoss) -> jax.Array:
    """``[7]`` one-hot weights of a loss over ``ANNOTATED_TERMS + OTHER_TERMS``.

    The training step takes them as an argument, so one compiled step serves every loss.
    """
    spec = get_loss(loss)
    return jnp.asarray(
        [float(spec.annotated == t) for t in ANNOTATED_TERMS]
        + [float(spec.other == t) for t in OTHER_TERMS],
        jnp.float32,
    )


def token_terms(
    loss: str | TNTLoss | jax.Array,
    new_log_probs: jax.Array,
    batch: TNTBatch,
    epsilon: float = 1e-6,
) -> tuple[jax.Array, jax.Array]:
    """Per-token terms ``(ℓ⁺, ℓ⁻)`` ``[B, T]``: the annotated and the other-token term,
    both evaluated at every position (the mask selects later). ``loss`` is a loss or its
    :func:`term_weights`."""
    weights = term_weights(loss) if isinstance(loss, str | TNTLoss) else jnp.asarray(loss)
    log_q = new_log_probs
    tokens, mask = batch.tokens, batch.mask
    nll = -_pick(log_q, tokens)
    forward = forward_kl(log_p_new(batch.old_log_probs, tokens, mask), log_q)
    reverse = reverse_kl(smoothed_log_p_new(batch.old_log_probs, tokens, mask, epsilon), log_q)
    # −log(1 − q(x_t)) = −logsumexp_{v ≠ x_t} log q(v), stable when q(x_t) ≈ 1
    others = jnp.where(jnp.arange(log_q.shape[-1]) == tokens[..., None], -jnp.inf, log_q)
    unlikelihood = -jax.nn.logsumexp(others, axis=-1)
    annotated = jnp.stack([forward, reverse, -nll, unlikelihood], axis=-1) @ weights[:4]
    other = jnp.stack([forward, reverse, nll], axis=-1) @ weights[4:]
    return annotated, other


def batch_loss(
    loss: str | TNTLoss | jax.Array,
    new_log_probs: jax.Array,
    batch: TNTBatch,
    *,
    alpha: float = 1e4,
    epsilon: float = 1e-6,
) -> jax.Array:
    """``L = Σ_b w_b Σ_t valid [α m ℓ⁺ + (1 − m) ℓ⁻] / Σ_b w_b`` from ``log q`` ``[B, T, V]``."""
    annotated, other = token_terms(loss, new_log_probs, batch, epsilon)
    mask = batch.mask.astype(bool)
    per_token = jnp.where(mask, alpha * annotated, other)
    per_token = jnp.where(batch.valid.astype(bool), per_token, 0.0)
    weights = batch.weights.astype(jnp.float32)
    return jnp.sum(weights * per_token.sum(axis=-1)) / jnp.sum(weights)


def make_loss(
    lm: LanguageModel,
    loss: str | TNTLoss = "tnff",
    *,
    alpha: float = 1e4,
    epsilon: float = 1e-6,
    temperature: float = 1.0,
) -> Callable[[Any, TNTBatch], jax.Array]:
    """``loss(params, batch) -> scalar`` for ``lm``'s network (pure, jit- and grad-friendly)."""
    spec = get_loss(loss)

    def value(params: Any, batch: TNTBatch) -> jax.Array:
        log_q = sequence_log_probs(
            lm, params, batch.prompt_tokens, batch.prompt_length, batch.tokens, temperature
        )
        return batch_loss(spec, log_q, batch, alpha=alpha, epsilon=epsilon)

    value.__name__ = f"tnt_{spec.name}"
    return value
