"""Smoke run of inference/bounds.py (stories260K, profanity classifier target) at tiny sizes."""

from __future__ import annotations

import csv
import math

import pytest

from inference import bounds as recipe


@pytest.mark.slow
def test_bounds_recipe_writes_table_figure_and_report(tmp_path):
    out = tmp_path / "bounds"
    recipe.main(
        [
            "--out",
            str(out),
            "--small",
            "--tokens",
            "4",
            "--runs",
            "2",
            "--kl-samples",
            "5",
            "--particles",
            "1",
            "4",
        ]
    )
    with open(out.with_suffix(".csv"), newline="") as handle:  # closed: ResourceWarning is an error
        rows = list(csv.DictReader(handle))
    assert rows, "empty bounds table"
    for row in rows:
        values = [float(v) for key, v in row.items() if "lower" in key or "upper" in key]
        assert values and all(math.isfinite(v) for v in values), row
    assert out.with_suffix(".png").stat().st_size > 0
    assert "KL" in out.with_suffix(".md").read_text()
