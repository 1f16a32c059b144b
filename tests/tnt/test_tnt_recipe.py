"""Smoke run of ``inference/tnt_stories260k.py --small`` (two methods) into a tmp dir."""

import csv
import math

import jax
import pytest

import lmppl
from inference import tnt_stories260k


@pytest.mark.slow
def test_recipe_small_writes_table_plot_and_loadable_params(tmp_path):
    out = tmp_path / "tnt"
    tnt_stories260k.main(["--small", "--methods", "tnff", "ul", "--out", str(out)])
    report = out.with_suffix(".md").read_text()
    assert "python inference/tnt_stories260k.py --small" in report and "KL(σ ‖ p_θ)" in report
    assert out.with_suffix(".png").stat().st_size > 0
    with out.with_suffix(".csv").open(newline="") as handle:
        rows = {(r["method"], int(r["steps"])): r for r in csv.DictReader(handle)}
    old = float(rows[("old model", 0)]["prevalence"])
    assert old > 0.1 and float(rows[("old model", 0)]["bleu_paired"]) == pytest.approx(100)
    for exact in ("exact σ (SMC)", "exact σ (coupled rejection)"):
        assert float(rows[(exact, 0)]["prevalence"]) == 0.0
    for method in ("tnff", "ul"):
        final = rows[(method, 30)]
        assert float(final["prevalence"]) < old / 2
        assert 0 < float(final["bleu_paired"]) < 100 and math.isfinite(float(final["kl_sigma"]))
    # the saved TNFF parameters load back into the model and generate
    lm = lmppl.load("stories260k")
    lm_tnff = lmppl.tnt.load_params(tmp_path / "tnt_tnff.npz", lm)
    tokens = lmppl.LM(lm_tnff, "Once upon a time,", 8).sample(jax.random.key(0), (4,))
    assert tokens.shape == (4, 8)
