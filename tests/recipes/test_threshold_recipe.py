"""Smoke run of inference/threshold_bounds.py at tiny sizes.

The real limit (−5, P ≈ 4e-5) would need millions of draws for a handful of hits; the test
raises it to 1 (T = 4), where a fair share of p0 draws pass, and runs every stage for real:
the pool of hits and its cache, CTL training with exact positives and in-training
evaluation, and the bounds of both methods."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from inference import threshold_bounds as recipe


@pytest.mark.slow
def test_threshold_recipe_writes_table_figure_and_cache(tmp_path):
    argv = ["--limit", "1", "--num-tokens", "4", "--draws", "2048", "--batch", "1024"]
    argv += ["--heldout", "2", "--validation", "2", "--exact-steps", "2", "--steps", "0"]
    argv += ["--particles", "8"]
    argv += ["--eval-every", "2", "--eval-particles", "8", "--eval-runs", "2"]
    argv += ["--K", "4", "--p0-K", "--runs", "2", "--out", str(tmp_path)]
    assert recipe.main(argv) == 0
    with open(tmp_path / "threshold.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["K"]) for r in rows] == [
        ("CTL twist (twisted SMC)", "4"),
        ("p0 (SMC)", "4"),
    ]
    for row in rows:
        for name in ("lower", "upper", "gap"):
            assert math.isfinite(float(row[name])), row
    summary = json.loads((tmp_path / "summary.json").read_text())
    reference = summary["reference"]
    assert reference["draws"] == 2048 and 5 < reference["hits"] < 2048
    assert reference["log_z"] == pytest.approx(math.log(reference["hits"] / 2048), abs=1e-9)
    assert summary["best_step"] == 2 and summary["train_positives"] == reference["hits"] - 4
    assert "| CTL twist (twisted SMC) | 4 |" in (tmp_path / "threshold.md").read_text()
    assert (tmp_path / "threshold.png").stat().st_size > 0
    # the pool is cached; a shorter rerun reuses the first batch's hits (no sampling)
    (pool,) = tmp_path.glob("pool_*.npz")
    cached = np.load(pool)
    assert int(cached["batches"]) == 2 and len(cached["hits"]) == reference["hits"]
    again = recipe.draw_pool(
        recipe.models.TASKS[recipe.TASK](limit=1.0, num_tokens=4),
        recipe.argparse.Namespace(
            draws=1024, batch=1024, num_tokens=4, limit=1.0, seed=0, out=tmp_path, save_every=20
        ),
        None,
    )
    assert again["draws"] == 1024
    assert len(again["hits"]) == int(np.sum(cached["hit_batch"] == 0))


def test_importance_curves_match_simulation():
    """The exact E[log Ẑ_K] of importance sampling (and its conditional version) against a
    direct simulation of binomial hit counts."""
    p, floor = 0.01, 1e-16
    k = np.array([1, 10, 300])
    lower, upper = recipe.importance_curves(p, k, floor)
    rng = np.random.default_rng(0)
    for i, size in enumerate(k):
        h = rng.binomial(size, p, 400_000)
        assert lower[i] == pytest.approx(np.mean(np.log((h + floor * (size - h)) / size)), abs=0.05)
        h = rng.binomial(size - 1, p, 400_000)
        assert upper[i] == pytest.approx(
            np.mean(np.log((1 + h + floor * (size - 1 - h)) / size)), abs=0.01
        )
    assert np.all(lower <= upper)
    assert recipe.reference(4, 100_000, floor)["log_z"] == pytest.approx(math.log(4e-5))
