"""Shared pieces of the task programs: resolving the base model and the text scorer."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lmppl

__all__ = ["resolve_classifier", "resolve_model"]


@functools.lru_cache(maxsize=8)
def _load(name: str):
    return lmppl.load(name)


def resolve_model(model: Any):
    """A loaded model from a name/path (``lmppl.load``, cached) or a loaded model itself.

    Offline names: ``"stories260k"``, ``"smollm2-135m"``; with the hub, the paper's
    ``"roneneldan/TinyStories-33M"`` and ``"gpt2-medium"``; or any local HF folder/GGUF.
    """
    if isinstance(model, str):
        return _load(model)
    if hasattr(model, "apply") and hasattr(model, "init_cache"):
        return model
    raise TypeError(f"model must be a name, a path or a loaded model, got {type(model).__name__}")


def resolve_classifier(classifier: Any, default: Callable[[], Callable]) -> Callable:
    """A ``texts -> [n, C]`` probability function.

    ``None`` builds the offline default; a string is a Hugging Face classifier (hub id or
    folder) run by transformers' PyTorch on the host; a callable is used as given.
    """
    if classifier is None:
        return default()
    if isinstance(classifier, str):
        return lmppl.scorers.hf_text_classifier(classifier)
    if callable(classifier):
        return classifier
    raise TypeError(
        f"classifier must be None, a Hugging Face name/folder or a callable, got {classifier!r}"
    )
