"""The host loop shared by twist training (``fit``) and TNT fine-tuning (``lmppl.tnt.train``).

Around a jitted ``step(k, params, opt_state) -> (params, opt_state, metrics)`` it keeps the
history, resumes from the latest ``step_XXXXXXX.npz`` checkpoint, writes checkpoints every
``checkpoint_every`` steps and at the end, shows a tqdm bar, and stops with
:class:`TrainingDiverged` (after checkpointing the last good parameters) when
``diverged(k, metrics)`` returns a message.

With ``evaluate(step, params) -> {name: value}`` and ``eval_every``, the loop also
evaluates the parameters every ``eval_every`` steps and after the last one, records the
values in the history (NaN at the other steps, so every column has one entry per step)
and keeps the best evaluated parameters: the smallest ``score`` (see :func:`run_training`)
in memory and, with a ``checkpoint_dir``, as ``best.npz``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax

from lmppl.training.checkpoint import load_checkpoint, save_checkpoint, step_checkpoints

__all__ = ["Best", "TrainingDiverged", "checkpoint_path", "run_training"]


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient became NaN (the message names the step)."""


class Best(NamedTuple):
    """The best evaluated parameters: after ``step`` steps, with their evaluation."""

    step: int
    params: Any
    evaluation: dict[str, float]


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
    evaluate: Callable[[int, Any], dict[str, float]] | None = None,
    eval_every: int | None = None,
    eval_names: Sequence[str] = (),
    score: Callable[[dict[str, float]], float] | None = None,
) -> tuple[Any, dict[str, list[float]], Best | None]:
    """Run steps ``start .. num_steps − 1`` and return ``(params, history, best)``.

    ``history`` has ``"step"``, every name of ``metric_names``, ``"seconds"`` and, with
    ``evaluate``, every name of ``eval_names`` (NaN where not evaluated). ``best`` is the
    evaluated parameters with the smallest finite ``score(evaluation)`` (None without
    ``evaluate``, or when no score was finite); ``postfix`` sees the latest evaluation
    merged into the step's metrics.
    """
    names = ("step", *metric_names, "seconds", *(eval_names if evaluate else ()))
    history: dict[str, list[float]] = {name: [] for name in names}
    start = 0
    if checkpoint_dir is not None and resume:
        for found in step_checkpoints(checkpoint_dir):
            try:
                loaded = load_checkpoint(found, params, opt_state)
            except (OSError, EOFError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as error:
                warnings.warn(
                    f"skipping unreadable checkpoint {found} ({type(error).__name__}: {error}); "
                    "resuming from an earlier one",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            params, loaded_state, start, stored = loaded
            opt_state = loaded_state if loaded_state is not None else opt_state
            done = len(stored.get("step", []))
            history = {n: list(stored.get(n, [math.nan] * done)) for n in names}
            break

    def checkpoint(k, params, opt_state):
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_path(checkpoint_dir, k), params, opt_state, k, history)

    best: Best | None = None
    latest: dict[str, float] = {}

    def evaluate_now(k: int, params: Any) -> None:
        nonlocal best, latest
        if evaluate is None:
            return
        due = k == num_steps or bool(eval_every and k % eval_every == 0)
        values = evaluate(k, params) if due else {}
        for name in eval_names:
            history[name].append(float(values.get(name, math.nan)))
        if not values or score is None:
            latest = values or latest
            return
        latest = values
        value = score(values)
        if math.isfinite(value) and (best is None or value < score(best.evaluation)):
            best = Best(k, params, dict(values))
            if checkpoint_dir is not None:
                save_checkpoint(Path(checkpoint_dir) / "best.npz", params, None, k, history)

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
            evaluate_now(k + 1, params)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(**postfix({**metrics, **latest}))
            if checkpoint_every and (k + 1) % checkpoint_every == 0 and k + 1 < num_steps:
                checkpoint(k + 1, params, opt_state)
    finally:
        if bar is not None:
            bar.close()
    if num_steps > start:
        checkpoint(num_steps, params, opt_state)
    return params, history, best
