"""Split a program's arguments into traced arrays and static Python values.

Arrays become arguments of the jitted sweep (new values do not recompile); everything
else (strings, numbers, callables) is static and part of the compilation cache key.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import numpy as np

__all__ = ["split_arguments"]


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray)


class _Static:
    """A hashable stand-in for a static leaf (by value if hashable, else by identity)."""

    def __init__(self, value: Any):
        self.value = value
        try:
            self._key: Hashable = ("value", hash(value), type(value))
        except TypeError:
            self._key = ("id", id(value))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        if not isinstance(other, _Static) or self._key != other._key:
            return False
        return self._key[0] == "id" or self.value == other.value


def split_arguments(args: tuple, kwargs: dict) -> tuple[list, Hashable, Any]:
    """``(arrays, static_key, rebuild)`` with ``rebuild(arrays) -> (args, kwargs)``."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    arrays = [leaf for leaf in leaves if _is_array(leaf)]
    signature = tuple(
        ("array", leaf.shape, str(leaf.dtype)) if _is_array(leaf) else _Static(leaf)
        for leaf in leaves
    )
    static_key = (treedef, signature)

    def rebuild(dynamic: list) -> tuple[tuple, dict]:
        it = iter(dynamic)
        filled = [next(it) if _is_array(leaf) else leaf for leaf in leaves]
        return jax.tree.unflatten(treedef, filled)

    return arrays, static_key, rebuild
