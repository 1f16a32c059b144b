"""JAX's persistent compilation cache, on by default for the CLI, the recipes and the tests.

A sweep is one XLA program per (program, N, T, backend options); compiling it takes seconds
to a minute on a CPU, and the same program is compiled again by every new process. With the
persistent cache a second process loads the compiled executable from disk instead.

The cache lives in a user-level directory, ``$LMPPL_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/lmppl/jax`` (``~/.cache/lmppl/jax``). ``LMPPL_COMPILATION_CACHE=0``
turns it off. Only compilations that take at least ``min_compile_seconds`` are stored
(default 0.5 s, or ``$LMPPL_CACHE_MIN_COMPILE_SECONDS``: tiny jitted helpers are cheaper to
compile than to read back, but a process that compiles the same hundreds of small programs
every run, such as the test suite, gains from a lower threshold), and the directory is
capped at ``max_bytes`` (least recently used entries are evicted by JAX).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["cache_directory", "enable_compilation_cache"]

DEFAULT_MAX_BYTES = 4 * 1024**3
DEFAULT_MIN_COMPILE_SECONDS = 0.5


def cache_directory() -> Path:
    """Where compiled programs are kept (see the module docstring)."""
    explicit = os.environ.get("LMPPL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lmppl" / "jax"


def enable_compilation_cache(
    directory: str | os.PathLike | None = None,
    *,
    min_compile_seconds: float | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Path | None:
    """Turn on JAX's persistent compilation cache; returns its directory (None when off).

    Does nothing and returns None when ``LMPPL_COMPILATION_CACHE=0`` or when the user has
    already pointed JAX at a cache directory of their own (``jax_compilation_cache_dir``),
    in which case theirs is kept. An unwritable directory turns the cache off rather than
    failing the caller's run. ``min_compile_seconds=None`` reads
    ``$LMPPL_CACHE_MIN_COMPILE_SECONDS`` (default 0.5; a clear error if it is not a
    non-negative number).
    """
    if os.environ.get("LMPPL_COMPILATION_CACHE", "1").strip().lower() in ("0", "false", "no"):
        return None
    if min_compile_seconds is None:
        min_compile_seconds = _min_compile_seconds_from_environment()
    theirs = jax.config.values.get("jax_compilation_cache_dir")
    if theirs:
        return Path(theirs)
    path = Path(directory).expanduser() if directory is not None else cache_directory()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
    return path


def _min_compile_seconds_from_environment() -> float:
    """``$LMPPL_CACHE_MIN_COMPILE_SECONDS`` if set, else :data:`DEFAULT_MIN_COMPILE_SECONDS`."""
    text = os.environ.get("LMPPL_CACHE_MIN_COMPILE_SECONDS")
    if text is None or not text.strip():
        return DEFAULT_MIN_COMPILE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(
            f"LMPPL_CACHE_MIN_COMPILE_SECONDS must be a non-negative number of seconds, "
            f"got {text!r}"
        )
    return value
