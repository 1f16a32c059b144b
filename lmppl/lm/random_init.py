"""Random-initialised tiny transformers for tests and examples (no checkpoint needed).

``random_lm("llama", vocab_size=6)`` builds a real Llama / GPT-2 / GPT-Neo network (or a
Qwen3, Phi-3, Gemma 2 or Gemma 3 one: ``random_lm("gemma2")``, or a Flan-T5-style
encoder-decoder: ``random_lm("t5")``, a :class:`~lmppl.lm.t5.T5LanguageModel` to condition
with ``lmppl.LM(lm, source=..., ...)``) of the requested size with random weights, wrapped
as a :class:`LanguageModel` with a character tokenizer. With a vocabulary of 4–8 symbols and a few new tokens every
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
from lmppl.lm.t5 import T5Config, T5LanguageModel, T5Network
from lmppl.lm.table import CharTokenizer

__all__ = ["FAMILIES", "random_lm"]

# The switches that make a tiny Llama or Gemma config one of the newer families.
FAMILIES: tuple[str, ...] = ("qwen3", "phi3", "gemma2", "gemma3")


def _family_config(family: str, config: ModelConfig) -> ModelConfig:
    """``config`` (a tiny llama) turned into ``family``: Qwen3's q/k norms; Phi-3's fused
    projections and half-rotary heads; Gemma's norms, embedding scale, alternating sliding
    windows of 2, and Gemma 2's soft-capping (constants small enough to bend) or Gemma 3's
    q/k norms and local RoPE base."""
    if family == "qwen3":
        return config.replace(qk_norm=True)
    if family == "phi3":
        return config.replace(fused_projections=True, partial_rotary_factor=0.5)
    gemma = config.replace(
        architecture="gemma",
        tie_word_embeddings=True,
        activation="gelu_pytorch_tanh",
        attention_layers=tuple(
            "local" if i % 2 == 0 else "global" for i in range(config.num_layers)
        ),
        norm_weight_offset=1.0,
        embedding_multiplier=config.hidden_size**0.5,
        feedforward_norms=True,
        query_scale=(2 * config.head_dim) ** -0.5,
    )
    if family == "gemma2":
        return gemma.replace(attention_softcap=5.0, final_logit_softcap=10.0)
    return gemma.replace(qk_norm=True, rope_theta=1_000_000.0, local_rope_theta=10_000.0)


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
      architecture: ``"llama"``, ``"gpt2"``, ``"gpt_neo"`` (local attention window 2 on
        alternate layers, so the window is exercised at tiny lengths), a family of
        :data:`FAMILIES`: ``"qwen3"``, ``"phi3"`` (llama networks with their switches),
        ``"gemma2"``, ``"gemma3"`` (gemma networks, window 2 on alternate layers), or
        ``"t5"``: a Flan-T5-style encoder-decoder (gated GELU, untied output; ``num_layers``
        encoder and decoder layers, 8 relative-position buckets up to distance 8, decoder
        start token ``<s>`` = 0, EOS ``</s>`` = 1; ``context_length`` is ``n_positions``).
      scale: spread of the random weights (larger gives more peaked next-token laws).
    """
    if isinstance(symbols, int):
        symbols = "abcdefghijklmnopqrstuvwxyz"[:symbols]
    tokenizer = CharTokenizer(symbols)
    head_dim = hidden_size // num_heads

    def source(name: str, shape: tuple[int, ...]) -> jax.Array:
        return _random_tensor(name, tuple(shape), seed, scale).astype(jnp.float32)

    if architecture == "t5":
        t5_config = T5Config(
            vocab_size=tokenizer.vocab_size,
            hidden_size=hidden_size,
            head_dim=head_dim,
            num_heads=num_heads,
            intermediate_size=2 * hidden_size,
            encoder_layers=num_layers,
            decoder_layers=num_layers,
            num_buckets=8,
            max_distance=8,
            activation="gelu_new",
            gated=True,
            scale_decoder_outputs=False,
            decoder_start_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            context_length=context_length,
        )
        return T5LanguageModel(T5Network(t5_config, source), t5_config, tokenizer, "random-t5")
    family = architecture if architecture in FAMILIES else None
    if family is not None:
        architecture = "llama"
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
        choices = sorted([*NETWORKS, *FAMILIES, "t5"])
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {choices}")
    if family is not None:
        config = _family_config(family, config)

    network = NETWORKS[config.architecture](config, source)
    return LanguageModel(network, config, tokenizer, name=f"random-{family or architecture}")
