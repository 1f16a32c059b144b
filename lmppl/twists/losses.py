"""Twist-learning losses (Zhao et al. 2024, Sec. 4 and App.), as small factories.

Every factory returns a :class:`TwistLoss`: the kinds of samples it needs and
``loss(samples) -> (value, metrics)``, where ``samples`` maps a kind to a
:class:`~lmppl.twists.samples.Samples` whose ``log_psi`` depends on the twist parameters
(the sampled sequences and their weights do not). Kinds:

* ``"proposal"`` — SIS from the twist-induced proposal q (no resampling); its final
  weights ``log σ̃/q`` make it a self-normalised sample of σ, and its cumulative weights
  ``log p0 ψ_t / q`` (``log_weight_history``) a sample of each π_t ∝ p0(s_1:t) ψ_t(s_1:t);
* ``"base"`` — rollouts of p0 (uniform weights);
* ``"target"`` — exact samples of σ (optional; when present they replace the
  reweighted proposal as the positives of CTL, SIXO and DPG).

Notation: ``t = 1..T``, ``ψ_t = ψ_t(s_1:t)``, ``σ_t`` and ``p0_t`` the marginals of σ
and p0 on ``s_1:t``, ``Z_t = Σ_{s_1:t} p0(s_1:t) ψ_t(s_1:t)``, ``ψ*_t = E_p0[φ | s_1:t]``.
Each docstring gives the exact objective whose gradient the loss estimates (the tests
check this by enumeration) and its minimiser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from lmppl.twists.samples import Samples

__all__ = ["LOSSES", "TwistLoss", "ctl", "dpg", "fudge", "get_loss", "log1mexp", "rl", "sixo"]

LossFn = Callable[[dict[str, Samples]], tuple[jax.Array, dict[str, jax.Array]]]


class TwistLoss(NamedTuple):
    """A twist loss: its name, the sample kinds it needs, and ``loss(samples)``.

    ``token_gradient``: the loss differentiates log ψ only at the drawn tokens
    (:meth:`~lmppl.twists.samples.Samples.log_psi_tokens`); everything else it reads of
    ``log_psi`` is held fixed. Training then hands it samples whose full ``log_psi``
    carries no gradient (:attr:`~lmppl.twists.samples.Samples.log_psi_columns`), so the
    backward pass skips the other V − 1 output columns. False (the default, always
    correct): the whole ``[N, T, V]`` table carries the gradient.
    """

    name: str
    needs: tuple[str, ...]
    loss: LossFn
    token_gradient: bool = False


def _positives(samples: dict[str, Samples]) -> tuple[Samples, jax.Array]:
    """σ-samples and their normalised weights ``[N]``: exact samples, else reweighted SIS."""
    positives = samples["target"] if "target" in samples else samples["proposal"]
    weights = jax.nn.softmax(jax.lax.stop_gradient(positives.log_weights))
    return positives, weights


def _log_mean_exp(values: jax.Array, axis: int) -> jax.Array:
    return logsumexp(values, axis=axis) - jnp.log(values.shape[axis])


def log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 − exp(x))`` for ``x < 0``, stable at both ends (NaN for ``x >= 0``)."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def ctl() -> TwistLoss:
    """Contrastive twist learning.

    Objective: ``L(θ) = Σ_t KL(σ_t ‖ π_t) + const = Σ_t (−E_σ[log ψ_t] + log Z_t)``,
    minimised (at zero KL) by ``ψ_t = c_t ψ*_t``, any constant ``c_t`` per t. Gradient

        ∇L = −Σ_t (E_σ[∇ log ψ_t] − E_{π_t}[∇ log ψ_t]),

    estimated with positives from σ (exact samples, or the SIS batch weighted by
    ``softmax(log σ̃/q)``) and negatives from the same SIS batch weighted by
    ``softmax(log p0 ψ_t / q)`` per t. The returned value estimates
    ``Σ_t (−E_σ[log ψ_t] + log Z_t)`` (``log Z_t`` by ``log mean exp`` of the SIS weights).
    """

    def loss(samples):
        positives, weights = _positives(samples)
        negatives = samples["proposal"]
        history = jax.lax.stop_gradient(negatives.log_weight_history)  # [T, N]
        negative_weights = jax.nn.softmax(history, axis=1)  # [T, N]
        positive_term = jnp.sum(weights[:, None] * positives.log_psi_tokens())
        negative_psi = negatives.log_psi_tokens().T  # [T, N]
        negative_term = jnp.sum(negative_weights * negative_psi)
        log_normalizers = jnp.sum(_log_mean_exp(history, axis=1))
        value = (
            -positive_term + log_normalizers + negative_term - jax.lax.stop_gradient(negative_term)
        )
        return value, {}

    return TwistLoss("ctl", ("proposal",), loss, token_gradient=True)


def rl(min_log_target: float | None = None) -> TwistLoss:
    """Soft-Q least squares (the paper's RL baseline), on samples of the proposal q.

    With soft-Bellman targets ``y_t = log Σ_v p0(v | s_1:t) ψ_{t+1}(s_1:t, v)`` for t < T
    and ``y_T = log φ(s)`` (also at the last real token of a sequence that ended with EOS),
    computed with the current parameters θ̄ but held fixed:

        L(θ) = ½ E_{s ~ q_θ̄}[Σ_t (log ψ^θ_t(s_1:t) − y^θ̄_t(s))²],   ∇ taken at θ = θ̄.

    Its fixed point is ``ψ_t = ψ*_t`` exactly (the soft Bellman equation of ψ*).

    Args:
      min_log_target: floor on ``y`` (e.g. -30 for potentials that can be ``log 0``).
    """

    def loss(samples):
        batch = samples["proposal"]
        log_psi = batch.log_psi_tokens()
        steps = log_psi.shape[1]
        log_phi = batch.log_potential[:, None]
        bootstrap = jnp.concatenate([batch.log_next_normalizer()[:, 1:], log_phi], axis=1)
        is_last = batch.last_valid() | (jnp.arange(steps) == steps - 1)[None, :]
        target = jax.lax.stop_gradient(jnp.where(is_last, log_phi, bootstrap))
        if min_log_target is not None:
            target = jnp.maximum(target, min_log_target)
        residual = jnp.where(batch.valid, log_psi - target, 0.0)
        return 0.5 * jnp.mean(jnp.sum(residual**2, axis=1)), {}

    return TwistLoss("rl", ("proposal",), loss, token_gradient=True)


def sixo() -> TwistLoss:
    """SIXO: noise-contrastive estimation of the density ratio ``σ_t / p0_t`` at every t.

        L(θ) = −Σ_t (E_σ[log sigmoid(log ψ_t)] + E_p0[log sigmoid(−log ψ_t)]),

    minimised by ``ψ_t = σ_t / p0_t = ψ*_t / Z``. Positives from σ (exact samples, or the
    SIS batch reweighted), negatives from p0 rollouts.
    """

    def loss(samples):
        positives, weights = _positives(samples)
        negatives = samples["base"]
        positive_term = jnp.sum(weights[:, None] * jax.nn.log_sigmoid(positives.log_psi_tokens()))
        negative_term = jnp.sum(jnp.mean(jax.nn.log_sigmoid(-negatives.log_psi_tokens()), axis=0))
        return -(positive_term + negative_term), {}

    return TwistLoss("sixo", ("proposal", "base"), loss, token_gradient=True)


def fudge() -> TwistLoss:
    """FUDGE: binary cross-entropy of ψ_t against φ(s) ∈ [0, 1] of p0 rollouts.

        L(θ) = −Σ_t E_p0[φ(s) log ψ_t(s_1:t) + (1 − φ(s)) log(1 − ψ_t(s_1:t))],

    minimised by ``ψ_t = E_p0[φ | s_1:t] = ψ*_t``. φ must be a probability (log φ <= 0)
    and ψ < 1: build the twist with ``output="log_sigmoid"``.
    """

    def loss(samples):
        batch = samples["base"]
        label = jnp.clip(jnp.exp(batch.log_potential), 0.0, 1.0)[:, None]
        log_psi = batch.log_psi_tokens()
        log_likelihood = label * log_psi + (1.0 - label) * log1mexp(log_psi)
        return -jnp.sum(jnp.mean(log_likelihood, axis=0)), {}

    return TwistLoss("fudge", ("base",), loss, token_gradient=True)


def dpg() -> TwistLoss:
    """Distributional policy gradient: fit the twist-induced proposal q to σ.

        L(θ) = KL(σ ‖ q_θ) + H(σ) = −E_σ[log q_θ(s)],
        log q_θ(s) = Σ_t log softmax_v(log p0(v | s_<t) + log ψ_t(s_<t, v))[s_t],

    estimated with exact σ samples or the SIS batch reweighted by ``softmax(log σ̃/q)``.
    Its minimiser makes q = σ (then ψ_t ∝ ψ*_t up to a factor per prefix s_<t).
    """

    def loss(samples):
        positives, weights = _positives(samples)
        log_q = jnp.sum(positives.log_q_tokens(), axis=1)
        return -jnp.sum(weights * log_q), {}

    return TwistLoss("dpg", ("proposal",), loss)


#: Loss factories by name (``fit(method=...)``).
LOSSES: dict[str, Callable[..., TwistLoss]] = {
    "ctl": ctl,
    "rl": rl,
    "sixo": sixo,
    "fudge": fudge,
    "dpg": dpg,
}


def get_loss(method: str | TwistLoss) -> TwistLoss:
    """A :class:`TwistLoss` from a name in :data:`LOSSES` (or the loss itself)."""
    if isinstance(method, TwistLoss):
        return method
    if method not in LOSSES:
        raise ValueError(
            f"unknown twist-learning method {method!r}; choose one of {sorted(LOSSES)}"
        )
    return LOSSES[method]()
