"""Smoke test of the benchmark scripts: ``--quick`` runs exit 0 and print a ratio.

No timing is asserted (the machine is shared and noisy); this only keeps the scripts
runnable as the library changes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

__all__: list[str] = []

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "ratio_heading"),
    [
        ("decode.py", "ratio lmppl/torch"),
        ("smc.py", "SMC / generate"),
        ("constraints.py", "constrained ms/token"),
        ("grammar.py", "host parser ms/token"),
        ("composite.py", "work-normalised variance ratio"),
        ("gpu.py", "SMC / generate"),
        ("twist_update.py", "ratio to the twisted sweep"),
    ],
)
def test_benchmark_runs_quick(script: str, ratio_heading: str):
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert ratio_heading in completed.stdout, completed.stdout[-3000:]
    assert "ratio" in completed.stdout
