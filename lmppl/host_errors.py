"""User exceptions raised inside compiled code come back with their own type and message.

A host function (a text scorer behind ``jax.pure_callback``) that raises inside a jitted
sweep surfaces as ``JaxRuntimeError: INTERNAL: ...`` with a long traceback. Host
functions are wrapped with :func:`remembered`, which records the exception before JAX
sees it; the public entry points run under :func:`reraise_host_errors`, which turns the
runtime error back into the user's exception (same type and message).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import jax

__all__ = ["remembered", "reraise_host_errors", "reraising"]

_state = threading.local()
F = TypeVar("F", bound=Callable[..., Any])


def remembered(host: F) -> F:
    """``host`` that records any exception it raises (for :func:`reraise_host_errors`)."""

    @functools.wraps(host)
    def wrapper(*args, **kwargs):
        try:
            return host(*args, **kwargs)
        except Exception as error:
            _state.error = error
            raise

    return wrapper  # type: ignore[return-value]


@contextmanager
def reraise_host_errors() -> Iterator[None]:
    """Re-raise a remembered host exception in place of the JAX runtime error it caused."""
    outer = getattr(_state, "active", False)
    _state.active = True
    if not outer:
        _state.error = None
    try:
        yield
    except jax.errors.JaxRuntimeError:
        error, _state.error = getattr(_state, "error", None), None
        if error is None:
            raise
        raise error.with_traceback(None) from None
    finally:
        _state.active = outer


def reraising(method: F) -> F:
    """Decorator: run ``method`` under :func:`reraise_host_errors`."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with reraise_host_errors():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
