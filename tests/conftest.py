"""Session-wide fixtures; the objects themselves are built (once) in :mod:`tests.fixtures`."""

from __future__ import annotations

import pytest

from tests.fixtures import TWIN_CASES, Twin, make_twin


@pytest.fixture(params=TWIN_CASES)
def twin(request) -> Twin:
    """One ``transformers`` model and its lmppl twin per case, shared by the session."""
    return make_twin(request.param)


@pytest.fixture(scope="session")
def get_twin():
    """``get_twin(case)``: the shared twin of one case."""
    return make_twin
