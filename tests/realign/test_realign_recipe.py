"""Smoke run of the DeRa λ-sweep recipe (inference/realign_stories260k.py) at tiny sizes."""

from __future__ import annotations

import csv

import jax
import pytest

import lmppl
from inference import realign_stories260k as recipe
from lmppl import tnt


@pytest.mark.slow
def test_realign_recipe_writes_a_consistent_table(tmp_path):
    lm = lmppl.load("stories260k")
    key = jax.random.key(3)
    noisy = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(key, x.shape, x.dtype), lm.params)
    aligned = tmp_path / "aligned.npz"
    tnt.save_params(aligned, tnt.with_params(lm, noisy))
    out = tmp_path / "dera"
    recipe.main(
        [
            "--small",
            "--aligned",
            str(aligned),
            "--out",
            str(out),
            "--lams",
            "0",
            "0.5",
            "1",
            "--samples",
            "16",
            "--tokens",
            "6",
            "--particles",
            "8",
            "--runs",
            "2",
        ]
    )
    with open(out.with_suffix(".csv"), newline="") as handle:  # closed: ResourceWarning is an error
        rows = list(csv.DictReader(handle))
    assert [float(r["lam"]) for r in rows] == [0.0, 0.5, 1.0]
    # λ = 0 is the reference itself: same key ⇒ identical stories, and log Z_0 = 0.
    assert float(rows[0]["token_bleu_paired"]) == pytest.approx(100.0)
    for r in (rows[0], rows[2]):
        assert abs(float(r["global_log_z"])) < 1e-3
    # Hölder: for 0 < λ < 1 every log Ẑ_λ is ≤ log Z_λ ≤ 0 in expectation; the mean is finite.
    assert float(rows[1]["global_log_z"]) < 0.05
    assert out.with_suffix(".png").stat().st_size > 0
    assert "DeRa" in out.with_suffix(".md").read_text()
