"""The twist interface: what TwistedSMC asks of a twist.

A twist for an LM site gives, for every particle and every vocabulary entry ``v``,
``log ψ_{t+1}(s_1:t, v)`` — the log of an (unnormalised) estimate of how much the
completion of ``s_1:t, v`` will be worth under the target, i.e. of the optimal twist
``ψ*_{t+1}(s_1:t+1) = E_p0[φ(s) | s_1:t+1]``. One call covers the whole vocabulary,
so the twist-induced proposal ``q(v) ∝ p0(v | s_1:t) ψ_{t+1}(s_1:t, v)`` costs one
evaluation per step.

Two forms are accepted:

* a callable ``twist(inputs: TwistInputs) -> [N, V]`` (e.g. a table, a closed form);
* an object with ``params`` (a pytree) and ``apply(params, inputs) -> [N, V]``: the
  parameters then enter the jitted sweep as arguments (learned twists in
  :mod:`lmppl.twists`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from lmppl.types import ParametricTwist

__all__ = ["ParametricTwist", "TwistInputs", "split_twist"]


class TwistInputs(NamedTuple):
    """What a twist sees at decoding step ``t`` (``t`` tokens already generated).

    Fields:
      hidden: ``[N, H]`` the base LM's final hidden state after the last fed token
        (the last prompt token when ``t == 0``).
      tokens: ``[N, T]`` tokens generated so far (entries at positions ``>= t`` are 0).
      step: ``[]`` int32, ``t``.
      condition: a pytree the caller attaches (e.g. an observed continuation), or None;
        ``TwistedSMC(..., twist_condition=f)`` attaches ``f(*args, **kwargs)``.
      prompt_tokens: ``[P]`` the LM site's prompt (right-padded), or None; read by twists
        that run their own network over prompt and prefix.
      prompt_length: ``[]`` int32 real length of ``prompt_tokens``, or None.
    """

    hidden: jax.Array
    tokens: jax.Array
    step: jax.Array
    condition: Any = None
    prompt_tokens: jax.Array | None = None
    prompt_length: jax.Array | None = None


def split_twist(twist: Any) -> tuple[Callable[[Any, TwistInputs], jax.Array], Any]:
    """``(apply(params, inputs), params)`` for either form of twist."""
    if isinstance(twist, ParametricTwist):
        return twist.apply, twist.params
    if callable(twist):
        return (lambda params, inputs: twist(inputs)), None
    raise TypeError(
        f"a twist must be callable or have .params and .apply(params, inputs); got {type(twist).__name__}"
    )
