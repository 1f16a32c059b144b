"""The ``lmppl`` command line: sample a target, train a twist, measure bounds on log Z.

::

    lmppl sample TARGET [--backend smc|is|twisted|exact] [--particles N] [--twist FILE]
                        [--set name=value ...] [--show K] [--out FILE.json|FILE.nc]
    lmppl train-twist TARGET --method ctl|rl|sixo|fudge|dpg [--twist linear|mlp] --out DIR
    lmppl bounds TARGET [--particles 1 4 16 64] [--runs R] [--exact-samples M]
                        [--twist FILE] --out PREFIX

``TARGET`` is one of

* a task name of the repository's ``models/`` (``models.TASKS``: ``sentiment``,
  ``toxicity-classifier``, ``toxicity-threshold``, ``infilling``, ``infilling-small``);
  found in the current directory or beside the installed ``lmppl`` package (a checkout);
* ``module:attr`` — ``models.toxicity:classifier``; the current directory is importable;
* ``path/to/file.py:attr`` — a Python file.

``attr`` is a :class:`lmppl.Task`, a function marked ``@lmppl.task_factory`` (called with
the ``--set name=value`` options; values are Python literals when they parse as one, else
strings), or a NumPyro program without arguments (wrapped as a Task with no exact
sampler: ``bounds`` then needs ``--exact enumerate`` or ``--exact rejection``).

Exit status: 0 success, 2 bad arguments (unknown target or option), 1 a failure while
running. Known errors are one line ``lmppl: error: ...`` on stderr; ``--traceback``
shows the Python traceback too.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["UsageError", "format_samples", "main", "resolve_target"]

PROG = "lmppl"
BACKENDS = ("smc", "is", "twisted", "exact")
METHODS = ("ctl", "rl", "sixo", "fudge", "dpg")
TWIST_KINDS = ("linear", "mlp")
EXACT_KINDS = ("rejection", "joint", "enumerate")


class UsageError(Exception):
    """Bad command-line arguments (exit status 2): unknown target, option or value."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``lmppl: error: ...``) and exit status 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _known_errors() -> tuple[type[BaseException], ...]:
    from lmppl.evaluation import RejectionBudgetExhausted
    from lmppl.infer import ProgramError
    from lmppl.twists import TrainingDiverged

    return (
        ValueError,
        TypeError,
        KeyError,
        OSError,
        ImportError,
        ProgramError,
        RejectionBudgetExhausted,
        TrainingDiverged,
    )


def _one_line(error: BaseException) -> str:
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    message = " ".join(message.split())
    return message or type(error).__name__


# --------------------------------------------------------------------------- targets


def repo_root() -> Path | None:
    """The checkout that holds ``lmppl/`` and ``models/`` side by side (None if installed
    elsewhere)."""
    import lmppl

    root = Path(lmppl.__file__).resolve().parent.parent
    return root if (root / "models" / "__init__.py").is_file() else None


def _importable_paths() -> None:
    """The current directory first (``module:attr`` of the user's project), the checkout
    last (``models`` when run from elsewhere)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    root = repo_root()
    if root is not None and str(root) not in sys.path:
        sys.path.append(str(root))


def _import_module(name: str):
    _importable_paths()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise UsageError(
                f"cannot import module '{name}' (not found from {os.getcwd()})"
            ) from None
        raise


def _import_file(path_text: str):
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UsageError(f"no file {path_text}")
    name = f"lmppl_target_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path_text} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    _importable_paths()
    folder = str(path.resolve().parent)  # its siblings import, as under `python file.py`
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _task_names() -> dict[str, Any]:
    try:
        models = _import_module("models")
    except UsageError:
        raise UsageError(
            "task names need the repository's models/ package: run from the lmppl checkout, "
            "or give TARGET as module:attr or path/to/file.py:attr"
        ) from None
    tasks = getattr(models, "TASKS", None)
    if not isinstance(tasks, dict):
        raise UsageError(f"the 'models' package at {models.__file__} has no TASKS table")
    return tasks


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["num_tokens=10", "model=smollm2-135m"]`` → ``{"num_tokens": 10, "model": "smollm2-135m"}``
    (a value is a Python literal when it parses as one, else the string)."""
    options: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name.isidentifier():
            raise UsageError(f"--set takes name=value, got {item!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = text
        options[name] = value
    return options


def _parameters(function: Any) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return []


def _describe_parameters(parameters: list[inspect.Parameter]) -> str:
    parts = []
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return ", ".join(parts) or "none"


def _call_factory(factory: Any, label: str, options: dict[str, Any]):
    from lmppl.task import Task

    parameters = _parameters(factory)
    named = {p.name: p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind == p.VAR_KEYWORD for p in parameters)
    unknown = [name for name in options if name not in named and not open_ended]
    if unknown:
        raise UsageError(
            f"unknown option {', '.join(map(repr, unknown))} for {label}; its parameters: "
            f"{_describe_parameters(parameters)}"
        )
    missing = [n for n, p in named.items() if p.default is p.empty and n not in options]
    if missing:
        raise UsageError(
            f"{label} needs --set {' --set '.join(f'{n}=...' for n in missing)} "
            f"(its parameters: {_describe_parameters(parameters)})"
        )
    task = factory(**options)
    if not isinstance(task, Task):
        raise TypeError(f"{label} returned {type(task).__name__}, not an lmppl.Task")
    return task


def _wrap_program(program: Any, label: str):
    from lmppl.infer import discover
    from lmppl.task import Task

    structure = discover(program, (), {})
    site = structure.lm_site
    return Task(
        name=label.rpartition(":")[2] or "program",
        program=program,
        lm=site.model,
        site=site.name,
        exact=None,
        description=f"the program {label}",
    )


def resolve_target(target: str, options: dict[str, Any] | None = None, exact: str | None = None):
    """The :class:`lmppl.Task` named by ``TARGET`` (see the module docstring).

    Args:
      target: a ``models.TASKS`` name, ``module:attr`` or ``path/to/file.py:attr``.
      options: ``--set`` options for a task factory.
      exact: replace the task's exact sampler (``"rejection"``, ``"joint"``,
        ``"enumerate"``).

    Raises:
      UsageError: the target cannot be found, is not a task, factory or program, or an
        option is not a parameter of the factory.
    """
    from lmppl.task import Task, is_task_factory

    options = dict(options or {})
    location, colon, attr = target.rpartition(":")
    if not colon:
        if target.endswith(".py"):
            raise UsageError(f"name the object in the file: {target}:NAME")
        tasks = _task_names()
        key = target.replace("_", "-")
        if key not in tasks:
            raise UsageError(f"unknown task {target!r}; tasks: {', '.join(tasks)}")
        obj, label = tasks[key], key
    else:
        if not location or not attr:
            raise UsageError(f"TARGET must be module:attr or path/to/file.py:attr, got {target!r}")
        is_file = location.endswith(".py") or "/" in location or os.sep in location
        module = _import_file(location) if is_file else _import_module(location)
        if not hasattr(module, attr):
            candidates = [
                name
                for name, value in vars(module).items()
                if not name.startswith("_") and (isinstance(value, Task) or is_task_factory(value))
            ]
            hint = f"; tasks and factories there: {', '.join(candidates)}" if candidates else ""
            raise UsageError(f"{location} has no attribute {attr!r}{hint}")
        obj, label = getattr(module, attr), target

    if isinstance(obj, Task):
        if options:
            raise UsageError(f"--set is for task factories; {label} is a Task")
        task = obj
    elif is_task_factory(obj):
        task = _call_factory(obj, label, options)
    elif callable(obj):
        required = [
            p.name
            for p in _parameters(obj)
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if required:
            raise UsageError(
                f"{label} takes arguments ({', '.join(required)}): give a Task, a "
                "@lmppl.task_factory, or a program without arguments"
            )
        if options:
            raise UsageError(f"--set is for task factories; {label} is a plain program")
        task = _wrap_program(obj, label)
    else:
        raise UsageError(
            f"{label} is a {type(obj).__name__}: give a Task, a @lmppl.task_factory, or a "
            "NumPyro program without arguments"
        )
    if exact is not None:
        task = dataclasses.replace(task, exact=exact)
    return task


# --------------------------------------------------------------------------- twists


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


def _texts(result: Any, tokens: np.ndarray) -> list[str]:
    if result.tokenizer is None:
        return [" ".join(map(str, row)) for row in tokens.tolist()]
    try:
        return result.text()
    except (ValueError, KeyError):
        return [" ".join(map(str, row)) for row in tokens.tolist()]


def format_samples(result: Any, show: int = 5) -> list[str]:
    """Lines ``weight  ×copies  text`` for the ``show`` heaviest distinct sequences of
    ``result``'s LM site (copies: particles holding that sequence after resampling)."""
    tokens = np.asarray(result.samples[result.site])
    weights = np.asarray(result.weights, np.float64)
    texts = _texts(result, tokens)
    merged: dict[bytes, list] = {}
    for row, weight, text in zip(tokens, weights, texts, strict=True):
        entry = merged.setdefault(row.tobytes(), [0.0, 0, text])
        entry[0] += float(weight)
        entry[1] += 1
    ranked = sorted(merged.values(), key=lambda e: -e[0])
    lines = [
        f"top {min(show, len(ranked))} of {len(ranked)} distinct samples "
        "(normalised weight, particles):"
    ]
    for weight, copies, text in ranked[:show]:
        lines.append(f"  {weight:7.4f}  ×{copies:<4d} {text!r}")
    return lines


def _finite_or_none(values: Any) -> list:
    return [float(v) if math.isfinite(float(v)) else None for v in np.ravel(values)]


def write_result(path: Path, result: Any, header: dict[str, Any]) -> None:
    """``.json``: the samples, texts and weights (``null`` = −∞); ``.nc``: ArviZ netCDF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".nc":
        idata = result.to_arviz()
        idata.to_netcdf(str(path))
        return
    tokens = np.asarray(result.samples[result.site])
    record = {
        **header,
        "site": result.site,
        "backend": result.backend,
        "model": result.model_name,
        "num_particles": result.num_particles,
        "log_marginal": _finite_or_none(result.log_marginal)[0],
        "ess": result.effective_sample_size if result.ess is not None else None,
        "samples": tokens.tolist(),
        "text": _texts(result, tokens),
        "log_weights": _finite_or_none(result.log_weights),
        "weights": [float(w) for w in np.asarray(result.weights)],
    }
    path.write_text(json.dumps(record, indent=1) + "\n")


def _out_prefix(text: str) -> Path:
    prefix = Path(text).expanduser()
    if prefix.suffix in (".png", ".csv", ".md"):
        prefix = prefix.with_suffix("")
    return prefix


def _with_suffix(prefix: Path, suffix: str) -> Path:
    return prefix.parent / (prefix.name + suffix)


# --------------------------------------------------------------------------- commands


def _key(seed: int):
    import jax

    return jax.random.key(seed)


def _print(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def cmd_sample(options: argparse.Namespace) -> int:
    from lmppl import infer

    out = Path(options.out).expanduser() if options.out else None
    if out is not None and out.suffix not in (".json", ".nc"):
        raise UsageError(f"--out must end in .json or .nc, got {options.out}")
    backend = options.backend or ("twisted" if options.twist else "smc")
    if options.twist and backend != "twisted":
        raise UsageError(f"--twist is used by --backend twisted, not {backend}")
    if backend == "twisted" and not options.twist:
        raise UsageError("--backend twisted needs --twist CHECKPOINT")
    task = resolve_target(options.target, parse_options(options.set))
    _print(f"task: {task.name} — {task.description or task.program.__name__}")
    twist = None
    if options.twist:
        twist, info = load_task_twist(options.twist, task)
        _print(_twist_line(info))

    start = time.perf_counter()
    if backend == "exact":
        result = infer.Exact(task.program).run(_key(options.seed), *task.args, **task.kwargs)
        seconds = time.perf_counter() - start
        _print(
            f"backend: Exact, {result.num_particles} sequences enumerated ({seconds:.1f}s)",
            f"log Z = {float(result.log_marginal):.4f} (exact)",
        )
    else:
        sampler = make_backend(backend, task, twist)(task.program, options.particles)
        result = sampler.run(_key(options.seed), *task.args, **task.kwargs)
        seconds = time.perf_counter() - start
        _print(
            f"backend: {result.backend}, {result.num_particles} particles, seed {options.seed} "
            f"({seconds:.1f}s incl. compilation)",
            f"log Ẑ = {float(result.log_marginal):.4f}   ESS = "
            f"{result.effective_sample_size:.1f} of {result.num_particles}",
        )
    _print(*format_samples(result, options.show))
    if out is not None:
        header = {"task": task.name, "target": options.target, "seed": options.seed}
        write_result(out, result, header)
        _print(f"wrote {out}")
    return 0


def _condition_length(task: Any) -> int:
    if task.twist_condition is None:
        return 0
    condition = np.asarray(task.twist_condition(*task.args, **task.kwargs))
    return int(condition.shape[-1]) if condition.ndim else 1


def _history_csv(path: Path, history: dict[str, list]) -> None:
    names = [name for name, values in history.items() if isinstance(values, list)]
    rows = zip(*(history[name] for name in names), strict=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        writer.writerows(rows)


def _trend(values: list[float]) -> str:
    if not values:
        return "n/a"
    width = max(1, min(10, len(values) // 5))
    return f"{np.mean(values[:width]):.4g} → {np.mean(values[-width:]):.4g}"


def cmd_train_twist(options: argparse.Namespace) -> int:
    from lmppl import twists

    for name in ("steps", "particles"):
        if getattr(options, name) < 1:
            raise UsageError(f"--{name} must be a positive integer")
    if not options.lr > 0:
        raise UsageError("--lr must be positive")
    task = resolve_target(options.target, parse_options(options.set))
    _print(f"task: {task.name} — {task.description or task.program.__name__}")
    output = "log_sigmoid" if options.method == "fudge" else "log"
    head = {"output": output, "condition_length": _condition_length(task), "seed": options.seed}
    if options.twist == "linear":
        twist = twists.LinearTwist(task.lm, **head)
    else:
        twist = twists.MLPTwist(task.lm, options.hidden_size, **head)
    _print(
        f"training {type(twist).__name__} ({output}) with {options.method}: {options.steps} "
        f"steps, {options.particles} particles, lr {options.lr}"
    )
    start = time.perf_counter()
    trained, history = twists.fit(
        task.program,
        twist,
        options.method,
        num_steps=options.steps,
        num_particles=options.particles,
        learning_rate=options.lr,
        rng_key=_key(options.seed),
        args=task.args,
        kwargs=task.kwargs,
        twist_condition=task.twist_condition,
        progress=sys.stderr.isatty(),
    )
    seconds = time.perf_counter() - start
    out = Path(options.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    metadata = {
        "task": task.name,
        "target": options.target,
        "options": parse_options(options.set),
        "site": task.site,
        "method": options.method,
        "num_particles": options.particles,
        "learning_rate": options.lr,
        "seed": options.seed,
    }
    path = twists.save_twist(
        out / "twist.npz",
        trained,
        lm=task.lm,
        step=options.steps,
        history=history,
        metadata=json.loads(json.dumps(metadata, default=str)),
    )
    _history_csv(out / "history.csv", history)
    _print(
        f"trained in {seconds:.1f}s; first → last steps: loss {_trend(history['loss'])}, "
        f"ESS/N {_trend(history['ess'])}, SIS log Ẑ {_trend(history['log_marginal'])}",
        f"wrote {path} and {out / 'history.csv'}",
        f"use it: lmppl sample {options.target} --twist {out}",
    )
    return 0


def cmd_bounds(options: argparse.Namespace) -> int:
    import jax

    from lmppl import evaluation, infer, plots

    if min(options.particles) < 1 or options.runs < 1:
        raise UsageError("--particles and --runs must be positive integers")
    num_exact = options.exact_samples or options.runs
    if num_exact < 1:
        raise UsageError("--exact-samples must be a positive integer")
    methods = list(
        dict.fromkeys(options.methods or (["smc", "twisted"] if options.twist else ["smc"]))
    )
    if "twisted" in methods and not options.twist:
        raise UsageError("--methods twisted needs --twist CHECKPOINT")
    task = resolve_target(options.target, parse_options(options.set), exact=options.exact)
    if task.exact is None:
        raise UsageError(
            f"{options.target} has no exact sampler for the upper bounds; pass --exact "
            "enumerate (tiny models) or --exact rejection (φ ≤ 1)"
        )
    prefix = _out_prefix(options.out)
    _print(f"task: {task.name} — {task.description or task.program.__name__}")
    twist = None
    if options.twist:
        twist, info = load_task_twist(options.twist, task)
        _print(_twist_line(info))

    sampler_key, bounds_key, exact_key = jax.random.split(_key(options.seed), 3)
    args, kwargs = task.arguments_without_condition()
    start = time.perf_counter()
    log_z = None
    if task.exact == "enumerate":  # one enumeration gives log Z and the exact samples
        enumerated = infer.Exact(task.program).run(exact_key, *args, **kwargs)
        log_z = float(enumerated.log_marginal)
        index = jax.random.categorical(sampler_key, enumerated.log_weights, shape=(num_exact,))
        tokens = np.asarray(enumerated.samples[enumerated.site])[np.asarray(index)]
        exact = evaluation.ExactSamples(
            tokens.astype(np.int32), enumerated.site, num_draws=num_exact
        )
    else:
        extra = {"max_draws": options.max_draws} if task.exact == "rejection" else {}
        exact = task.exact_samples(sampler_key, num_exact, **extra)
    rate = f", acceptance rate {exact.acceptance_rate:.3g}" if task.exact == "rejection" else ""
    _print(
        f"exact samples: {exact.num_samples} by {task.exact} ({exact.num_draws} draws{rate}, "
        f"{time.perf_counter() - start:.1f}s)"
    )
    labels = {"smc": "SMC", "is": "SIS", "twisted": "Twisted SMC"}
    table = evaluation.BoundsTable([], log_z=log_z)
    for index, method in enumerate(methods):
        start = time.perf_counter()
        table = table + evaluation.log_z_bounds(
            task.program,
            make_backend(method, task, twist),
            exact,
            options.particles,
            options.runs,
            jax.random.fold_in(bounds_key, index),
            args=args,
            kwargs=kwargs,
            name=labels[method],
            log_z=log_z,
        )
        _print(f"{labels[method]}: K = {options.particles} in {time.perf_counter() - start:.1f}s")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    title = f"{task.name}: {options.runs} runs per K, {exact.num_samples} exact samples"
    markdown = table.to_markdown()
    _with_suffix(prefix, ".md").write_text(f"# log Z bounds — {title}\n\n{markdown}")
    table.to_csv(_with_suffix(prefix, ".csv"))
    figure = _with_suffix(prefix, ".png")
    plots.plot_bounds(table, path=figure, title=title)
    _print("", markdown.rstrip(), "")
    _print(
        f"figure: {figure}",
        f"table: {_with_suffix(prefix, '.md')}, {_with_suffix(prefix, '.csv')}",
    )
    return 0


# --------------------------------------------------------------------------- parser

TARGET_HELP = (
    "a models/ task name (e.g. sentiment, toxicity-classifier), module:attr "
    "(e.g. models.toxicity:classifier) or path/to/file.py:attr; attr is an lmppl.Task, an "
    "@lmppl.task_factory or a NumPyro program without arguments"
)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    parser.add_argument(
        "--set",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="an option of a task factory (repeatable); VALUE is a Python literal or a string",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--traceback",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the Python traceback of an error",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Probabilistic inference in language models: sample a target with "
        "(twisted) SMC, train twists, measure bidirectional bounds on log Z.",
        epilog="Exit status: 0 ok, 2 bad arguments, 1 failure. TARGET: " + TARGET_HELP + ".",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the Python traceback of an error"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sample = commands.add_parser(
        "sample",
        help="run inference and print the heaviest samples, log Ẑ and the ESS",
        description="Run inference on TARGET and print the heaviest distinct samples "
        "(decoded text, normalised weight, number of particles), log Ẑ and the ESS.",
    )
    _common(sample)
    sample.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="smc (bootstrap SMC), is (importance sampling), twisted (needs --twist) or exact "
        "(enumeration, tiny models); default smc, or twisted with --twist",
    )
    sample.add_argument("--particles", type=int, default=64, help="N (default 64)")
    sample.add_argument("--twist", metavar="CHECKPOINT", help="a twist file or train-twist folder")
    sample.add_argument("--show", type=int, default=5, help="samples to print (default 5)")
    sample.add_argument("--out", metavar="FILE", help="write the result: .json or .nc (ArviZ)")
    sample.set_defaults(run=cmd_sample)

    train = commands.add_parser(
        "train-twist",
        help="train a twist and save it (twist.npz, history.csv)",
        description="Train a twist head on the frozen base LM of TARGET and write "
        "DIR/twist.npz (parameters, class and options, training history) and DIR/history.csv.",
    )
    _common(train)
    train.add_argument("--method", choices=METHODS, required=True, help="the twist loss")
    train.add_argument(
        "--twist", choices=TWIST_KINDS, default="mlp", help="twist head (default mlp)"
    )
    train.add_argument(
        "--hidden-size", type=int, default=64, help="width of the MLP head (default 64)"
    )
    train.add_argument("--steps", type=int, default=100, help="gradient steps (default 100)")
    train.add_argument("--particles", type=int, default=32, help="SIS batch size (default 32)")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    train.add_argument("--out", metavar="DIR", required=True, help="folder to write")
    train.set_defaults(run=cmd_train_twist)

    bounds = commands.add_parser(
        "bounds",
        help="bidirectional bounds on log Z against K: table and figure",
        description="Lower (SMC) and upper (conditional SMC with an exact target sample) "
        "bounds on log Z for each K; writes PREFIX.md, PREFIX.csv and PREFIX.png.",
    )
    _common(bounds)
    bounds.add_argument("--particles", type=int, nargs="+", default=[1, 4, 16, 64], help="K values")
    bounds.add_argument("--runs", type=int, default=8, help="runs per K (default 8)")
    bounds.add_argument(
        "--exact-samples", type=int, default=None, help="exact samples M (default: --runs)"
    )
    bounds.add_argument(
        "--methods",
        nargs="+",
        choices=("smc", "is", "twisted"),
        default=None,
        help="backends to bound (default smc, plus twisted with --twist)",
    )
    bounds.add_argument("--twist", metavar="CHECKPOINT", help="a twist file or train-twist folder")
    bounds.add_argument(
        "--exact",
        choices=EXACT_KINDS,
        default=None,
        help="override the task's exact sampler (needed for a plain program)",
    )
    bounds.add_argument(
        "--max-draws",
        type=int,
        default=200_000,
        help="rejection sampling budget (default 200000)",
    )
    bounds.add_argument("--out", metavar="PREFIX", required=True, help="output prefix")
    bounds.set_defaults(run=cmd_bounds)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lmppl")
    except Exception:  # not installed (run from a checkout)
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad arguments, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv
    try:
        options = build_parser().parse_args(argv)
        show_traceback = bool(getattr(options, "traceback", False))
        return options.run(options)
    except SystemExit as done:  # --help, --version
        return done.code if isinstance(done.code, int) else 0
    except UsageError as error:
        if show_traceback:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _known_errors() as error:
        if show_traceback:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
