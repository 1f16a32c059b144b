"""Session-wide fixtures; the objects themselves are built (once) in :mod:`tests.fixtures`."""

from __future__ import annotations

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
    the CLI and the recipes; ``LMPPL_COMPILATION_CACHE=0`` runs the suite cold)."""
    lmppl.enable_compilation_cache()
