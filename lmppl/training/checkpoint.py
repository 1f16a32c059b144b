"""Save and load twist parameters (and optimiser state) as plain ``.npz`` files.

A checkpoint holds the leaves of a pytree in flattening order (``leaf_0000`` …), the
training step and the metrics history (JSON). Loading needs a pytree of the same
structure to pour the leaves into (the twist's own ``params``, the optimiser's fresh
state): structures and shapes are checked, so a checkpoint of another twist fails
with a one-line error instead of loading silently.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = [
    "flatten_leaves",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "step_checkpoints",
]


def flatten_leaves(tree: Any) -> dict[str, np.ndarray]:
    return {f"leaf_{i:04d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def _unflatten(like: Any, stored: dict[str, np.ndarray], prefix: str, path: Path) -> Any:
    leaves, treedef = jax.tree.flatten(like)
    names = sorted(k[len(prefix) :] for k in stored if k.startswith(prefix))
    if len(names) != len(leaves):
        raise ValueError(
            f"{path}: holds {len(names)} {prefix.rstrip('/')} arrays, the twist has {len(leaves)}"
        )
    loaded = []
    for name, leaf in zip(names, leaves, strict=True):
        value = stored[prefix + name]
        if value.shape != np.shape(leaf):
            raise ValueError(
                f"{path}: {prefix}{name} has shape {value.shape}, expected {np.shape(leaf)}"
            )
        loaded.append(jax.numpy.asarray(value, dtype=np.asarray(leaf).dtype))
    return jax.tree.unflatten(treedef, loaded)


def save_checkpoint(
    path: str | os.PathLike,
    params: Any,
    opt_state: Any = None,
    step: int = 0,
    history: dict | None = None,
) -> Path:
    """Write ``params`` (and ``opt_state``, ``step``, ``history``) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {f"params/{k}": v for k, v in flatten_leaves(params).items()}
    if opt_state is not None:
        arrays.update({f"opt_state/{k}": v for k, v in flatten_leaves(opt_state).items()})
    arrays["__meta__"] = np.asarray(json.dumps({"step": int(step), "history": history or {}}))
    # Written beside the target under a name no checkpoint pattern matches, flushed to
    # disk, then renamed: a write killed midway leaves the previous checkpoints intact.
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(
    path: str | os.PathLike, params_like: Any, opt_state_like: Any = None
) -> tuple[Any, Any, int, dict]:
    """``(params, opt_state, step, history)`` from ``path``, shaped like the given pytrees."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no twist checkpoint at {path}")
    # The file is opened here so that it is closed even when NumPy fails to parse it
    # (a truncated or corrupted checkpoint).
    with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
        stored = {k: data[k] for k in data.files}
    meta = json.loads(str(stored.pop("__meta__")))
    params = _unflatten(params_like, stored, "params/", path)
    opt_state = None
    if opt_state_like is not None and any(k.startswith("opt_state/") for k in stored):
        opt_state = _unflatten(opt_state_like, stored, "opt_state/", path)
    return params, opt_state, int(meta["step"]), meta["history"]


_STEP_NAME = re.compile(r"^step_(\d+)\.npz$")


def step_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoints ``step_<digits>.npz`` in ``directory``, highest step first (names
    are matched exactly: temporary and other files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_NAME.match(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint ``step_<digits>.npz`` with the highest step in ``directory`` (None if none)."""
    found = step_checkpoints(directory)
    return found[0] if found else None
