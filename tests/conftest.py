"""Session-wide fixtures; the objects themselves are built (once) in :mod:`tests.fixtures`."""

from __future__ import annotations

import os

import pytest

import lmppl
from tests.fixtures import TWIN_CASES, Twin, make_twin


@pytest.fixture(params=TWIN_CASES)
def twin(request) -> Twin:
    """One ``transformers`` model and its lmppl twin per case, shared by the session."""
    return make_twin(request.param)


@pytest.fixture(scope="session")
def get_twin():
    """``get_twin(case)``: the shared twin of one case."""
    return make_twin


def pytest_configure(config):
    """Compiled sweeps are kept on disk across test runs (lmppl's persistent cache, as for
    the CLI and the recipes; ``LMPPL_COMPILATION_CACHE=0`` runs the suite cold).

    The suite compiles hundreds of small programs the same way every run, so it stores
    every compilation of 0.05 s or more (the library's default is 0.5 s): measured on
    tests/infer/test_smc.py + tests/evaluation/test_bounds.py with a warm cache, 99.7 →
    85.6 CPU-seconds (the first run that fills the cache pays about twice). Set through
    the environment, so the processes the tests start (the CLI, recipes, benchmarks,
    tutorial kernels) use it too.
    """
    os.environ.setdefault("LMPPL_CACHE_MIN_COMPILE_SECONDS", "0.05")
    lmppl.enable_compilation_cache()
