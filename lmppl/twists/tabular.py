"""A tabular twist: one free parameter per prefix, for enumerable targets.

``log ψ_t(s_1:t)`` is looked up in a table of ``V^t`` entries per step t = 1..T
(the prefix read as a base-V number, as :class:`~lmppl.infer.exact.ExactTwist`). It can
represent every twist, so on tiny vocabularies and lengths a trained tabular twist can be
compared with the optimal ψ*_t entry by entry. All entries start at zero (ψ ≡ 1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmppl.infer.twist import TwistInputs
from lmppl.twists.base import Twist

__all__ = ["TabularTwist"]


class TabularTwist(Twist):
    """``log ψ_t`` as a table over all prefixes of length t (``Σ_t V^t`` parameters).

    Args:
      vocab_size: V.
      max_new_tokens: T, the LM site's length.
      output: ``"log"`` or ``"log_sigmoid"`` (see :mod:`lmppl.twists.base`).
    """

    def __init__(self, vocab_size: int, max_new_tokens: int, *, output: str = "log"):
        if vocab_size**max_new_tokens > 1 << 20:
            raise ValueError(
                f"a tabular twist over {vocab_size}^{max_new_tokens} prefixes is too large"
            )
        self.output = self._check_output(output)
        self.vocab_size = vocab_size
        self.max_new_tokens = max_new_tokens
        self.params = [
            jnp.zeros((vocab_size**t,), jnp.float32) for t in range(1, max_new_tokens + 1)
        ]

    def _raw(self, params: Any, inputs: TwistInputs) -> jax.Array:
        tokens, step = inputs.tokens, inputs.step
        vocab = self.vocab_size
        positions = jnp.arange(tokens.shape[1])
        powers = jnp.where(positions < step, vocab ** jnp.maximum(step - 1 - positions, 0), 0)
        code = jnp.sum(tokens * powers, axis=1)
        table = jnp.concatenate(params)
        sizes = [vocab**t for t in range(1, self.max_new_tokens + 1)]
        offsets = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)[:-1]]), jnp.int32)
        index = offsets[step] + code[:, None] * vocab + jnp.arange(vocab)[None, :]
        return table[index]

    def log_psi(self, params: Any | None = None) -> list[jax.Array]:
        """The tables ``[V^t]`` for t = 1..T of ``log ψ_t`` (after the output mode)."""
        params = self.params if params is None else params
        return [self._finish(table) for table in params]
