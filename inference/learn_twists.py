"""Learn twists for a task of ``models/`` with CTL, RL, SIXO, FUDGE or DPG (Zhao et al. 2024).

For each method the script trains a twist (a linear or MLP head on the frozen base LM, or a
trainable copy of its body) with ``lmppl.twists.fit`` and writes, under
``<out>/<task name>/<method>_<twist>/`` (e.g. ``infilling_T15_c10/ctl_linear``):

* ``twist.npz`` — the trained parameters (``lmppl.twists.load_twist``; rebuild the twist
  with :func:`load_learned_twist`, which reads ``config.json``);
* ``config.json`` — the task, twist and training options;
* ``history.json`` / ``history.csv`` — loss, ESS of the SIS batch (fraction of N), the SIS
  estimate log Ẑ and the gradient norm per step;
* ``curves.png`` — loss, ESS and log Ẑ against the step.

Conditional targets (infilling, ``σ(s | y) ∝ p0(s) p0(y | s)``): a twist trained on one
ending y only learns that ending, so every step gets a new condition. Pairs (s, y) are
pre-drawn jointly from p0 (``task.exact_samples``, ``--train-conditions`` of them, picked at
random each step): y is the step's observed ending and s is an exact sample of σ(· | y).
That s is the step's positive for CTL / SIXO / DPG (``--positives exact``, the default for
conditional tasks): an unbiased one-sample estimate of ``E_σ[∇ log ψ_t]``, where the SIS
batch reweighted by ``p0(y | s)`` (``--positives sis``) is biased and, with a 10-token
ending, nearly always puts its whole weight on one particle. One sample per condition is
noisy, so ``--conditions-per-step C`` averages the gradient over C conditions before each
parameter update (``optax.MultiSteps``; the paper uses 25 conditions × 4 particles):
``--steps`` counts updates, ``fit`` runs ``steps × C`` micro-steps. For unconditional targets
``--positives exact`` draws a pool of exact samples by rejection and gives each step
``--particles`` of them; the default there is the reweighted SIS batch (``sis``).

    python inference/learn_twists.py --task toxicity-classifier --method ctl --small \\
        --out inference/results/twists

``--method all`` trains the five methods in turn. ``--seeds 0 1 2 3 4`` trains each method
once per seed, into ``<method>_<twist>/seed<k>/`` (``inference/evaluate.py --kl-only
--train-seeds …`` then gives the KL table over training seeds); ``--seed k`` alone keeps
the single folder ``<method>_<twist>/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lmppl  # noqa: E402
import models  # noqa: E402
from lmppl.twists.training import StepArguments  # noqa: E402

__all__ = [
    "METHODS",
    "TWISTS",
    "build_task",
    "default_steps",
    "enable_compilation_cache",
    "learn",
    "load_learned_twist",
    "main",
    "make_twist",
    "parse_options",
    "twist_directory",
]

METHODS = ("ctl", "rl", "sixo", "fudge", "dpg")
TWISTS = ("linear", "mlp", "transformer")

#: Default JAX persistent compilation cache (``--compilation-cache``).
COMPILATION_CACHE = str(Path(tempfile.gettempdir()) / "lmppl-jax-cache")

#: Training defaults: (full, --small). ``steps`` counts parameter updates; for conditional
#: targets (``steps_conditional``) each update averages ``conditions_per_step`` conditions.
DEFAULTS = {
    "steps": (2000, 500),
    "steps_conditional": (1000, 300),
    "particles": (64, 32),
    "lr": (1e-4, 1e-3),
    "conditions_per_step": (25, 4),
    "train_conditions": (2000, 400),
}


def enable_compilation_cache(directory: str | None) -> None:
    """Keep compiled XLA programs in ``directory`` (None or "": off).

    Sweeps of twists of one kind differ only in their parameters, which are jit
    arguments, so the twisted SMC of the second method reuses the first one's program
    (programs with a host scorer, such as the toxicity classifier, are never cached by JAX).
    """
    if directory:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def default_steps(task, small: bool) -> int:
    """Default number of parameter updates for ``task`` (full or ``--small``)."""
    return DEFAULTS["steps_conditional" if task.conditional else "steps"][small]


def parse_options(pairs: list[str] | None) -> dict:
    """``["num_tokens=10", "model=x"]`` → ``{"num_tokens": 10, "model": "x"}``."""
    options = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--task-option takes name=value, got {pair!r}")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return options


def build_task(name: str, model: str | None = None, options: dict | None = None):
    """The :class:`lmppl.task.Task` of ``models.TASKS[name]`` with the given options."""
    if name not in models.TASKS:
        raise SystemExit(f"unknown task {name!r}; choose one of {sorted(models.TASKS)}")
    options = dict(options or {})
    if model is not None:
        options["model"] = model
    return models.TASKS[name](**options)


def condition_length(task) -> int:
    """Number of conditioning tokens the twist reads (0 for unconditional tasks)."""
    if task.twist_condition is None:
        return 0
    condition = task.twist_condition(*task.args, **task.kwargs)
    return int(np.shape(condition)[-1])


def make_twist(kind: str, task, method: str, hidden_size: int = 128, seed: int = 0):
    """A fresh twist for ``task`` (FUDGE's ψ is a probability: ``output="log_sigmoid"``)."""
    output = "log_sigmoid" if method == "fudge" else "log"
    length = condition_length(task)
    if kind == "linear":
        return lmppl.twists.LinearTwist(task.lm, output=output, condition_length=length, seed=seed)
    if kind == "mlp":
        return lmppl.twists.MLPTwist(
            task.lm, hidden_size, output=output, condition_length=length, seed=seed
        )
    if kind == "transformer":
        return lmppl.twists.TransformerTwist(task.lm, output=output, conditional=length > 0)
    raise SystemExit(f"unknown twist {kind!r}; choose one of {TWISTS}")


def twist_directory(
    out: str | Path, task, method: str, twist: str, seed: int | None = None
) -> Path:
    """``<out>/<task.name>/<method>_<twist>`` (the task's name includes e.g. T and c), and
    ``…/seed<k>`` below it for one of several training seeds (``--seeds``)."""
    directory = Path(out) / task.name / f"{method}_{twist}"
    return directory if seed is None else directory / f"seed{seed}"


def load_learned_twist(directory: str | Path, task=None):
    """``(twist, config)`` from a directory written by :func:`learn` (for ``task``, checked
    against the task description the twist was trained for)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if task is not None and task.description != config["task_description"]:
        raise SystemExit(
            f"{directory} holds a twist for {config['task_description']!r}, not for "
            f"{task.description!r}; train one for this task (or another --twists folder)"
        )
    if task is None:
        task = build_task(config["task"], config.get("model"), config.get("task_options"))
    twist = make_twist(
        config["twist"], task, config["method"], config["hidden_size"], config["seed"]
    )
    return lmppl.twists.load_twist(directory / "twist.npz", twist), config


def _pool_sampler(task, conditions, samples, num_targets: int, with_targets: bool):
    """``args_sampler``: a random pre-drawn (condition, exact sample) per step."""
    size = len(samples)

    def sampler(key):
        pick_key, target_key = jax.random.split(key)
        if conditions is not None:
            i = int(jax.random.randint(pick_key, (), 0, size))
            args, kwargs = task.with_condition(jnp.asarray(conditions[i]))
            targets = samples[i : i + 1]
        else:
            args, kwargs = task.args, task.kwargs
            targets = samples[np.asarray(jax.random.randint(target_key, (num_targets,), 0, size))]
        return StepArguments(args, kwargs, jnp.asarray(targets) if with_targets else None)

    return sampler


def learn(
    task,
    method: str,
    *,
    twist_kind: str = "linear",
    steps: int,
    particles: int,
    lr: float,
    seed: int = 0,
    hidden_size: int = 128,
    positives: str = "auto",
    conditions_per_step: int = 4,
    train_conditions: int = 400,
    out: str | Path,
    task_name: str,
    model: str | None = None,
    task_options: dict | None = None,
    keep_checkpoints: bool = False,
    progress: bool = True,
    command: str | None = None,
    seed_directory: bool = False,
) -> Path:
    """Train one twist and write its files; returns the directory (``…/seed<seed>`` below
    the method's folder when ``seed_directory``)."""
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; choose one of {METHODS}")
    directory = twist_directory(out, task, method, twist_kind, seed if seed_directory else None)
    directory.mkdir(parents=True, exist_ok=True)
    twist = make_twist(twist_kind, task, method, hidden_size, seed)
    conditional = task.conditional
    if positives == "auto":
        positives = "exact" if conditional else "sis"
    uses_positives = method in ("ctl", "sixo", "dpg")
    key = jax.random.key(seed)
    data_key, fit_key = jax.random.split(key)
    args_sampler = None
    micro = conditions_per_step if conditional else 1
    optimizer = optax.adam(lr)
    if micro > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=micro)
    if conditional or (positives == "exact" and uses_positives):
        count = train_conditions if conditional else max(4 * particles, 256)
        exact = task.exact_samples(data_key, count)
        conditions = None if exact.conditions is None else np.asarray(exact.conditions)
        args_sampler = _pool_sampler(
            task,
            conditions,
            np.asarray(exact.samples),
            particles,
            with_targets=positives == "exact" and uses_positives,
        )
    started = time.perf_counter()
    trained, history = lmppl.twists.fit(
        task.program,
        twist,
        method,
        num_steps=steps * micro,
        num_particles=particles,
        rng_key=fit_key,
        args=task.args,
        kwargs=task.kwargs,
        optimizer=optimizer,
        twist_condition=task.twist_condition,
        args_sampler=args_sampler,
        checkpoint_dir=str(directory / "checkpoints"),
        checkpoint_every=max(1, (steps * micro) // 10),
        progress=progress,
    )
    seconds = time.perf_counter() - started
    lmppl.twists.save_twist(directory / "twist.npz", trained)
    if not keep_checkpoints:
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)
    config = {
        "task": task_name,
        "model": model,
        "task_options": task_options or {},
        "task_description": task.description,
        "method": method,
        "twist": twist_kind,
        "hidden_size": hidden_size,
        "seed": seed,
        "steps": steps,
        "micro_steps": steps * micro,
        "conditions_per_step": micro,
        "particles": particles,
        "lr": lr,
        "positives": positives if uses_positives else "n/a",
        "train_conditions": train_conditions if conditional else None,
        "seconds": seconds,
        "twist_repr": repr(trained),
        "command": command,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "history.json").write_text(json.dumps(history) + "\n")
    with open(directory / "history.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(history))
        writer.writerows(zip(*history.values(), strict=True))
    plot_history(history, directory / "curves.png", f"{task_name}: {method} ({twist_kind})", micro)
    return directory


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    width = max(1, min(width, len(values)))
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


def plot_history(history: dict, path: Path, title: str, micro: int = 1):
    """Loss, ESS / N and log Ẑ (SIS batch) against the step, with a moving average."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.2), layout="constrained")
    axes = figure.subplots(1, 3)
    step = np.asarray(history["step"], np.float64) / micro
    width = max(1, len(step) // 20)
    for ax, name, label in zip(
        axes,
        ("loss", "ess", "log_marginal"),
        ("loss", "ESS / N (SIS batch)", "SIS log Ẑ"),
        strict=True,
    ):
        values = np.asarray(history[name], np.float64)
        ax.plot(step, values, color="C0", alpha=0.3, linewidth=0.8)
        if len(values) >= width > 1:
            ax.plot(step[width - 1 :], _smooth(values, width), color="C0")
        ax.set_xlabel("update" if micro > 1 else "step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    figure.savefig(path, dpi=120)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python inference/learn_twists.py " + " ".join(shlex.quote(a) for a in argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=sorted(models.TASKS))
    parser.add_argument("--method", nargs="+", default=["ctl"], help=f"{', '.join(METHODS)} or all")
    parser.add_argument("--twist", default="mlp", choices=TWISTS)
    parser.add_argument("--steps", type=int, default=None, help="parameter updates")
    parser.add_argument("--particles", type=int, default=None, help="N of the SIS batch")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="several training seeds, each into <method>_<twist>/seed<k>/ (overrides --seed)",
    )
    parser.add_argument("--hidden-size", type=int, default=128, help="MLP width")
    parser.add_argument("--model", default=None, help="base model (default: the task's)")
    parser.add_argument("--task-option", action="append", help="name=value for the task factory")
    parser.add_argument("--positives", choices=("auto", "exact", "sis"), default="auto")
    parser.add_argument("--conditions-per-step", type=int, default=None)
    parser.add_argument("--train-conditions", type=int, default=None)
    parser.add_argument("--small", action="store_true", help="a few minutes on 2 CPU cores")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument(
        "--compilation-cache",
        default=COMPILATION_CACHE,
        help='JAX persistent compilation cache directory ("" for none)',
    )
    parser.add_argument("--out", default="inference/results/twists")
    args = parser.parse_args(argv)
    enable_compilation_cache(args.compilation_cache)
    methods = list(METHODS) if args.method == ["all"] else args.method
    for method in methods:
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {METHODS} or all")
    pick = lambda name: (  # noqa: E731
        getattr(args, name) if getattr(args, name) is not None else DEFAULTS[name][args.small]
    )
    task_options = parse_options(args.task_option)
    task = build_task(args.task, args.model, task_options)
    print(f"task {args.task}: {task.description}", flush=True)
    seeds = args.seeds if args.seeds is not None else [args.seed]
    runs = [(seed, method) for seed in seeds for method in methods]
    for seed, method in runs:
        directory = learn(
            task,
            method,
            twist_kind=args.twist,
            steps=args.steps if args.steps is not None else default_steps(task, args.small),
            particles=pick("particles"),
            lr=pick("lr"),
            seed=seed,
            hidden_size=args.hidden_size,
            positives=args.positives,
            conditions_per_step=pick("conditions_per_step"),
            train_conditions=pick("train_conditions"),
            out=args.out,
            task_name=args.task,
            model=args.model,
            task_options=task_options,
            keep_checkpoints=args.keep_checkpoints,
            command=command,
            seed_directory=args.seeds is not None,
        )
        history = json.loads((directory / "history.json").read_text())
        tail = max(1, len(history["ess"]) // 10)
        ess = float(np.mean(history["ess"][-tail:]))
        first = float(np.mean(history["ess"][:tail]))
        config = json.loads((directory / "config.json").read_text())
        print(
            f"{method}"
            + (f" seed {seed}" if args.seeds is not None else "")
            + f": {config['seconds']:.0f} s, SIS ESS/N {first:.3f} -> {ess:.3f} "
            f"(first/last tenth), loss {history['loss'][-1]:.4g} -> {directory}",
            flush=True,
        )
        if not math.isfinite(history["loss"][-1]):
            raise SystemExit(f"{method}: the final loss is not finite")


if __name__ == "__main__":
    lmppl.enable_compilation_cache()
    main()
