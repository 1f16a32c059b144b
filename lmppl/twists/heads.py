"""Twist heads on the frozen base LM's hidden states: linear and MLP.

``log ψ_{t+1}(s_1:t, ·) = head(h_t)`` ``[V]``, with ``h_t`` ``[H]`` the base LM's final
hidden state after the last fed token (the sweep already computes it, so a head costs
one small matmul per step). The base LM is not part of the twist's parameters: it stays
frozen. The last layer starts at zero (ψ ≡ 1 or 1/2: the proposal is p0).

Conditional twists (infilling): with ``condition_length=c`` the head also reads the
conditioning tokens ``TwistInputs.condition`` (``[c]`` shared or ``[N, c]``, e.g. the
observed continuation), embedded by a learned table ``[V, E]`` and flattened to
``[c · E]``, concatenated to ``h_t``. Supply them with
``TwistedSMC(..., twist_condition=f)`` / ``fit(..., twist_condition=f)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lmppl.infer.twist import TwistInputs
from lmppl.lm.base import LanguageModel
from lmppl.twists.base import Twist, map_steps

__all__ = ["LinearTwist", "MLPTwist", "condition_features"]


def condition_features(table: jax.Array, condition: Any, num_rows: int) -> jax.Array:
    """``[N, c · E]`` embedded conditioning tokens (``condition`` ``[c]`` or ``[N, c]``)."""
    if condition is None:
        raise ValueError(
            "this twist was built with condition_length; pass twist_condition=f(*args, **kwargs) "
            "to TwistedSMC / fit"
        )
    condition = jnp.asarray(condition, jnp.int32)
    if condition.ndim not in (1, 2):
        raise ValueError(f"condition must be [c] or [N, c] token ids, got {condition.shape}")
    embedded = table[condition].reshape(*condition.shape[:-1], -1)
    return jnp.broadcast_to(embedded, (num_rows, embedded.shape[-1]))


class _HeadTwist(Twist):
    def _init_condition(self, key, vocab: int, condition_length: int, condition_size: int):
        self.condition_length = condition_length
        if not condition_length:
            return {}, 0
        table = jax.random.normal(key, (vocab, condition_size), jnp.float32) * 0.1
        return {"condition": table}, condition_length * condition_size

    def _features(self, params: Any, inputs: TwistInputs) -> jax.Array:
        hidden = inputs.hidden.astype(jnp.float32)
        if not self.condition_length:
            return hidden
        extra = condition_features(params["condition"], inputs.condition, hidden.shape[0])
        if extra.shape[-1] != params["layers"][0]["weight"].shape[0] - hidden.shape[-1]:
            raise ValueError(
                f"condition has {extra.shape[-1] // params['condition'].shape[1]} tokens, the "
                f"twist was built with condition_length={self.condition_length}"
            )
        return jnp.concatenate([hidden, extra], axis=-1)

    def _penultimate(self, params: Any, inputs: TwistInputs) -> jax.Array:
        """``[N, F]``: the input of the last (linear) layer."""
        x = self._features(params, inputs)
        for layer in params["layers"][:-1]:
            x = jax.nn.gelu(x @ layer["weight"] + layer["bias"])
        return x

    def _raw(self, params: Any, inputs: TwistInputs) -> jax.Array:
        last = params["layers"][-1]
        return self._penultimate(params, inputs) @ last["weight"] + last["bias"]

    def _features_sequence(self, params: Any, inputs: TwistInputs):
        x = map_steps(self._penultimate, params, inputs)
        last = params["layers"][-1]
        return x, last["weight"], last["bias"]


def _dense(key, fan_in: int, fan_out: int, zero: bool) -> dict:
    if zero:
        weight = jnp.zeros((fan_in, fan_out), jnp.float32)
    else:
        weight = jax.random.normal(key, (fan_in, fan_out), jnp.float32) / jnp.sqrt(fan_in)
    return {"weight": weight, "bias": jnp.zeros((fan_out,), jnp.float32)}


class LinearTwist(_HeadTwist):
    """``log ψ_{t+1}(s_1:t, ·) = W h_t + b`` (``W`` ``[H, V]``, ``b`` ``[V]``, both zero at start).

    Args:
      lm: the base :class:`~lmppl.lm.base.LanguageModel` (for its sizes; it stays frozen).
      output: ``"log"`` or ``"log_sigmoid"`` (see :mod:`lmppl.twists.base`).
      condition_length: number of conditioning tokens read from ``TwistInputs.condition``
        (0: unconditional).
      condition_size: embedding width E of each conditioning token.
      seed: initialisation seed (the condition embedding; the head itself starts at 0).
    """

    def __init__(
        self,
        lm: LanguageModel,
        *,
        output: str = "log",
        condition_length: int = 0,
        condition_size: int = 16,
        seed: int = 0,
    ):
        self.output = self._check_output(output)
        self.vocab_size = lm.vocab_size
        params, extra = self._init_condition(
            jax.random.key(seed), lm.vocab_size, condition_length, condition_size
        )
        params["layers"] = [_dense(None, lm.hidden_size + extra, lm.vocab_size, zero=True)]
        self.params = params


class MLPTwist(_HeadTwist):
    """``log ψ_{t+1}(s_1:t, ·) = W_L gelu(… gelu(W_1 h_t + b_1) …) + b_L``.

    ``num_layers`` dense layers in all (default 3, as in the paper), ``hidden_size`` wide;
    the last one starts at zero.

    Args:
      lm: the base :class:`~lmppl.lm.base.LanguageModel` (frozen).
      hidden_size: width of the hidden layers.
      num_layers: number of dense layers (at least 2).
      output, condition_length, condition_size, seed: as :class:`LinearTwist`.
    """

    def __init__(
        self,
        lm: LanguageModel,
        hidden_size: int = 256,
        *,
        num_layers: int = 3,
        output: str = "log",
        condition_length: int = 0,
        condition_size: int = 16,
        seed: int = 0,
    ):
        if num_layers < 2:
            raise ValueError(f"MLPTwist needs num_layers >= 2 (use LinearTwist), got {num_layers}")
        self.output = self._check_output(output)
        self.vocab_size = lm.vocab_size
        keys = jax.random.split(jax.random.key(seed), num_layers + 1)
        params, extra = self._init_condition(
            keys[-1], lm.vocab_size, condition_length, condition_size
        )
        sizes = [lm.hidden_size + extra] + [hidden_size] * (num_layers - 1) + [lm.vocab_size]
        params["layers"] = [
            _dense(keys[i], sizes[i], sizes[i + 1], zero=i == num_layers - 1)
            for i in range(num_layers)
        ]
        self.params = params
