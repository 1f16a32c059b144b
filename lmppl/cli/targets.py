"""Resolving a ``TARGET`` (task name, ``module:attr``, ``file.py:attr``) to a :class:`lmppl.Task`."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmppl.cli.errors import UsageError

__all__ = ["parse_options", "repo_root", "resolve_target"]


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
