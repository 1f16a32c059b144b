"""Networks layer: decoder networks (and T5's encoder-decoder), KV caches, checkpoint readers
and tokenizers."""

from lmppl.lm.base import (
    KVCache,
    LanguageModel,
    LMOutput,
    Tokenizer,
    broadcast_cache,
    reorder_cache,
)
from lmppl.lm.build import SUPPORTED_MODEL_TYPES, build_network, config_from_hf
from lmppl.lm.config import ModelConfig, RopeScaling
from lmppl.lm.gemma import GemmaNetwork
from lmppl.lm.gguf_reader import read_gguf
from lmppl.lm.gpt2 import GPT2Network
from lmppl.lm.gpt_neo import GPTNeoNetwork
from lmppl.lm.hf import HFTokenizer, load_hf
from lmppl.lm.llama import LlamaNetwork
from lmppl.lm.llama2c import read_llama2c
from lmppl.lm.random_init import FAMILIES, random_lm
from lmppl.lm.registry import KNOWN_MODELS, load, load_gguf, load_llama2c
from lmppl.lm.rope import rope_frequencies
from lmppl.lm.sharding import SHARDABLE_ARCHITECTURES, ModelSharding, shard
from lmppl.lm.t5 import T5LanguageModel
from lmppl.lm.table import CharTokenizer, table_lm
from lmppl.lm.tokenizers import (
    ByteLevelBPETokenizer,
    Llama2cTokenizer,
    load_llama2c_tokenizer,
    tokenizer_from_gguf_metadata,
)
from lmppl.lm.truncate import scanned, truncated

__all__ = [
    "FAMILIES",
    "KNOWN_MODELS",
    "SHARDABLE_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "ByteLevelBPETokenizer",
    "CharTokenizer",
    "GPT2Network",
    "GemmaNetwork",
    "GPTNeoNetwork",
    "HFTokenizer",
    "KVCache",
    "LMOutput",
    "LanguageModel",
    "LlamaNetwork",
    "Llama2cTokenizer",
    "ModelConfig",
    "ModelSharding",
    "RopeScaling",
    "T5LanguageModel",
    "Tokenizer",
    "broadcast_cache",
    "build_network",
    "config_from_hf",
    "load",
    "load_gguf",
    "load_hf",
    "load_llama2c",
    "load_llama2c_tokenizer",
    "read_gguf",
    "random_lm",
    "read_llama2c",
    "reorder_cache",
    "rope_frequencies",
    "scanned",
    "shard",
    "table_lm",
    "truncated",
    "tokenizer_from_gguf_metadata",
]
