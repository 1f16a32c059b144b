"""Architecture-independent configuration of a decoder-only language model.

Every checkpoint reader (Hugging Face folder, llama2.c ``.bin``, GGUF) produces a
:class:`ModelConfig` plus a dictionary of tensors named as in the Hugging Face
PyTorch implementation of the same architecture; the networks in ``lmppl.lm`` are
built from exactly that pair. This keeps each reader independent of the networks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = ["ModelConfig", "RopeScaling", "SUPPORTED_ARCHITECTURES", "SUPPORTED_ROPE_SCALING"]

Architecture = Literal["llama", "gemma", "gpt2", "gpt_neo", "table"]
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "gemma", "gpt2", "gpt_neo")
SUPPORTED_ROPE_SCALING: tuple[str, ...] = ("linear", "dynamic", "yarn", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How a checkpoint rescales its rotary frequencies (``rope_scaling`` / ``rope_parameters``).

    The inverse frequencies themselves are computed by :func:`lmppl.lm.rope.rope_frequencies`
    exactly as ``transformers``' ``modeling_rope_utils.py`` does.

    Attributes:
      kind: ``"linear"``, ``"dynamic"`` (NTK, equal to plain RoPE within the context length),
        ``"yarn"``, ``"llama3"`` (Llama 3.1 / 3.2), ``"longrope"`` (Phi-3 ``"su"``), or
        ``"rope_freqs"`` (a GGUF file's per-frequency divisors, llama.cpp's form of llama3).
      factor: the context extension factor (yarn and longrope: resolved from the context
        lengths when the checkpoint gives none).
      original_context_length: the pre-training context (``original_max_position_embeddings``).
      low_freq_factor, high_freq_factor: llama3's wavelength band limits.
      beta_fast, beta_slow: yarn's ramp bounds (in rotations).
      attention_factor: the cos/sin multiplier (yarn's mscale, longrope's); ``None``: derived.
      mscale, mscale_all_dim: yarn's (DeepSeek-style) attention-factor parameters.
      truncate: yarn rounds its correction range to whole dimensions.
      frequency_factors: per-frequency divisors of the inverse frequencies: longrope's
        ``short_factor`` (used within the original context) or GGUF's ``rope_freqs``.
    """

    kind: str
    factor: float = 1.0
    original_context_length: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    frequency_factors: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static hyper-parameters of a decoder network.

    Attributes:
      architecture: ``"llama"`` (also Mistral, Qwen2/3, Phi-3/4, SmolLM), ``"gemma"``
        (Gemma 2, Gemma 3 text), ``"gpt2"``, ``"gpt_neo"``, or ``"table"`` (the tiny n-gram
        test model of :mod:`lmppl.lm.table`).
      vocab_size: number of token ids V.
      hidden_size: model width H.
      num_layers: number of transformer blocks.
      num_heads: number of query heads.
      num_kv_heads: number of key/value heads (grouped-query attention when < num_heads).
      head_dim: width of one head (usually hidden_size // num_heads).
      intermediate_size: width of the MLP's inner layer.
      context_length: the longest sequence the model accepts (positions 0..context_length-1).
      rope_theta: RoPE base frequency (of the global layers when local ones differ).
      rope_scaling: how the RoPE frequencies are rescaled (``None``: plain RoPE).
      partial_rotary_factor: the fraction of each head's width that is rotated (Phi-4-mini).
      local_rope_theta: Gemma 3's RoPE base of its sliding-window layers (``None``: same).
      local_rope_scaling: RoPE scaling of the sliding-window layers when ``local_rope_theta``
        is set.
      norm_eps: epsilon of RMSNorm / LayerNorm.
      tie_word_embeddings: the output projection is the token embedding.
      attention_bias: q/k/v projections carry biases (Qwen2-style llama).
      activation: MLP non-linearity (``"silu"`` for llama, ``"gelu_new"`` for GPT-2/Neo).
      attention_layers: per-layer attention kind, ``"global"`` or ``"local"`` (sliding
        window); empty means every layer is global.
      window_size: width of the local layers' window: a query at position ``q`` sees keys
        at ``q - window_size < j <= q``.
      qk_norm: queries and keys get a per-head RMSNorm before RoPE (Qwen3, Gemma 3).
      fused_projections: q/k/v and gate/up are stored fused as ``qkv_proj`` and
        ``gate_up_proj`` (Phi-3).
      norm_weight_offset: RMSNorm multiplies by ``offset + w`` (1 for Gemma's ``1 + w``).
      embedding_multiplier: token embeddings are multiplied by this (Gemma: ``sqrt(H)``).
      feedforward_norms: Gemma 2/3's extra norms on the attention output and around the MLP.
      query_scale: attention score multiplier (``None``: ``1/sqrt(head_dim)``; Gemma:
        ``query_pre_attn_scalar^-1/2``).
      attention_softcap: attention scores ``s`` become ``c tanh(s / c)`` (Gemma 2).
      final_logit_softcap: logits ``l`` become ``c tanh(l / c)`` (Gemma 2).
      bos_token_id: beginning-of-sequence id, if the model has one.
      eos_token_id: end-of-sequence id, if the model has one.
    """

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    context_length: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    activation: str = "silu"
    attention_layers: tuple[str, ...] = ()
    window_size: int = 256
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    local_rope_theta: float | None = None
    local_rope_scaling: RopeScaling | None = None
    qk_norm: bool = False
    fused_projections: bool = False
    norm_weight_offset: float = 0.0
    embedding_multiplier: float = 1.0
    feedforward_norms: bool = False
    query_scale: float | None = None
    attention_softcap: float | None = None
    final_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def is_local_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` attends through a sliding window."""
        return bool(self.attention_layers) and self.attention_layers[layer] == "local"

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
