"""The one interface every lmppl network implements, and the loaded-model object.

A network is a Flax NNX module with

* ``init_cache(batch_size, max_length, dtype) -> cache``: a pytree of static shape whose
  every leaf has the batch (particle) axis leading, including ``cache.length`` ``[B]``,
  the number of positions already written for each row;
* ``__call__(tokens, cache, token_counts=None) -> LMOutput``: feed ``tokens`` ``[B, S]``
  at positions ``cache.length[b] + (0..S-1)`` and return next-token logits ``[B, S, V]``
  (float32), the final hidden states ``[B, S, H]`` (what twist heads read) and the updated
  cache. ``token_counts`` ``[B]`` (default ``S``) says how many of the S tokens of each row
  are real (right padding for prompts of different lengths); the cache length advances by it.

Because every cache leaf leads with the batch axis, one SMC resampling step is
``reorder_cache(cache, ancestors)`` and a prompt prefilled once is broadcast to N rows by
``broadcast_cache``. :class:`LanguageModel` splits the module into a static graph and its
parameters so that parameters enter jitted functions as arguments, never as constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from lmppl.lm.config import ModelConfig

__all__ = [
    "KVCache",
    "LMOutput",
    "LanguageModel",
    "Tokenizer",
    "broadcast_cache",
    "gather_rows",
    "reorder_cache",
]


class KVCache(NamedTuple):
    """Static-shape key/value cache, particle axis leading.

    Fields:
      keys: per layer ``[B, L, H_kv, D]`` (a tuple), or for scanned blocks
        (:func:`lmppl.lm.scanned`) one ``[B, layers, L, H_kv, D]`` array, the layer axis
        second so that the batch axis still leads.
      values: as ``keys``.
      length: ``[B]`` int32, positions already written in each row.
    """

    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array
    length: jax.Array


class LMOutput(NamedTuple):
    """What one network call returns.

    Fields:
      logits: ``[B, S, V]`` float32 next-token logits after each input token.
      hidden: ``[B, S, H]`` final hidden states (after the final norm).
      cache: the cache with the S new positions written.
    """

    logits: jax.Array
    hidden: jax.Array
    cache: Any


@runtime_checkable
class Tokenizer(Protocol):
    """The tokenizer surface lmppl uses (see :mod:`lmppl.lm.tokenizers`).

    Loaded checkpoints' tokenizers (Hugging Face, GGUF, llama2.c) also have
    ``apply_chat_template(messages, add_generation_prompt=..., tokenize=...)``: the prompt
    ids (or text) of a conversation by the checkpoint's chat template, or a one-line
    ``ValueError`` when it has none.
    """

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def reorder_cache(cache: Any, indices: jax.Array) -> Any:
    """Gather cache rows: row ``i`` of the result is row ``indices[i]`` of ``cache``.

    ``indices`` must lie in ``[0, N)`` (resamplers guarantee it): the gather is done in
    ``"promise_in_bounds"`` mode, without the per-element bounds mask of the default mode
    (which doubled the cost of every resampling step).
    """
    return jax.tree.map(lambda leaf: gather_rows(leaf, indices), cache)


def gather_rows(array: jax.Array, indices: jax.Array) -> jax.Array:
    """``array[indices]`` along axis 0 for indices known to be in bounds."""
    return array.at[indices].get(mode="promise_in_bounds")


def broadcast_cache(cache: Any, batch_size: int) -> Any:
    """Repeat a one-row cache ``batch_size`` times along the leading axis."""
    return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (batch_size, *leaf.shape[1:])), cache)


class LanguageModel:
    """A loaded decoder: network graph, parameters, config and tokenizer.

    ``lm.apply(params, tokens, cache)`` is a pure function of its arguments, so it can be
    jitted, differentiated (twist and TNT training) and vmapped. Instances hash by
    identity, so they can be static arguments of ``jax.jit``.

    Attributes:
      config: the :class:`ModelConfig`.
      tokenizer: a :class:`Tokenizer`, or ``None`` for token-id-only test models.
      params: the network's parameters (an ``nnx.State`` pytree).
      name: a human-readable name (model id or path).
      locally_normalised: True: the logits are normalised per step (a softmax gives
        p0(v | s_<t)); see :meth:`next_token_log_weights`.
      model_sharding: ``None``, or after :func:`lmppl.lm.shard` the
        :class:`~lmppl.lm.sharding.ModelSharding` that :meth:`apply` keeps the parameters
        and the KV cache in (tensor-parallel over a mesh axis).
    """

    locally_normalised: bool = True
    model_sharding: Any = None

    def __init__(
        self,
        network: nnx.Module,
        config: ModelConfig,
        tokenizer: Tokenizer | None = None,
        name: str = "model",
    ):
        self.graphdef, self.params = nnx.split(network)
        self.config = config
        self.tokenizer = tokenizer
        self.name = name

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LanguageModel({self.name!r}, {c.architecture}, vocab={c.vocab_size}, "
            f"layers={c.num_layers}, hidden={c.hidden_size}, context={c.context_length})"
        )

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def context_length(self) -> int:
        return self.config.context_length

    @property
    def eos_token_id(self) -> int | None:
        """The token that ends a sequence: the tokenizer's, else the config's (or None)."""
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        return self.config.eos_token_id if eos is None else eos

    def next_token_log_weights(self, logits: jax.Array, temperature: float) -> jax.Array:
        """``[..., V]`` float32 ``log p0(v | s_<t) = log softmax(logits / temperature)``."""
        return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)

    @property
    def dtype(self) -> jnp.dtype:
        leaves = jax.tree.leaves(self.params)
        return leaves[0].dtype if leaves else jnp.dtype(jnp.float32)

    def network(self, params: Any | None = None) -> nnx.Module:
        """The NNX module with ``params`` (default: the loaded ones) merged in."""
        return nnx.merge(self.graphdef, self.params if params is None else params)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any | None = None) -> Any:
        """An empty cache for ``batch_size`` rows of at most ``max_length`` positions."""
        if max_length > self.context_length:
            raise ValueError(
                f"a cache of {max_length} positions exceeds the context length "
                f"{self.context_length} of {self.name}"
            )
        return self.network().init_cache(batch_size, max_length, dtype or self.dtype)

    def apply(
        self,
        params: Any,
        tokens: jax.Array,
        cache: Any,
        token_counts: jax.Array | None = None,
    ) -> LMOutput:
        """Run the network on ``tokens`` ``[B, S]`` against ``cache`` (pure; jit-friendly).

        A sharded model (:func:`lmppl.lm.shard`) constrains ``params`` and the cache it
        reads and returns to its layout, so XLA keeps them split however they were made.
        """
        layout = self.model_sharding
        if layout is None:
            return nnx.merge(self.graphdef, params)(tokens, cache, token_counts)
        params, cache = layout.constrain_params(params), layout.constrain_cache(cache)
        out = nnx.merge(self.graphdef, params)(tokens, cache, token_counts)
        return out._replace(cache=layout.constrain_cache(out.cache))

    def astype(self, dtype: Any) -> LanguageModel:
        """A copy whose floating-point parameters are cast to ``dtype`` (e.g. bfloat16)."""
        return self.with_params(
            jax.tree.map(
                lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                self.params,
            )
        )

    def with_params(self, params: Any, name: str | None = None) -> LanguageModel:
        """A copy of this model with other parameters (same structure; e.g. fine-tuned)."""
        if jax.tree.structure(params) != jax.tree.structure(self.params):
            raise ValueError(f"params do not have the structure of {self.name}'s parameters")
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.params = params
        if name is not None:
            other.name = name
        return other

    def with_tokenizer(self, tokenizer: Tokenizer | None, name: str | None = None) -> LanguageModel:
        """A copy of this model (same network and parameters) with another tokenizer.

        E.g. a base model given its instruct model's tokenizer, so that both stop at the
        instruct model's end-of-turn token (``eos_token_id`` follows the tokenizer) and
        ``lmppl.realign`` accepts the pair. The tokenizer must not have more tokens than
        the model.
        """
        size = getattr(tokenizer, "vocab_size", 0) if tokenizer is not None else 0
        if size > self.vocab_size:
            raise ValueError(
                f"a tokenizer of {size} tokens for {self.name}, a model of {self.vocab_size}"
            )
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.tokenizer = tokenizer
        if name is not None:
            other.name = name
        return other
