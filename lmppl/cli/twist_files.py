"""Loading twist files for the CLI and building the chosen inference backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lmppl.cli.errors import BACKENDS, UsageError

__all__ = ["load_task_twist", "make_backend", "twist_file"]


def twist_file(path_text: str) -> Path:
    """A twist file: the ``.npz`` itself, or ``DIR/twist.npz`` for a folder."""
    path = Path(path_text).expanduser()
    if path.is_dir():
        path = path / "twist.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no twist file at {path}")
    return path


def _twist_from_recipe_config(path: Path, task: Any):
    """A twist file without a record, beside the ``config.json`` of
    ``inference/learn_twists.py`` (``twist``: linear / mlp / transformer, ``hidden_size``,
    ``method``): rebuilt the way that recipe builds it."""
    from lmppl import twists

    config_path = path.parent / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    output = "log_sigmoid" if config.get("method") == "fudge" else "log"
    length = _condition_length(task)
    kind = config.get("twist")
    if kind == "linear":
        like = twists.LinearTwist(task.lm, output=output, condition_length=length)
    elif kind == "mlp":
        like = twists.MLPTwist(
            task.lm, config.get("hidden_size", 128), output=output, condition_length=length
        )
    elif kind == "transformer":
        like = twists.TransformerTwist(task.lm, output=output, conditional=length > 0)
    else:
        raise ValueError(f"{config_path}: unknown twist kind {kind!r}")
    return twists.load_twist(path, like), config


def load_task_twist(path_text: str, task: Any):
    """``(twist, info)`` rebuilt from a twist file for ``task``'s base model: a file of
    ``lmppl train-twist`` / ``lmppl.twists.save_twist`` (it records the twist's class and
    options), or a folder of ``inference/learn_twists.py`` (read with its config.json)."""
    from lmppl.twists import load_twist, read_twist_info

    path = twist_file(path_text)
    info = {**read_twist_info(path), "path": str(path)}
    if info["class"] is None:
        found = _twist_from_recipe_config(path, task)
        if found is not None:
            twist, config = found
            metadata = {"method": config.get("method"), "task": config.get("task")}
            info.update(metadata={k: v for k, v in metadata.items() if v})
            return twist, {**info, "class": type(twist).__name__}
    return load_twist(path, task.lm), info


def _twist_line(info: dict) -> str:
    metadata = info.get("metadata", {})
    trained = f", trained with {metadata['method']}" if "method" in metadata else ""
    on = f" on {metadata['task']}" if "task" in metadata else ""
    return f"twist: {info['path']} ({info['class']}{trained}{on}, step {info['step']})"


def make_backend(name: str, task: Any, twist: Any = None):
    """``(program, K) -> sampler`` of a backend name (``smc``, ``is``, ``twisted``)."""
    from lmppl import infer

    if name == "smc":
        return infer.SMC
    if name == "is":
        return infer.ImportanceSampling
    if name == "twisted":
        if twist is None:
            raise UsageError("the twisted backend needs --twist CHECKPOINT")
        return lambda program, k: infer.TwistedSMC(
            program, k, twists={task.site: twist}, twist_condition=task.twist_condition
        )
    raise UsageError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------- output


def _condition_length(task: Any) -> int:
    if task.twist_condition is None:
        return 0
    condition = np.asarray(task.twist_condition(*task.args, **task.kwargs))
    return int(condition.shape[-1]) if condition.ndim else 1
