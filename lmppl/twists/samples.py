"""Sampled sequences with everything the twist losses read, teacher-forced in one pass.

A training step draws sequences without gradient (SIS from the twist-induced proposal,
p0 rollouts, or exact target samples), then evaluates the twist on them in one
teacher-forced pass that the gradient flows through. For sequences ``s`` ``[N, T]``:

* ``log_p0[:, t, v] = log p0(v | s_<t+1)`` — the frozen base LM, one pass;
* ``log_psi[:, t, v] = log ψ_{t+1}(s_1:t, v)`` — the twist at every step (``apply_sequence``);
* ``log_step[:, t, v] = Σ_k log m^k_{t+1}(s_1:t, v)`` — the program's per-step potentials
  (banned tokens, automata, grammars) teacher-forced through their states
  (:func:`step_log_weights`), or None for a program without any.

With per-step potentials the sweep proposes ``q_t ∝ p0 · m_t · ψ_t`` (``q0_t ∝ p0 · m_t``
untwisted) and its intermediate targets are ``π_t ∝ p0(s_1:t) Π_{k≤t} m_k ψ_t``: every
density below reads ``log p0 + log m`` (:meth:`Samples.log_base_logits`) where a program
without them reads ``log p0``.

From these, with EOS rows padded (positions after the first EOS carry no token, and
keep the twist value of their last real prefix, as in the sweep):

* ``log ψ_t(s_1:t)`` (:meth:`Samples.log_psi_tokens`),
* ``log q(s_t | s_<t) = log softmax(log p0 + log m + log ψ)[s_t]`` (:meth:`Samples.log_q_tokens`),
* ``log q0(s_t | s_<t) = log softmax(log p0 + log m)[s_t]``, the untwisted sweep's
  proposal (:meth:`Samples.log_base_q_tokens`; ``log p0`` without step potentials),
* ``log p0(s_t | s_<t) + log m_t(s_t)``, the unnormalised target's factor
  (:meth:`Samples.log_target_tokens`),
* ``log Σ_v p0(v | s_1:t) m_{t+1}(v) ψ_{t+1}(s_1:t, v)`` (:meth:`Samples.log_next_normalizer`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from lmppl.decoding import force_rows, next_token_log_weights, valid_mask
from lmppl.infer.program import StepPotentialFunctions, combined_step_potential
from lmppl.infer.twist import TwistInputs
from lmppl.potentials import step_log_weight_rows

__all__ = [
    "BasePass",
    "Samples",
    "base_pass",
    "recorded_pass",
    "step_log_weights",
    "twist_sequence",
]


class BasePass(NamedTuple):
    """The frozen base LM on given sequences (no gradient flows here).

    Fields:
      log_p0: ``[N, T, V]`` next-token log-probabilities before each step.
      hidden: ``[N, T, H]`` final hidden state before each step.
      valid: ``[N, T]`` bool, the position holds a real token (at or before the first EOS).
    """

    log_p0: jax.Array
    hidden: jax.Array
    valid: jax.Array


class Samples(NamedTuple):
    """Sequences of one kind with their sampling weights and the twist's values on them.

    Fields:
      tokens: ``[N, T]``.
      log_potential: ``[N]`` log φ (zeros where unknown, e.g. exact samples).
      log_weights: ``[N]`` importance log-weights of σ (SIS: ``log σ̃/q``; zeros for
        samples drawn from the distribution they represent).
      log_weight_history: ``[T, N]`` cumulative SIS log-weights of π_t,
        ``log p0(s_1:t) ψ_t(s_1:t) / q(s_1:t)`` (zeros where not SIS).
      log_p0, valid: from :class:`BasePass`.
      log_psi: ``[N, T, V]`` twist values (a function of the twist parameters).
      log_step: ``[N, T, V]`` ``Σ_k log m^k_t`` of every candidate token (0 after EOS), or
        None: the program has no per-step potentials.
      log_psi_columns: ``[N, T]`` the twist at the drawn tokens, ``log_psi[n, t, s_t]``,
        with its gradient, while ``log_psi`` then carries none; or None: ``log_psi``
        carries the gradient. For losses that differentiate log ψ only at the drawn
        tokens (``TwistLoss.token_gradient``): the backward pass then touches 1 of the V
        output columns per step (:meth:`~lmppl.twists.base.Twist.apply_sequence_columns`).
    """

    tokens: jax.Array
    log_potential: jax.Array
    log_weights: jax.Array
    log_weight_history: jax.Array
    log_p0: jax.Array
    valid: jax.Array
    log_psi: jax.Array
    log_step: jax.Array | None = None
    log_psi_columns: jax.Array | None = None

    def frozen(self) -> Samples:
        """These samples with no gradient through the twist (weights built from them)."""
        columns = self.log_psi_columns
        return self._replace(
            log_psi=jax.lax.stop_gradient(self.log_psi),
            log_psi_columns=None if columns is None else jax.lax.stop_gradient(columns),
        )

    def _take(self, values: jax.Array) -> jax.Array:
        return jnp.take_along_axis(values, self.tokens[..., None], axis=-1)[..., 0]

    def log_psi_tokens(self) -> jax.Array:
        """``[N, T]`` ``log ψ_t(s_1:t)``; after EOS, the value of the last real prefix."""
        taken = self._take(self.log_psi) if self.log_psi_columns is None else self.log_psi_columns
        steps = self.tokens.shape[1]
        last = jax.lax.cummax(jnp.where(self.valid, jnp.arange(steps)[None, :], 0), axis=1)
        return jnp.take_along_axis(taken, last, axis=1)

    def log_base_logits(self) -> jax.Array:
        """``[N, T, V]`` ``log p0(v | s_<t) + log m_t(v)`` (``log_p0`` without step potentials)."""
        return self.log_p0 if self.log_step is None else self.log_p0 + self.log_step

    def log_q_tokens(self) -> jax.Array:
        """``[N, T]`` ``log q(s_t | s_<t)`` of the twist-induced proposal ``∝ p0 m ψ`` (0
        after EOS)."""
        log_q = jax.nn.log_softmax(self.log_base_logits() + self.log_psi, axis=-1)
        return jnp.where(self.valid, self._take(log_q), 0.0)

    def log_p0_tokens(self) -> jax.Array:
        """``[N, T]`` ``log p0(s_t | s_<t)`` (0 after EOS)."""
        return jnp.where(self.valid, self._take(self.log_p0), 0.0)

    def log_target_tokens(self) -> jax.Array:
        """``[N, T]`` ``log p0(s_t | s_<t) + log m_t(s_t)`` (0 after EOS): summed up to t,
        the untwisted part of the unnormalised π_t."""
        return jnp.where(self.valid, self._take(self.log_base_logits()), 0.0)

    def log_base_q_tokens(self) -> jax.Array:
        """``[N, T]`` ``log q0(s_t | s_<t)`` of the untwisted sweep's proposal ``∝ p0 m``
        (0 after EOS); :meth:`log_p0_tokens` without step potentials."""
        if self.log_step is None:
            return self.log_p0_tokens()
        log_q0 = jax.nn.log_softmax(self.log_base_logits(), axis=-1)
        return jnp.where(self.valid, self._take(log_q0), 0.0)

    def log_next_normalizer(self) -> jax.Array:
        """``[N, T]``: entry t is ``log Σ_v p0(v | s_<t) m_t(v) ψ_t(s_<t, v)`` (t = 1..T)."""
        return logsumexp(self.log_base_logits() + self.log_psi, axis=-1)

    def last_valid(self) -> jax.Array:
        """``[N, T]`` bool: the position is the sequence's last real token (EOS or T)."""
        steps = self.tokens.shape[1]
        length = jnp.sum(self.valid, axis=1)
        return jnp.arange(steps)[None, :] == (length - 1)[:, None]


def base_pass(
    model: Any,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_length: jax.Array,
    tokens: jax.Array,
    temperature: float,
    eos_token_id: int | None,
) -> BasePass:
    """Teacher-force ``tokens`` ``[N, T]`` through the frozen base LM after the prompt."""
    forced = force_rows(model, params, prompt_tokens, prompt_length, tokens)
    log_p0 = next_token_log_weights(model, forced.logits, temperature)
    valid = valid_mask(tokens, eos_token_id)
    return BasePass(jax.lax.stop_gradient(log_p0), jax.lax.stop_gradient(forced.hidden), valid)


def recorded_pass(output: Any, eos_token_id: int | None) -> BasePass:
    """The :class:`BasePass` of a sweep's own sequences from what it recorded on the way.

    ``output`` is the :class:`~lmppl.infer.kernel.SweepOutput` of a sweep run with
    ``SweepOptions(record_steps=True, ess_threshold=None)``: without resampling, row
    ``i``'s hidden state and ``log p0`` before step ``t`` are those of its own prefix
    ``s^i_<t``, exactly what :func:`base_pass` recomputes by teacher forcing (up to the
    float rounding of an incremental against a batched pass), so the LM is not run again.
    """
    if output.step_hidden is None or output.step_log_p0 is None:
        raise ValueError("the sweep did not record its steps (SweepOptions.record_steps)")
    return BasePass(
        jax.lax.stop_gradient(jnp.swapaxes(output.step_log_p0, 0, 1).astype(jnp.float32)),
        jax.lax.stop_gradient(jnp.swapaxes(output.step_hidden, 0, 1)),
        valid_mask(output.tokens, eos_token_id),
    )


def twist_sequence(
    twist: Any,
    params: Any,
    base: BasePass,
    tokens: jax.Array,
    condition: Any,
    prompt_tokens: jax.Array,
    prompt_length: jax.Array,
    columns: bool = False,
) -> Any:
    """``[N, T, V]`` log ψ at every step of ``tokens`` (``apply_sequence``, or ``apply`` vmapped).

    With ``columns``: ``(log ψ [N, T, V] without gradient, log ψ at the drawn tokens
    [N, T] with it)`` (``apply_sequence_columns``; see :class:`Samples`).
    """
    inputs = TwistInputs(base.hidden, tokens, None, condition, prompt_tokens, prompt_length)
    if columns:
        if hasattr(twist, "apply_sequence_columns"):
            full, at_tokens = twist.apply_sequence_columns(params, inputs)
            return full.astype(jnp.float32), at_tokens.astype(jnp.float32)
        from lmppl.twists.base import columns_of_table

        full = twist_sequence(twist, params, base, tokens, condition, prompt_tokens, prompt_length)
        return columns_of_table(full, tokens)
    if hasattr(twist, "apply_sequence"):
        out = twist.apply_sequence(params, inputs)
    else:
        from lmppl.twists.base import map_steps

        out = map_steps(twist.apply, params, inputs)
    return out.astype(jnp.float32)


def step_log_weights(
    functions: StepPotentialFunctions, tokens: jax.Array, eos_token_id: int | None
) -> jax.Array:
    """``[N, T, V]`` ``Σ_k log m^k_t(s_<t, v)`` along ``tokens`` ``[N, T]``: the program's
    per-step potentials (from :func:`~lmppl.infer.program.step_potential_functions`, no
    prefix latents) teacher-forced through their states as the sweep advances them; 0
    after the first EOS."""
    potential = combined_step_potential(functions)
    rows = jax.vmap(lambda row: step_log_weight_rows(potential, row, eos_token_id))(tokens)
    return jax.lax.stop_gradient(rows.astype(jnp.float32))
