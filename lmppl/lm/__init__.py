"""Networks layer: decoder networks, KV caches, checkpoint readers and tokenizers."""

from lmppl.lm.base import (
    KVCache,
    LanguageModel,
    LMOutput,
    Tokenizer,
    broadcast_cache,
    reorder_cache,
)
from lmppl.lm.config import ModelConfig
from lmppl.lm.table import CharTokenizer, table_lm

__all__ = [
    "CharTokenizer",
    "KVCache",
    "LMOutput",
    "LanguageModel",
    "ModelConfig",
    "Tokenizer",
    "broadcast_cache",
    "reorder_cache",
    "table_lm",
]
