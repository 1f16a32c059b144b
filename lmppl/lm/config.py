"""Architecture-independent configuration of a decoder-only language model.

Every checkpoint reader (Hugging Face folder, llama2.c ``.bin``, GGUF) produces a
:class:`ModelConfig` plus a dictionary of tensors named as in the Hugging Face
PyTorch implementation of the same architecture; the networks in ``lmppl.lm`` are
built from exactly that pair. This keeps each reader independent of the networks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES"]

Architecture = Literal["llama", "gpt2", "gpt_neo", "table"]
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "gpt2", "gpt_neo")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static hyper-parameters of a decoder network.

    Attributes:
      architecture: ``"llama"`` (also Mistral/Qwen2/SmolLM), ``"gpt2"``, ``"gpt_neo"``,
        or ``"table"`` (the tiny n-gram test model of :mod:`lmppl.lm.table`).
      vocab_size: number of token ids V.
      hidden_size: model width H.
      num_layers: number of transformer blocks.
      num_heads: number of query heads.
      num_kv_heads: number of key/value heads (grouped-query attention when < num_heads).
      head_dim: width of one head (usually hidden_size // num_heads).
      intermediate_size: width of the MLP's inner layer.
      context_length: the longest sequence the model accepts (positions 0..context_length-1).
      rope_theta: RoPE base frequency (llama).
      norm_eps: epsilon of RMSNorm / LayerNorm.
      tie_word_embeddings: the output projection is the token embedding.
      attention_bias: q/k/v projections carry biases (Qwen2-style llama).
      activation: MLP non-linearity (``"silu"`` for llama, ``"gelu_new"`` for GPT-2/Neo).
      attention_layers: GPT-Neo's per-layer attention kind, ``"global"`` or ``"local"``.
      window_size: GPT-Neo's local attention window.
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
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
