"""Random-initialised tiny transformers for tests and examples (no checkpoint needed).

``random_lm("llama", vocab_size=6)`` builds a real Llama / GPT-2 / GPT-Neo network of
the requested size with random weights, wrapped as a :class:`LanguageModel` with a
character tokenizer. With a vocabulary of 4–8 symbols and a few new tokens every
sequence can be enumerated, so inference over a real KV-cached transformer can be checked
against the exact target.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

from lmppl.lm.base import LanguageModel
from lmppl.lm.build import NETWORKS
from lmppl.lm.config import ModelConfig
from lmppl.lm.table import CharTokenizer

__all__ = ["random_lm"]


def _random_tensor(name: str, shape: tuple[int, ...], seed: int, scale: float) -> jax.Array:
    """Norm weights near one, biases near zero, matrices ``N(0, scale² / fan_in)`` with
    ``fan_in`` the last axis (for embeddings too, so tied-output logits are O(scale))."""
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
    noise = jax.random.normal(key, shape)
    if any(part in name for part in ("norm", "ln_", "layernorm")):
        return (1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise
    if name.endswith("bias"):
        return 0.1 * noise
    fan_in = shape[-1] if len(shape) > 1 else shape[0]
    return scale * noise / jnp.sqrt(fan_in)


def random_lm(
    architecture: str = "llama",
    *,
    symbols: str | int = 4,
    hidden_size: int = 16,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    context_length: int = 16,
    scale: float = 1.0,
    seed: int = 0,
) -> LanguageModel:
    """A tiny random transformer over ``<s> </s>`` plus ``symbols`` (or that many letters).

    Args:
      architecture: ``"llama"``, ``"gpt2"`` or ``"gpt_neo"`` (local attention window 2 on
        alternate layers, so the window is exercised at tiny lengths).
      scale: spread of the random weights (larger gives more peaked next-token laws).
    """
    if isinstance(symbols, int):
        symbols = "abcdefghijklmnopqrstuvwxyz"[:symbols]
    tokenizer = CharTokenizer(symbols)
    head_dim = hidden_size // num_heads
    config = ModelConfig(
        architecture=architecture,
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads if architecture == "llama" else num_heads,
        head_dim=head_dim,
        intermediate_size=2 * hidden_size,
        context_length=context_length,
        tie_word_embeddings=architecture != "llama",
        attention_bias=False,
        activation="silu" if architecture == "llama" else "gelu_new",
        attention_layers=tuple("global" if i % 2 == 0 else "local" for i in range(num_layers))
        if architecture == "gpt_neo"
        else (),
        window_size=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if architecture not in NETWORKS:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(NETWORKS)}")

    def source(name: str, shape: tuple[int, ...]) -> jax.Array:
        return _random_tensor(name, tuple(shape), seed, scale).astype(jnp.float32)

    network = NETWORKS[architecture](config, source)
    return LanguageModel(network, config, tokenizer, name=f"random-{architecture}")
