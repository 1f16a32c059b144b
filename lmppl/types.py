"""The declared interfaces of lmppl's parts, as ``typing.Protocol``s (one per kind of part).

Every implementation in the library is checked against its Protocol by
``tests/language/test_types.py`` (structure with ``isinstance`` and behaviour with a call
on tiny inputs). Shapes: N particles (or rows), T new tokens, V vocabulary entries.

* :class:`LanguageModelLike` — a decoder with a static-shape cache: ``apply(params,
  tokens [B, S], cache, token_counts) -> LMOutput`` (logits ``[B, S, V]``, hidden
  ``[B, S, H]``, the advanced cache); it owns its EOS rule (``eos_token_id``) and how its
  logits become per-token log-weights (``next_token_log_weights``; ``locally_normalised``
  False for a sequence-level target such as global DeRa). ``LanguageModel`` and DeRa's
  ``Realigned``.
* :class:`TwistFunction` — a fixed twist ``twist(inputs) -> [N, V]`` log ψ_{t+1}.
* :class:`ParametricTwist` — a learned twist: ``params`` and ``apply(params, inputs)``.
* :class:`TwistLossFunction` — ``loss(samples) -> (scalar, metrics)`` of twist learning.
* :class:`StepPotentialFunction` — ``log_potential(prefix [T], t) -> [V]`` of a per-step
  factor (:func:`lmppl.potentials.step_factor`).
* :class:`StatefulStepPotential` — a per-step factor with a state carried per particle
  (``init``, ``log_weights(state, prefix, t) -> [V]``, ``update(state, token, t)``): the
  form SMC runs every per-step potential in; a constraint's automaton
  (:func:`lmppl.potentials.constrain`) is one.
* :class:`Resampler` — ``resampler(rng_key, log_weights [N], num_samples) -> [num_samples]``
  ancestor indices (:mod:`lmppl.infer.resampling`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

__all__ = [
    "LanguageModelLike",
    "ParametricTwist",
    "Resampler",
    "StatefulStepPotential",
    "StepPotentialFunction",
    "TwistFunction",
    "TwistLossFunction",
]


@runtime_checkable
class LanguageModelLike(Protocol):
    """What inference asks of a language model (``lmppl.LM``'s ``model``)."""

    name: str
    params: Any
    tokenizer: Any

    @property
    def vocab_size(self) -> int: ...

    @property
    def context_length(self) -> int: ...

    @property
    def eos_token_id(self) -> int | None:
        """The token that ends a sequence (None: the model has none)."""
        ...

    @property
    def locally_normalised(self) -> bool:
        """True when ``next_token_log_weights`` sums to one over the vocabulary."""
        ...

    def next_token_log_weights(self, logits: jax.Array, temperature: float) -> jax.Array:
        """``[..., V]`` float32 log p0(v | s_<t) (or the log-weights m_t(v)) from logits."""
        ...

    def init_cache(self, batch_size: int, max_length: int, dtype: Any | None = None) -> Any:
        """An empty cache of ``batch_size`` rows and ``max_length`` positions."""
        ...

    def apply(
        self, params: Any, tokens: jax.Array, cache: Any, token_counts: jax.Array | None = None
    ) -> Any:
        """``LMOutput(logits [B, S, V], hidden [B, S, H], cache)`` for ``tokens [B, S]``."""
        ...


@runtime_checkable
class TwistFunction(Protocol):
    """A fixed twist: ``[N, V]`` log ψ_{t+1}(s_1:t, v) from ``TwistInputs``."""

    def __call__(self, inputs: Any) -> jax.Array: ...


@runtime_checkable
class ParametricTwist(Protocol):
    """A learned twist whose parameters enter the jitted sweep as arguments."""

    params: Any

    def apply(self, params: Any, inputs: Any) -> jax.Array:
        """``[N, V]`` log ψ_{t+1}(s_1:t, v) at step ``inputs.step``."""
        ...


@runtime_checkable
class TwistLossFunction(Protocol):
    """``loss({kind: Samples}) -> (loss [], {metric: []})``; kinds: proposal, base, target."""

    def __call__(self, samples: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]: ...


@runtime_checkable
class StepPotentialFunction(Protocol):
    """``[V]`` log m_t(s_<t, v) of every candidate token; reads only ``prefix[:t]``."""

    def __call__(self, prefix: jax.Array, t: jax.Array) -> jax.Array: ...


@runtime_checkable
class StatefulStepPotential(Protocol):
    """A per-step factor ``Π_t m_t(state_t, s_<t, s_t)`` whose state summarises the prefix.

    One sequence's view (SMC vmaps it over particles and gathers the state on
    resampling); the state is a pytree of arrays of fixed shape.
    """

    def init(self) -> Any:
        """The state before the first token."""
        ...

    def log_weights(self, state: Any, prefix: jax.Array, t: jax.Array) -> jax.Array:
        """``[V]`` log m_t of every candidate token (``prefix [T]``: read ``[:t]`` only)."""
        ...

    def update(self, state: Any, token: jax.Array, t: jax.Array) -> Any:
        """The state after token ``t`` is ``token``."""
        ...


@runtime_checkable
class Resampler(Protocol):
    """``[num_samples]`` int32 ancestors; unbiased: E[#offspring of i] = num_samples · w_i."""

    def __call__(
        self, rng_key: jax.Array, log_weights: jax.Array, num_samples: int
    ) -> jax.Array: ...
