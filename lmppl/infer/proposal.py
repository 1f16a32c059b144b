"""One SMC step's proposal and incremental weight: a pure function of log-weights.

At decoding step t every particle proposes the next token from

    q_t(v) ∝ p0(v | s_<t) · Π_k m_t^k(s_<t, v) · ψ_t(s_<t, v)

(the locally optimal proposal for the per-step potentials m^k and the twist ψ_t) and
its log-weight grows by the normaliser, which does not depend on the sampled token:

    log w_t = log Σ_v p0(v | s_<t) Π_k m_t^k(s_<t, v) ψ_t(s_<t, v) − log ψ_{t−1}(s_<t).

With neither step potential nor twist and a normalised p0, ``q_t = p0`` and
``log w_t = 0`` (bootstrap SMC). An unnormalised p0 (``exp m_t``, see
:mod:`lmppl.decoding`) always pays its normaliser ``log Σ_v exp m_t(v)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

__all__ = ["propose"]


def propose(
    log_p0: jax.Array,
    step_log_weights: Sequence[jax.Array] = (),
    log_psi_next: jax.Array | None = None,
    log_psi: jax.Array | None = None,
    *,
    normalised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """``(log_q, increment)``: the proposal's log-probabilities and each particle's log w_t.

    Args:
      log_p0: ``[N, V]`` ``log p0(v | s_<t)`` (log-probabilities when ``normalised``,
        per-token log-weights otherwise).
      step_log_weights: ``[N, V]`` arrays ``log m_t^k(s_<t, v)``, one per step potential.
      log_psi_next: ``[N, V]`` ``log ψ_t(s_<t, v)`` of every one-token extension, or None
        (no twist).
      log_psi: ``[N]`` ``log ψ_{t−1}(s_<t)`` of the current prefixes (zeros or None
        without a twist).
      normalised: ``log_p0`` sums to one over ``v`` (False for unnormalised models).

    Returns:
      ``log_q`` ``[N, V]`` normalised log-probabilities of the proposal and ``increment``
      ``[N]`` float32 ``log w_t``. A row whose every candidate has weight zero proposes
      from p0 (sampling stays defined) and gets ``increment = -inf``; so does a row whose
      current prefix has ``ψ_{t−1} = 0``.
    """
    logits = log_p0
    for log_weights in step_log_weights:
        logits = logits + log_weights
    if logits is log_p0 and log_psi_next is None and normalised:
        return log_p0, jnp.zeros(log_p0.shape[:1], jnp.float32)
    if log_psi is None:
        log_psi = jnp.zeros(log_p0.shape[:1], jnp.float32)
    offset = jnp.zeros(log_p0.shape[:1], jnp.float32)
    if log_psi_next is not None:
        # Shift-robust form: the twist enters relative to its own per-particle maximum, so
        # a large common level of log ψ cancels exactly (differences of nearby float32
        # values are exact) instead of swamping log p0 in the sum.
        finite = jnp.isfinite(log_psi_next)
        top = jnp.max(jnp.where(finite, log_psi_next, -jnp.inf), axis=-1)
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        logits = logits + (log_psi_next - top[:, None])
        offset = top
    log_norm = logsumexp(logits, axis=-1)
    valid = jnp.isfinite(log_norm)[:, None]
    log_q = jnp.where(valid, logits - log_norm[:, None], log_p0)
    increment = jnp.where(jnp.isneginf(log_psi), -jnp.inf, log_norm + (offset - log_psi))
    return log_q, increment
