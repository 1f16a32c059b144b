"""The host loop shared by twist training (``fit``) and TNT fine-tuning (``lmppl.tnt.train``).

Around a jitted ``step(k, params, opt_state) -> (params, opt_state, metrics)`` it keeps the
history, resumes from the latest ``step_XXXXXXX.npz`` checkpoint, writes checkpoints every
``checkpoint_every`` steps and at the end, shows a tqdm bar, and stops with
:class:`TrainingDiverged` (after checkpointing the last good parameters) when
``diverged(k, metrics)`` returns a message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from lmppl.twists.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["TrainingDiverged", "checkpoint_path", "run_training"]


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient became NaN (the message names the step)."""


def checkpoint_path(directory: Any, step: int) -> Path:
    """``<directory>/step_<step:07d>.npz``."""
    return Path(directory) / f"step_{step:07d}.npz"


def run_training(
    step: Callable[[int, Any, Any], tuple[Any, Any, dict]],
    params: Any,
    opt_state: Any,
    *,
    num_steps: int,
    metric_names: Sequence[str],
    diverged: Callable[[int, dict[str, float]], str | None],
    postfix: Callable[[dict[str, float]], dict[str, str]],
    description: str,
    checkpoint_dir: Any = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = True,
) -> tuple[Any, dict[str, list[float]]]:
    """Run steps ``start .. num_steps − 1`` and return ``(params, history)``.

    ``history`` has ``"step"``, every name of ``metric_names`` and ``"seconds"``.
    """
    history: dict[str, list[float]] = {name: [] for name in ("step", *metric_names, "seconds")}
    start = 0
    if checkpoint_dir is not None and resume:
        found = latest_checkpoint(checkpoint_dir)
        if found is not None:
            params, loaded_state, start, history = load_checkpoint(found, params, opt_state)
            opt_state = loaded_state if loaded_state is not None else opt_state

    def checkpoint(k, params, opt_state):
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_path(checkpoint_dir, k), params, opt_state, k, history)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, desc=description, leave=False)
    began = time.perf_counter()
    try:
        for k in range(start, num_steps):
            new_params, new_opt_state, metrics = step(k, params, opt_state)
            metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
            message = diverged(k, metrics)
            if message is not None:
                checkpoint(k, params, opt_state)
                raise TrainingDiverged(message)
            params, opt_state = new_params, new_opt_state
            history["step"].append(k + 1)
            for name in metric_names:
                history[name].append(metrics[name])
            history["seconds"].append(time.perf_counter() - began)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(**postfix(metrics))
            if checkpoint_every and (k + 1) % checkpoint_every == 0 and k + 1 < num_steps:
                checkpoint(k + 1, params, opt_state)
    finally:
        if bar is not None:
            bar.close()
    if num_steps > start:
        checkpoint(num_steps, params, opt_state)
    return params, history
