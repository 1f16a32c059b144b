"""A language model with other parameters, and TNT parameters on disk.

A TNT-updated model is the old :class:`~lmppl.lm.LanguageModel` (same network graph,
config and tokenizer) with new parameters. ``save_params`` writes them as a plain
``.npz`` (the checkpoint format of :mod:`lmppl.training.checkpoint`: leaves in flattening
order); ``load_params(path, lm)`` pours them back into a copy of ``lm``:

    lm = lmppl.load("stories260k")
    lm_new = lmppl.tnt.load_params("inference/results/tnt_stories260k_tnff.npz", lm)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmppl.lm.base import LanguageModel
from lmppl.training.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["load_params", "save_params", "with_params"]


def with_params(lm: LanguageModel, params: Any, name: str | None = None) -> LanguageModel:
    """A copy of ``lm`` (graph, config, tokenizer shared) carrying ``params``."""
    other = object.__new__(type(lm))
    other.__dict__.update(lm.__dict__)
    other.params = params
    if name is not None:
        other.name = name
    return other


def save_params(path: str | os.PathLike, lm: LanguageModel) -> Path:
    """Write ``lm.params`` to ``path`` (``.npz``)."""
    return save_checkpoint(path, lm.params)


def load_params(
    path: str | os.PathLike, lm: LanguageModel, name: str | None = None
) -> LanguageModel:
    """A copy of ``lm`` with the parameters saved at ``path`` (shapes are checked)."""
    params, _, _, _ = load_checkpoint(path, lm.params)
    return with_params(lm, params, name or f"{lm.name}+{Path(path).stem}")
