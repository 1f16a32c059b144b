"""A tiny table language model for exact tests and examples.

``p(s_{t+1} = v | s_{<=t}) = softmax(transition[s_t] + position[t+1])[v]``: the next token
depends on the previous token and its position only. With a vocabulary of 4–8 tokens and a
few steps every sequence can be enumerated, so inference can be checked against the exact
target. It implements the same interface as the transformer networks (see
:mod:`lmppl.lm.base`), so every algorithm runs on it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmppl.lm.base import LanguageModel, LMOutput
from lmppl.lm.config import ModelConfig

__all__ = ["CharTokenizer", "TableCache", "TableNetwork", "table_lm"]


class TableCache(NamedTuple):
    """The table model's whole state: how many positions each row has consumed.

    Fields:
      length: ``[B]`` int32.
    """

    length: jax.Array


class TableNetwork(nnx.Module):
    """Next-token logits from a (previous token, position) table."""

    def __init__(self, config: ModelConfig, *, scale: float, rngs: nnx.Rngs):
        vocab, context, hidden = config.vocab_size, config.context_length, config.hidden_size
        self.config = config
        self.transition = nnx.Param(scale * jax.random.normal(rngs.params(), (vocab, vocab)))
        self.position = nnx.Param(0.5 * scale * jax.random.normal(rngs.params(), (context, vocab)))
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, hidden)))
        self.position_embedding = nnx.Param(jax.random.normal(rngs.params(), (context, hidden)))

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> TableCache:
        del max_length, dtype
        return TableCache(length=jnp.zeros((batch_size,), jnp.int32))

    def __call__(self, tokens, cache: TableCache, token_counts=None) -> LMOutput:
        batch, steps = tokens.shape
        positions = cache.length[:, None] + jnp.arange(steps)[None, :]
        next_positions = jnp.minimum(positions + 1, self.config.context_length - 1)
        logits = self.transition[...][tokens] + self.position[...][next_positions]
        hidden = self.embedding[...][tokens] + self.position_embedding[...][positions]
        counts = jnp.full((batch,), steps, jnp.int32) if token_counts is None else token_counts
        return LMOutput(
            logits=logits.astype(jnp.float32),
            hidden=hidden,
            cache=TableCache(length=cache.length + counts.astype(jnp.int32)),
        )


class CharTokenizer:
    """One token per symbol; ids 0 and 1 are ``<s>`` and ``</s>``.

    ``CharTokenizer("abcd")`` has vocabulary ``<s> </s> a b c d``. Encoding maps each
    character to its id (unknown characters are an error); decoding joins the symbols.
    """

    def __init__(self, symbols: Sequence[str]):
        self.pieces = ["<s>", "</s>", *symbols]
        self._ids = {piece: i for i, piece in enumerate(self.pieces)}
        self.vocab_size = len(self.pieces)
        self.bos_token_id = 0
        self.eos_token_id = 1

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        unknown = sorted({c for c in text if c not in self._ids})
        if unknown:
            raise ValueError(f"characters {unknown} are not in this tokenizer's vocabulary")
        return ([self.bos_token_id] if add_bos else []) + [self._ids[c] for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        special = {self.bos_token_id, self.eos_token_id}
        return "".join(
            self.pieces[int(i)] for i in ids if not (skip_special_tokens and int(i) in special)
        )


def table_lm(
    symbols: Sequence[str] | int = 4,
    *,
    context_length: int = 16,
    hidden_size: int = 8,
    scale: float = 1.0,
    seed: int = 0,
) -> LanguageModel:
    """A random table LM over ``<s>``, ``</s>`` and ``symbols`` (or that many letters).

    Args:
      symbols: the non-special symbols, or their number (taken from ``"abcdefgh..."``).
      context_length: longest sequence (prompt plus generation).
      hidden_size: width of the hidden states handed to twist heads.
      scale: standard deviation of the random logit tables (larger = more peaked).
      seed: the random initialisation's seed.
    """
    if isinstance(symbols, int):
        symbols = "abcdefghijklmnopqrstuvwxyz"[:symbols]
    tokenizer = CharTokenizer(symbols)
    config = ModelConfig(
        architecture="table",
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_layers=0,
        num_heads=0,
        num_kv_heads=0,
        head_dim=0,
        intermediate_size=0,
        context_length=context_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    network = TableNetwork(config, scale=scale, rngs=nnx.Rngs(seed))
    return LanguageModel(network, config, tokenizer, name=f"table-{tokenizer.vocab_size}")
