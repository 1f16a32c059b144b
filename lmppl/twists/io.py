"""Twist files that rebuild themselves: the parameters plus the twist's class and options.

:func:`save_twist` writes one ``.npz`` in the format of :mod:`lmppl.training.checkpoint`
(``params/leaf_*`` arrays, ``__meta__`` with the step and the training history, so
:func:`~lmppl.training.checkpoint.load_checkpoint` still reads it) plus ``__twist__``: a JSON
record of the twist's class, the constructor options that fix its shapes, the base
model's name and sizes, and free-form metadata (the task, the site, the loss)::

    {"class": "MLPTwist", "options": {"hidden_size": 64, "num_layers": 3, "output": "log",
     "condition_length": 0, "condition_size": 16},
     "model": {"name": "stories260k", "vocab_size": 512, "hidden_size": 64},
     "metadata": {"task": "toxicity_classifier", "site": "story", "method": "ctl"}}

:func:`load_twist` rebuilds the twist from that record for a given base LM
(``load_twist(path, lm)``), or pours the parameters into a twist you built yourself
(``load_twist(path, twist)``, as before; this also reads files without a record, e.g.
the ``step_*.npz`` checkpoints of :func:`lmppl.twists.fit`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmppl.lm.base import LanguageModel
from lmppl.training.checkpoint import flatten_leaves, load_checkpoint
from lmppl.twists.heads import LinearTwist, MLPTwist
from lmppl.twists.tabular import TabularTwist
from lmppl.twists.transformer import TransformerTwist

__all__ = ["build_twist", "load_twist", "read_twist_info", "save_twist", "twist_spec"]

#: Twist classes that :func:`twist_spec` can record and :func:`build_twist` rebuild.
TWIST_CLASSES = {
    cls.__name__: cls for cls in (LinearTwist, MLPTwist, TransformerTwist, TabularTwist)
}


def _condition_options(twist: Any) -> dict[str, int]:
    length = int(getattr(twist, "condition_length", 0))
    size = int(twist.params["condition"].shape[1]) if length else 16
    return {"condition_length": length, "condition_size": size}


def twist_spec(twist: Any) -> dict[str, Any]:
    """``{"class": name, "options": {...}}``: what :func:`build_twist` needs to rebuild
    a twist of the same shapes (the values of the parameters are not part of it)."""
    name = type(twist).__name__
    if isinstance(twist, MLPTwist):
        layers = twist.params["layers"]
        options = {
            "hidden_size": int(layers[0]["weight"].shape[1]),
            "num_layers": len(layers),
            "output": twist.output,
            **_condition_options(twist),
        }
    elif isinstance(twist, LinearTwist):
        options = {"output": twist.output, **_condition_options(twist)}
    elif isinstance(twist, TransformerTwist):
        options = {"output": twist.output, "conditional": bool(twist.conditional)}
    elif isinstance(twist, TabularTwist):
        options = {
            "vocab_size": int(twist.vocab_size),
            "max_new_tokens": int(twist.max_new_tokens),
            "output": twist.output,
        }
    else:
        raise TypeError(
            f"cannot record a twist of class {name} (known: {', '.join(TWIST_CLASSES)}); "
            "save its parameters with lmppl.twists.save_checkpoint instead"
        )
    return {"class": name, "options": options}


def build_twist(spec: dict[str, Any], lm: LanguageModel | None = None) -> Any:
    """A fresh twist (initial parameters) of the class and options recorded in ``spec``.

    ``lm`` is the base model (every class but :class:`TabularTwist` needs it).
    """
    name = spec.get("class")
    if name not in TWIST_CLASSES:
        raise ValueError(f"unknown twist class {name!r}; known: {', '.join(TWIST_CLASSES)}")
    options = dict(spec.get("options", {}))
    if name == "TabularTwist":
        return TabularTwist(**options)
    if lm is None:
        raise ValueError(f"rebuilding a {name} needs its base language model")
    if name == "MLPTwist":
        return MLPTwist(lm, options.pop("hidden_size"), **options)
    return TWIST_CLASSES[name](lm, **options)


def _model_record(twist: Any) -> dict[str, Any] | None:
    lm = getattr(twist, "lm", None)
    if isinstance(lm, LanguageModel):
        return {"name": lm.name, "vocab_size": lm.vocab_size, "hidden_size": lm.hidden_size}
    return None


def save_twist(
    path: str | os.PathLike,
    twist: Any,
    *,
    lm: LanguageModel | None = None,
    step: int = 0,
    history: dict | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``twist``'s parameters and its rebuild record to ``path`` (atomically).

    Args:
      path: the ``.npz`` file to write (its folder is created).
      twist: a :class:`LinearTwist`, :class:`MLPTwist`, :class:`TransformerTwist` or
        :class:`TabularTwist` (another class is saved without a record: load it with
        ``load_twist(path, twist_like)``).
      lm: the base model the twist reads (recorded by name and sizes, checked on load).
      step, history: the training step and metrics history (as ``fit`` returns it).
      metadata: JSON-serialisable extras (e.g. ``{"task": ..., "site": ..., "method": ...}``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"params/{k}": v for k, v in flatten_leaves(twist.params).items()}
    meta = json.dumps({"step": int(step), "history": history or {}})
    try:
        record = twist_spec(twist)
    except TypeError:
        record = None
    if record is not None:
        model = (
            {"name": lm.name, "vocab_size": lm.vocab_size, "hidden_size": lm.hidden_size}
            if lm is not None
            else _model_record(twist)
        )
        record.update(model=model, metadata=dict(metadata or {}))
        arrays["__twist__"] = np.asarray(json.dumps(record))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, __meta__=np.asarray(meta), **arrays)
    os.replace(tmp, path)
    return path


def read_twist_info(path: str | os.PathLike) -> dict[str, Any]:
    """The record of a twist file: ``class``, ``options``, ``model``, ``metadata``, plus
    ``step`` and ``history`` (``class`` is None for files written without a record)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no twist file at {path}")
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"])) if "__meta__" in data.files else {}
            record = json.loads(str(data["__twist__"])) if "__twist__" in data.files else {}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a twist file: {error}") from None
    return {
        "class": record.get("class"),
        "options": record.get("options", {}),
        "model": record.get("model"),
        "metadata": record.get("metadata", {}),
        "step": int(meta.get("step", 0)),
        "history": meta.get("history", {}),
    }


def load_twist(path: str | os.PathLike, like: Any = None) -> Any:
    """The twist saved at ``path``.

    Args:
      path: a file written by :func:`save_twist` (or any twist checkpoint, when ``like``
        is a twist).
      like: the base :class:`~lmppl.lm.base.LanguageModel` to rebuild the recorded twist
        for (None for a :class:`TabularTwist`), or a twist of the same structure to copy
        the parameters into.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: the file has no record (and ``like`` is not a twist), the model's sizes
        differ from the recorded ones, or the parameters' shapes do not match.
    """
    path = Path(path)
    if like is not None and not isinstance(like, LanguageModel):
        if not (hasattr(like, "params") and hasattr(like, "with_params")):
            raise TypeError(
                f"load_twist needs a LanguageModel or a twist to load into, got {type(like).__name__}"
            )
        params, _, _, _ = load_checkpoint(path, like.params)
        return like.with_params(params)
    info = read_twist_info(path)
    if info["class"] is None:
        raise ValueError(
            f"{path} records no twist class (a training checkpoint?); load it into a twist "
            "you build: load_twist(path, lmppl.twists.MLPTwist(lm, ...))"
        )
    model = info["model"]
    if like is not None and model is not None:
        recorded = (model["vocab_size"], model["hidden_size"])
        if recorded != (like.vocab_size, like.hidden_size):
            raise ValueError(
                f"{path}: the twist was trained on {model['name']} (vocab {recorded[0]}, hidden "
                f"{recorded[1]}), not on {like.name} (vocab {like.vocab_size}, hidden "
                f"{like.hidden_size})"
            )
    twist = build_twist(info, like)
    params, _, _, _ = load_checkpoint(path, twist.params)
    return twist.with_params(params)
