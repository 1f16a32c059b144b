"""Load a Hugging Face checkpoint (local folder or cached hub id) as a :class:`LanguageModel`.

A folder holds ``config.json``, the weights as ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, and usually a tokenizer (``tokenizer.json`` ...). The
config goes through :func:`~lmppl.lm.build.config_from_hf`, the tensors (named as in the
PyTorch state dict) through :func:`~lmppl.lm.build.build_network`, and the tokenizer is
wrapped by :class:`HFTokenizer` into the :class:`~lmppl.lm.base.Tokenizer` protocol.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from lmppl.lm.base import LanguageModel
from lmppl.lm.build import build_network, config_from_hf, language_model_tensors
from lmppl.lm.t5 import is_t5_config, t5_language_model
from lmppl.lm.tokenizers import render_chat_template

__all__ = ["HFTokenizer", "load_hf", "read_safetensors", "resolve_checkpoint_folder"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
)
# What a snapshot needs: configs and tokenizer files, safetensors weights (no *.bin, *.gguf).
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


class HFTokenizer:
    """A ``transformers`` tokenizer behind the :class:`~lmppl.lm.base.Tokenizer` protocol.

    ``encode(text, add_bos=True)`` follows the tokenizer's own convention for special tokens
    (``add_special_tokens=True``: Llama-style tokenizers prepend BOS, GPT-2's adds nothing);
    ``add_bos=False`` encodes the bare text. ``vocab_size`` counts added tokens too.
    """

    def __init__(self, tokenizer: Any, name: str = "this tokenizer"):
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> HFTokenizer:
        """Load with ``transformers.AutoTokenizer`` from a local folder (no network)."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as error:  # transformers raises many kinds, often over many lines
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(
                f"{folder}: transformers cannot load this tokenizer "
                f"({type(error).__name__}: {reason[:200]})"
            ) from None
        return cls(tokenizer, name=str(folder))

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        """The checkpoint's chat template (``tokenizer_config.json``'s ``chat_template`` or
        ``chat_template.jinja``), or ``None``."""
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` (``[{"role": "user", "content": "..."}, ...]``) with the
        checkpoint's chat template, by ``transformers``' own ``apply_chat_template``.

        Args:
          messages: one conversation.
          add_generation_prompt: end with the header of an assistant turn (what an
            instruction model should continue).
          tokenize: return token ids (``list[int]``, special tokens as the template writes
            them and nothing added: ready as ``lmppl.LM(lm, prompt=ids, ...)``); ``False``
            returns the text (encode it with ``encode(text, add_bos=False)``: the template
            already wrote any BOS).
          **kwargs: passed on (``chat_template=...`` to use another template, template
            variables such as ``enable_thinking=False``).

        Raises:
          ValueError: the checkpoint has no chat template (one line).
        """
        return render_chat_template(
            self.tokenizer, self.name, messages, add_generation_prompt, tokenize, kwargs
        )

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_bos))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.tokenizer).__name__}, vocab_size={self.vocab_size})"


def resolve_checkpoint_folder(path_or_id: str) -> Path:
    """The local folder of ``path_or_id``: the folder itself, or a hub snapshot.

    A hub id is looked up in the local Hugging Face cache first, then downloaded (unless
    ``HF_HUB_OFFLINE`` is set). Raises a one-line ``FileNotFoundError`` when neither works.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path_or_id!r} is a file, not a Hugging Face checkpoint folder")
    looks_like_path = path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(f"no such checkpoint folder: {path_or_id!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise FileNotFoundError(
            f"{path_or_id!r} is not a local folder and huggingface_hub is not installed"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    attempts = (True,) if offline else (True, False)
    reason = ""
    for local_files_only in attempts:
        try:
            return Path(
                snapshot_download(
                    path_or_id, local_files_only=local_files_only, allow_patterns=SNAPSHOT_PATTERNS
                )
            )
        except Exception as error:  # the hub client raises many kinds; all mean "not here"
            reason = f"{type(error).__name__}"
    raise FileNotFoundError(
        f"{path_or_id!r} is not a local folder, and the Hugging Face hub is unreachable or "
        f"does not have it cached ({reason})"
    )


def read_safetensors(folder: Path) -> dict[str, Any]:
    """All tensors of the folder's ``model.safetensors`` or its sharded index, by name.

    Tensors are read as JAX arrays in their stored dtype (bfloat16 included).
    """
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {', '.join(other)}; only safetensors are read)" if other else ""
        raise FileNotFoundError(f"no *.safetensors weights in {str(folder)!r}{hint}")
    tensors: dict[str, Any] = {}
    for name in files:
        shard = folder / name
        if not shard.is_file():
            raise FileNotFoundError(
                f"safetensors shard {str(shard)!r} listed in the index is missing"
            )
        with safe_open(str(shard), framework="flax") as reader:
            for key in reader.keys():
                tensors[key] = reader.get_tensor(key)
    return tensors


def load_hf(path_or_id: str, dtype: Any = None) -> LanguageModel:
    """A :class:`LanguageModel` from a Hugging Face checkpoint folder or hub id.

    Args:
      path_or_id: a local folder (``config.json`` + safetensors) or a hub id such as
        ``"HuggingFaceTB/SmolLM2-135M"`` (used from the local cache when offline).
      dtype: parameter dtype; ``None`` means float32. ``jnp.bfloat16`` keeps a bfloat16
        checkpoint's weights as stored (and casts float32 ones); the KV cache follows the
        parameters, while attention scores, softmax and logits stay float32.

    Raises:
      FileNotFoundError: no such folder / uncached hub id / no safetensors weights.
      ValueError: unsupported model type or feature (quantized weights, ...), missing
        tensor, a shape mismatch, or a tokenizer with more tokens than the model.
    """
    folder = resolve_checkpoint_folder(path_or_id)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {str(folder)!r}")
    config_dict = json.loads(config_path.read_text())
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    if is_t5_config(config_dict):
        tokenizer = HFTokenizer.from_folder(folder) if has_tokenizer else None
        tensors = read_safetensors(folder)
        return t5_language_model(
            config_dict, tensors, tokenizer, dtype or jnp.float32, str(path_or_id)
        )
    config = config_from_hf(config_dict)
    tokenizer = HFTokenizer.from_folder(folder) if has_tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        # Configs may pad the vocabulary beyond the tokenizer (Qwen), never the reverse:
        # ids past the embedding table would be clipped silently.
        raise ValueError(
            f"{path_or_id}: tokenizer of {tokenizer.vocab_size} tokens for a model of "
            f"{config.vocab_size}"
        )
    tensors = language_model_tensors(read_safetensors(folder))
    network = build_network(config, tensors, dtype or jnp.float32)
    return LanguageModel(network, config, tokenizer, name=str(path_or_id))
