"""Defensive-mixture training batches: the twisted proposal pooled with p0 rollouts.

Contrastive twist learning estimates expectations under σ (positives) and under the
intermediate targets π_t ∝ p0(s_1:t) ψ_t(s_1:t) (negatives) by importance sampling. With
the twist-induced proposal q alone (SIS), a mode of σ that q does not visit is never a
positive, its twist value is never raised, and q keeps missing it: the training ESS stays
high while the twisted SMC estimate of log Z is biased low. Pooling the SIS batch
(``N_q`` draws of q) with ``N_0`` draws of p0 and weighting every draw by the balance
heuristic (Veach & Guibas 1995; Hesterberg 1995's *defensive importance sampling*)

    m_t(s_1:t) = α q(s_1:t) + (1 − α) p0(s_1:t),      α = N_q / (N_q + N_0),

    w_t(s) = p0(s_1:t) ψ_t(s_1:t) / m_t(s_1:t)           (negatives, π_t),
    w(s)   = p0(s) φ(s) / m_T(s)                          (positives, σ)

gives self-normalised estimates whose weights are bounded by ``ψ_t / (1 − α)`` (by
``φ / (1 − α)`` for σ) wherever q misses: every mode of σ that p0 reaches is seen at
rate at least ``(1 − α) p0(mode)``, whatever the twist has learned. The mixture
density needs ``q(s)`` of the p0 draws and of the q draws, which the teacher-forced pass
already computes (``Samples.log_q_tokens``); it is held fixed (no gradient) in the weights.

Per-step potentials m_t (banned tokens, automata, grammars) enter every density as the
sweep applies them: the rollouts are drawn from ``q0_t ∝ p0 m_t`` (locally normalised,
``Samples.log_base_q_tokens``), the twisted proposal is ``q_t ∝ p0 m_t ψ_t`` and the
unnormalised targets are ``p0 Π_{k≤t} m_k ψ_t`` and ``p0 Π_k m_k φ``
(``Samples.log_target_tokens``): ``p0`` above reads ``q0`` in the mixture and
``p0 Π m`` in the numerators, so the weights stay exact for σ and every π_t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmppl.twists.samples import Samples

__all__ = ["defensive_mixture"]


def _cumulative(values: jax.Array) -> jax.Array:
    return jnp.cumsum(values, axis=1)


def defensive_mixture(proposal: Samples, base: Samples) -> Samples:
    """One batch of ``N_q + N_0`` draws with balance-heuristic weights of σ and of each π_t.

    Args:
      proposal: SIS draws of the twist-induced proposal q (their ``log_potential`` is log φ,
        without the per-step potentials, which ``log_step`` carries).
      base: rollouts of the untwisted sweep, p0 (``q0 ∝ p0 m`` with per-step potentials).

    Returns:
      :class:`Samples` with the rows of both, ``log_weights`` ``[N]`` the unnormalised
      ``log p0 Π m φ / m_T`` and ``log_weight_history`` ``[T, N]`` the unnormalised
      ``log p0 Π_{k≤t} m_k ψ_t / m_t`` (the mixture m_t, not a step potential); ``log_psi`` keeps its dependence on the twist parameters.
    """
    num_q, num_0 = proposal.tokens.shape[0], base.tokens.shape[0]
    log_alpha = jnp.log(num_q / (num_q + num_0))
    log_beta = jnp.log(num_0 / (num_q + num_0))
    if (proposal.log_step is None) != (base.log_step is None):
        raise ValueError("both batches need the per-step potentials' log_step, or neither")
    pooled = Samples(
        *(
            None
            if a is None
            else jnp.concatenate([a, b], axis=1 if name == "log_weight_history" else 0)
            for name, a, b in zip(Samples._fields, proposal, base, strict=True)
        )
    )
    frozen = pooled.frozen()
    log_target = _cumulative(frozen.log_target_tokens())  # [N, T] log p0 Π m (log p0 without m)
    log_q0 = _cumulative(frozen.log_base_q_tokens())  # the rollouts' proposal (p0 without m)
    log_q = _cumulative(frozen.log_q_tokens())
    log_mixture = jnp.logaddexp(log_alpha + log_q, log_beta + log_q0)
    history = (log_target + frozen.log_psi_tokens() - log_mixture).T
    final = log_target[:, -1] + frozen.log_potential - log_mixture[:, -1]
    return pooled._replace(log_weights=final, log_weight_history=history)
