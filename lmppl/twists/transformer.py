"""A twist with its own transformer body: a trainable copy of the base LM plus a head.

``log ψ_{t+1}(s_1:t, ·) = head(g_t)`` where ``g_t`` ``[H]`` is the final hidden state of
the twist's *own* body (initialised as a copy of the base LM, then trained) after
prompt + ``s_1:t``. The base LM itself stays frozen; the head starts at zero (ψ ≡ 1).

How the body's state is obtained: ``apply`` runs the body teacher-forced over the whole
static-shape buffer ``[N, P + T]`` (the prompt's real tokens, then the tokens so far; the
positions after them are placeholders that causal attention never lets position
``L − 1 + t`` see) and reads position ``L − 1 + t``. That is O(P + T) work per step (so
O(T · (P + T)) per sweep) instead of the O(1) of a cached step: simple and exact, and
cheap for the small models twists are trained with here. ``apply_sequence`` (training)
runs the body once for all steps.

Conditional twists (infilling): with ``conditional=True`` the conditioning tokens
(``TwistInputs.condition``, ``[c]`` or ``[N, c]``) are fed through the same body and
its final hidden state is concatenated to ``g_t`` (head input ``[2H]``), as in the paper.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lmppl.infer.twist import TwistInputs
from lmppl.lm.base import LanguageModel
from lmppl.twists.base import Twist

__all__ = ["TransformerTwist", "prompt_and_tokens"]


def prompt_and_tokens(
    prompt_tokens: jax.Array, prompt_length: jax.Array, tokens: jax.Array
) -> jax.Array:
    """``[N, P + T]``: the prompt's ``L`` real tokens followed by ``tokens`` ``[N, T]``.

    The prompt is ``[P]`` with length ``[]`` (shared) or ``[N, P]`` with lengths ``[N]``
    (one per particle). Positions ``>= L + T`` repeat the last token (never read through a
    causal mask).
    """
    rows, steps = tokens.shape
    width = prompt_tokens.shape[-1]
    positions = jnp.arange(width + steps)
    prompts = jnp.broadcast_to(prompt_tokens, (rows, width))
    lengths = jnp.broadcast_to(prompt_length, (rows,))[:, None]
    from_prompt = prompts[:, jnp.minimum(positions, width - 1)]
    generated = jnp.take_along_axis(
        tokens, jnp.clip(positions[None, :] - lengths, 0, steps - 1), axis=1
    )
    return jnp.where(positions[None, :] < lengths, from_prompt, generated)


class TransformerTwist(Twist):
    """A trainable copy of the base LM's body with a zero-initialised linear head.

    Args:
      lm: the base :class:`~lmppl.lm.base.LanguageModel`; its parameters are copied
        into the twist (the base LM itself stays frozen).
      output: ``"log"`` or ``"log_sigmoid"`` (see :mod:`lmppl.twists.base`).
      conditional: read ``TwistInputs.condition`` (conditioning tokens) through the body.
    """

    def __init__(self, lm: LanguageModel, *, output: str = "log", conditional: bool = False):
        if getattr(lm, "is_encoder_decoder", False):
            raise ValueError(
                f"TransformerTwist copies a decoder-only body; {lm.name} is an encoder-decoder "
                "model (its prompt packs the source): use LinearTwist or MLPTwist, which read "
                "the decoder's hidden states"
            )
        self.output = self._check_output(output)
        self.vocab_size = lm.vocab_size
        self.lm = lm
        self.conditional = conditional
        width = lm.hidden_size * (2 if conditional else 1)
        self.params = {
            "body": jax.tree.map(jnp.array, lm.params),
            "head": {
                "weight": jnp.zeros((width, lm.vocab_size), jnp.float32),
                "bias": jnp.zeros((lm.vocab_size,), jnp.float32),
            },
        }

    def _body_hidden(self, params: Any, inputs: TwistInputs) -> jax.Array:
        """``[N, T, H]`` body states before each step ``t = 0..T-1``."""
        if inputs.prompt_tokens is None or inputs.prompt_length is None:
            raise ValueError(
                "TransformerTwist needs the prompt (TwistInputs.prompt_tokens): run it through "
                "lmppl.infer.TwistedSMC or lmppl.twists.fit"
            )
        tokens = inputs.tokens
        rows, steps = tokens.shape
        sequence = prompt_and_tokens(inputs.prompt_tokens, inputs.prompt_length, tokens)
        cache = self.lm.init_cache(rows, sequence.shape[1])
        hidden = self.lm.apply(params["body"], sequence, cache).hidden
        positions = jnp.maximum(inputs.prompt_length - 1, 0) + jnp.arange(steps)
        return hidden[:, positions].astype(jnp.float32)

    def _condition(self, params: Any, inputs: TwistInputs, rows: int) -> jax.Array:
        if inputs.condition is None:
            raise ValueError(
                "this TransformerTwist is conditional; pass twist_condition=f(*args, **kwargs) "
                "to TwistedSMC / fit"
            )
        condition = jnp.asarray(inputs.condition, jnp.int32)
        condition = jnp.broadcast_to(condition, (rows, condition.shape[-1]))
        cache = self.lm.init_cache(rows, condition.shape[1])
        hidden = self.lm.apply(params["body"], condition, cache).hidden[:, -1]
        return hidden.astype(jnp.float32)

    def _head_input(self, params: Any, features: jax.Array, inputs: TwistInputs) -> jax.Array:
        if self.conditional:
            summary = self._condition(params, inputs, features.shape[0])
            if features.ndim == 3:
                summary = jnp.broadcast_to(summary[:, None], features.shape)
            features = jnp.concatenate([features, summary], axis=-1)
        return features

    def _head(self, params: Any, features: jax.Array, inputs: TwistInputs) -> jax.Array:
        head = params["head"]
        x = self._head_input(params, features, inputs)
        return self._finish(x @ head["weight"] + head["bias"])

    def _features_sequence(self, params: Any, inputs: TwistInputs):
        x = self._head_input(params, self._body_hidden(params, inputs), inputs)
        return x, params["head"]["weight"], params["head"]["bias"]

    def apply(self, params: Any, inputs: TwistInputs) -> jax.Array:
        """``[N, V]`` at step ``inputs.step`` (O(P + T) body pass; see the module docstring)."""
        hidden = self._body_hidden(params, inputs)
        index = jnp.broadcast_to(inputs.step, (hidden.shape[0], 1, 1))
        current = jnp.take_along_axis(hidden, index, axis=1)[:, 0]
        return self._head(params, current, inputs)

    def apply_sequence(self, params: Any, inputs: TwistInputs) -> jax.Array:
        """``[N, T, V]`` for every step of ``inputs.tokens``: one body pass."""
        return self._head(params, self._body_hidden(params, inputs), inputs)
