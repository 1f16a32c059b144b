"""``lmppl.LM``: a language model as a NumPyro distribution over token sequences.

``LM(lm, prompt, max_new_tokens)`` is the distribution p0 of the next ``T =
max_new_tokens`` tokens after ``prompt``:

    p0(s_1:T) = prod_t softmax(logits(prompt, s_<t) / temperature)[s_t].

With ``stop_at_eos`` (the default) a sequence ends at its first EOS token; the rest is
padding (EOS again) that contributes nothing to ``log_prob``, and a sequence with any
other token after its first EOS has probability zero. With ``stop_at_eos=False`` EOS is
an ordinary token and every sequence has exactly ``T`` free tokens (the fixed-length
generation of the paper's tasks).

A model that is not ``locally_normalised`` (``lmppl.realign(..., mode="global")``)
defines an unnormalised sequence target: ``log_prob`` is ``log p̃0(s) = Σ_t m_t(s_t)``
with ``m_t`` its raw logits, ``sample`` draws from the per-step law ``softmax(m_t)``,
and the inference backends weight those draws to p̃0 (see :mod:`lmppl.decoding`).

It is an ordinary NumPyro distribution (a pytree whose leaves are the prompt arrays and
the model parameters), so ``numpyro.sample("story", LM(...))`` works under ``seed``,
``trace``, ``substitute``, ``condition``, ``Predictive`` and ``log_density``; lmppl's
inference backends read the same site and run their own particle sweeps.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.distributions import Distribution, constraints

from lmppl.decoding import check_temperature, sample_tokens, score_tokens
from lmppl.lm.base import LanguageModel
from lmppl.prompt import resolve_model_prompt

__all__ = ["LM"]


class LM(Distribution):
    """A language model's distribution over the next ``max_new_tokens`` tokens.

    Args:
      lm: a loaded :class:`~lmppl.lm.LanguageModel` (``lmppl.load(...)``) or any object
        with the same interface (e.g. ``lmppl.realign(...)``).
      prompt: text (encoded with the model's BOS convention), token ids (used exactly as
        given, ``[P]`` or batched ``[..., P]``), or ``lmppl.concat(...)`` of those and
        earlier sampled sequences.
      max_new_tokens: T, the event size.
      source: instead of ``prompt``, for an encoder-decoder model (T5, Flan-T5): the text
        (tokenized, EOS appended) or token ids ``[S]`` / ``[..., S]`` its encoder reads; the
        decoder starts from its start token. Stored as the packed prompt
        ``[d_0, x_1..x_S]`` (see :mod:`lmppl.lm.t5`), e.g.
        ``lmppl.LM(lmppl.load("google/flan-t5-small"), source="Translate to German: Hi",
        max_new_tokens=16)``.
      temperature: p0 is the model's next-token distribution at this temperature (> 0).
      stop_at_eos: end a sequence at its first EOS (padding after it); ``False`` makes
        EOS an ordinary token (fixed-length sequences).
      params: parameters to use instead of ``lm.params`` (for training and sweeps).
    """

    pytree_data_fields = ("prompt_tokens", "prompt_length", "params")
    pytree_aux_fields = ("model", "max_new_tokens", "temperature", "stop_at_eos")
    is_discrete = True

    def __init__(
        self,
        lm: LanguageModel,
        prompt: Any = None,
        max_new_tokens: int | None = None,
        temperature: float = 1.0,
        stop_at_eos: bool = True,
        params: Any = None,
        *,
        source: Any = None,
        validate_args: bool | None = None,
    ):
        if not hasattr(lm, "apply") or not hasattr(lm, "init_cache"):
            raise TypeError(
                f"LM needs a loaded language model (lmppl.load), got {type(lm).__name__}"
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not (isinstance(temperature, int | float) and temperature > 0):
            raise ValueError(
                f"temperature must be a positive number, got {temperature!r} "
                "(for greedy decoding use lmppl.generate(..., temperature=0))"
            )
        check_temperature(lm, temperature)
        tokens, length = resolve_model_prompt(lm, prompt, source, max_new_tokens)
        if tokens.shape[-1] + max_new_tokens > lm.context_length:
            raise ValueError(
                f"the prompt ({tokens.shape[-1]} tokens) plus max_new_tokens={max_new_tokens} "
                f"exceeds the context length {lm.context_length} of {lm.name}"
            )
        self.model = lm
        self.prompt_tokens = tokens
        self.prompt_length = length
        self.params = lm.params if params is None else params
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.stop_at_eos = bool(stop_at_eos)
        super().__init__(
            batch_shape=tuple(tokens.shape[:-1]),
            event_shape=(max_new_tokens,),
            validate_args=validate_args,
        )

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return constraints.independent(
            constraints.integer_interval(0, self.model.vocab_size - 1), 1
        )

    @property
    def eos_token_id(self) -> int | None:
        """The token that ends a sequence, or ``None`` when ``stop_at_eos`` is off."""
        return self.model.eos_token_id if self.stop_at_eos else None

    def with_params(self, params: Any) -> LM:
        """The same distribution evaluated with other model parameters."""
        other = jax.tree.unflatten(jax.tree.structure(self), jax.tree.leaves(self))
        other.params = params
        return other

    def _rows(self, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        """Prompt tokens/lengths broadcast to ``shape`` and flattened to rows."""
        width = self.prompt_tokens.shape[-1]
        tokens = jnp.broadcast_to(self.prompt_tokens, (*shape, width)).reshape(-1, width)
        length = jnp.broadcast_to(self.prompt_length, shape).reshape(-1)
        return tokens, length

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        """Ancestral samples ``[*sample_shape, *batch_shape, T]`` in one batched, cached scan."""
        shape = tuple(sample_shape) + self.batch_shape
        rows = math.prod(shape)
        if self.batch_shape:
            tokens, length = self._rows(shape)
        else:
            tokens, length = self.prompt_tokens, self.prompt_length
        samples, _ = sample_tokens(
            key,
            self.params,
            tokens,
            length,
            model=self.model,
            num_rows=rows,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            eos=self.eos_token_id,
        )
        return samples.reshape((*shape, self.max_new_tokens))

    def log_prob(self, value: jax.Array) -> jax.Array:
        """Teacher-forced ``log p0(value | prompt)``, shape ``value.shape[:-1]``."""
        value = jnp.asarray(value)
        if value.shape[-1:] != (self.max_new_tokens,):
            raise ValueError(
                f"LM.log_prob expects token arrays ending in {self.max_new_tokens}, got {value.shape}"
            )
        shape = jnp.broadcast_shapes(value.shape[:-1], self.batch_shape)
        values = jnp.broadcast_to(value, (*shape, self.max_new_tokens)).reshape(
            -1, self.max_new_tokens
        )
        tokens, length = self._rows(shape)
        log_probs = score_tokens(
            self.params,
            tokens,
            length,
            values.astype(jnp.int32),
            model=self.model,
            temperature=self.temperature,
            eos=self.eos_token_id,
        )
        return log_probs.reshape(shape)
