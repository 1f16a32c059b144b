"""Helpers shared by the benchmarks: models on the same weights, timing, tables.

Timings on a shared 2-core machine are noisy, so every benchmark measures its baseline in
the same run, interleaves the contenders (one repeat of each, then the next repeat) and
reports medians and ratios of medians. Compilation is excluded by a warm-up call.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

# Run as ``python benchmarks/x.py`` from anywhere: make the repository importable.
REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

import lmppl  # noqa: E402
from lmppl.lm.gguf_reader import read_gguf  # noqa: E402
from lmppl.lm.llama2c import read_llama2c  # noqa: E402
from lmppl.lm.registry import smollm2_gguf_file, stories260k_checkpoint  # noqa: E402

__all__ = [
    "PROMPT",
    "environment_line",
    "load_lm",
    "load_torch_llama",
    "markdown_table",
    "median",
    "say",
    "time_once",
]

PROMPT = "Once upon a time"

# Compiled programs are kept on disk (lmppl's persistent cache; LMPPL_COMPILATION_CACHE=0
# turns it off, as gpu.py and padded_bounds.py do because they time compilation). The other
# benchmarks time warmed-up calls only, so the cache changes none of their numbers.
lmppl.enable_compilation_cache()


def say(*parts: Any) -> None:
    """Print progress immediately (benchmarks run for minutes)."""
    print(*parts, flush=True)


def environment_line() -> str:
    """Date, machine and library versions, for the header of a results table."""
    import flax
    import torch
    import transformers

    return (
        f"{datetime.date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} CPU cores; "
        f"python {platform.python_version()}, jax {jax.__version__} "
        f"({jax.default_backend()}), flax {flax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def load_lm(name: str) -> lmppl.LanguageModel:
    """The lmppl model registered as ``name`` (``stories260k`` or ``smollm2-135m``)."""
    return lmppl.load(name)


def read_checkpoint(name: str) -> tuple[Any, dict]:
    """``(ModelConfig, {Hugging Face name: float32 array})`` of a registered model: the
    same tensors :func:`lmppl.load` builds its network from."""
    if name == "stories260k":
        return read_llama2c(stories260k_checkpoint())
    if name == "smollm2-135m":
        config, tensors, _ = read_gguf(smollm2_gguf_file())
        return config, tensors
    raise ValueError(f"no torch twin for {name!r}; use stories260k or smollm2-135m")


def load_torch_llama(name: str, num_threads: int = 2):
    """transformers' ``LlamaForCausalLM`` (float32, eval) on the weights lmppl loads."""
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(num_threads)
    config, tensors = read_checkpoint(name)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(hf_config).eval()
    state = {key: torch.from_numpy(np.array(value, np.float32)) for key, value in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not set(missing) <= {"lm_head.weight"}:
        raise RuntimeError(f"torch twin of {name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def time_once(function: Callable[[], Any]) -> float:
    """Wall-clock seconds of ``function()``, JAX results waited for."""
    start = time.perf_counter()
    jax.block_until_ready(function())
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    """The median (``nan`` for no values)."""
    return statistics.median(values) if values else float("nan")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
