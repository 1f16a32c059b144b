"""The base of lmppl's learned twists: a parameter pytree and a pure ``apply``.

A twist maps what the sweep knows at step ``t`` (:class:`~lmppl.infer.twist.TwistInputs`)
to ``log ψ_{t+1}(s_1:t, v)`` for every vocabulary entry ``v`` (``[N, V]``). Learned
twists keep their weights in ``params`` (a pytree) so that they enter jitted sweeps and
training steps as arguments, and implement

* ``apply(params, inputs) -> [N, V]`` — one decoding step (what ``TwistedSMC`` calls);
* ``apply_sequence(params, inputs) -> [N, T, V]`` — every step of given sequences at once
  (teacher forcing, what the training losses call); ``inputs.hidden`` is then
  ``[N, T, H]``: the base LM's hidden state before each step.

Output modes: ``"log"`` (the head's output is log ψ) or ``"log_sigmoid"``
(``log ψ = log sigmoid(head)``, so ψ ∈ (0, 1): a probability, as FUDGE trains it).
With the last layer at zero the first mode gives ψ ≡ 1 and the second ψ ≡ 1/2: either
way the twist-induced proposal is p0 and the weights are those of bootstrap SMC.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp

from lmppl.infer.twist import TwistInputs

__all__ = ["OUTPUTS", "Twist", "columns_of_table", "map_steps", "prefix_mask"]

#: Accepted output modes of a learned twist.
OUTPUTS = ("log", "log_sigmoid")


def prefix_mask(tokens: jax.Array, step: jax.Array) -> jax.Array:
    """``tokens [N, T]`` with entries at positions ``>= step`` set to 0 (as the sweep has them)."""
    return jnp.where(jnp.arange(tokens.shape[1])[None, :] < step, tokens, 0)


def map_steps(function: Any, params: Any, inputs: TwistInputs) -> jax.Array:
    """``[N, T, ...]``: ``function(params, inputs at step t)`` for ``t = 0..T-1`` (vmapped),
    where ``inputs`` holds whole sequences (``hidden`` ``[N, T, H]``, ``tokens`` ``[N, T]``)
    and step t sees ``hidden[:, t]`` and the tokens before t (:func:`prefix_mask`)."""

    def one(t):
        return function(
            params,
            inputs._replace(
                hidden=inputs.hidden[:, t], tokens=prefix_mask(inputs.tokens, t), step=t
            ),
        )

    return jnp.moveaxis(jax.vmap(one)(jnp.arange(inputs.tokens.shape[1])), 0, 1)


def columns_of_table(full: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(full without gradient, full[n, t, tokens[n, t]] with it)`` from a whole ``[N, T, V]``
    twist table (the generic form of :meth:`Twist.apply_sequence_columns`)."""
    at_tokens = jnp.take_along_axis(full, tokens[..., None], axis=-1)[..., 0]
    return jax.lax.stop_gradient(full), at_tokens


class Twist:
    """Common machinery of learned twists (subclasses define ``_raw`` and ``params``).

    Attributes:
      params: the trainable parameter pytree.
      output: ``"log"`` or ``"log_sigmoid"`` (see the module docstring).
      vocab_size: V.
    """

    params: Any
    output: str = "log"
    vocab_size: int

    def _check_output(self, output: str) -> str:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        return output

    def _finish(self, raw: jax.Array) -> jax.Array:
        raw = raw.astype(jnp.float32)
        return jax.nn.log_sigmoid(raw) if self.output == "log_sigmoid" else raw

    def _raw(self, params: Any, inputs: TwistInputs) -> jax.Array:
        raise NotImplementedError

    def apply(self, params: Any, inputs: TwistInputs) -> jax.Array:
        """``log ψ_{t+1}(s_1:t, v)`` ``[N, V]`` at step ``t = inputs.step``."""
        return self._finish(self._raw(params, inputs))

    def apply_sequence(self, params: Any, inputs: TwistInputs) -> jax.Array:
        """``[N, T, V]``: :meth:`apply` at every step ``t = 0..T-1`` of ``inputs.tokens``.

        ``inputs.hidden`` is ``[N, T, H]`` (the base LM's hidden state before each step);
        ``inputs.step`` is ignored. The default vmaps :meth:`apply` over steps.
        """
        return map_steps(self.apply, params, inputs)

    def apply_sequence_columns(
        self, params: Any, inputs: TwistInputs
    ) -> tuple[jax.Array, jax.Array]:
        """``(log ψ [N, T, V], log ψ at the drawn tokens [N, T])``: the first without
        gradient, the second with it (entry ``[n, t]`` is ``log ψ_{t+1}(s_1:t, s_{t+1})``
        at ``v = inputs.tokens[n, t]``).

        For losses that differentiate log ψ only at the drawn tokens: a twist whose last
        layer is linear (:meth:`_features_sequence`) computes the full table for the
        weights but differentiates only the drawn tokens' columns, ``N T F`` instead of
        ``N T F V`` work in the backward pass. Without it, :meth:`apply_sequence` once.
        """
        features = self._features_sequence(params, inputs)
        if features is None:
            return columns_of_table(self.apply_sequence(params, inputs), inputs.tokens)
        x, weight, bias = features
        frozen = jax.lax.stop_gradient
        full = frozen(x) @ frozen(weight) + frozen(bias)
        at_tokens = jnp.sum(x * weight.T[inputs.tokens], axis=-1) + bias[inputs.tokens]
        return self._finish(full), self._finish(at_tokens)

    def _features_sequence(
        self, params: Any, inputs: TwistInputs
    ) -> tuple[jax.Array, jax.Array, jax.Array] | None:
        """``(x [N, T, F], W [F, V], b [V])`` with ``apply_sequence = finish(x W + b)``
        when the last layer is linear, else None (the default)."""
        return None

    def with_params(self, params: Any) -> Twist:
        """A copy of this twist holding ``params`` (e.g. the trained ones)."""
        other = copy.copy(self)
        other.params = params
        return other

    def __repr__(self) -> str:
        count = sum(int(x.size) for x in jax.tree.leaves(self.params))
        return f"{type(self).__name__}(vocab={self.vocab_size}, output={self.output!r}, params={count})"
