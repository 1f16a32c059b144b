"""Smoke run of inference/trust_twists.py (old, default and exact-positive CTL recipes) at
tiny sizes."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from inference import trust_twists as recipe


@pytest.mark.slow
def test_trust_recipe_writes_table_and_figure(tmp_path):
    argv = ["--tasks", "infilling-fixed", "--reference-draws", "8192", "--exact", "2"]
    argv += ["--validation", "2", "--positives", "4"]
    argv += ["--steps", "4", "--particles", "8", "--eval-every", "2", "--K", "8", "--runs", "2"]
    assert recipe.main([*argv, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "trust.csv", newline="") as handle:  # closed: ResourceWarning is an error
        rows = list(csv.DictReader(handle))
    assert [r["recipe"] for r in rows] == ["old", "default", "exact"]
    for row in rows:
        for name in ("reference", "lower", "upper", "gap"):
            assert math.isfinite(float(row[name])), row
    assert rows[1]["best_step"] in ("2", "4") and rows[0]["best_step"] == "4"
    assert rows[2]["best_step"] in ("2", "4")
    assert "| infilling-fixed | default |" in (tmp_path / "trust.md").read_text()
    assert (tmp_path / "trust.png").stat().st_size > 0
    assert (tmp_path / "reference_infilling-fixed_8192.json").is_file()
    (pool,) = tmp_path.glob("exact_infilling_fixed*.npz")
    with np.load(pool) as stored:
        assert len(stored["samples"]) == 8  # 2 held out + 2 validation + 4 positives
    combined = tmp_path / "combined"
    assert recipe.main(["--combine", str(tmp_path / "trust.csv"), "--out", str(combined)]) == 0
    assert (combined / "trust.png").stat().st_size > 0
