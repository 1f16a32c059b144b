"""An impossible target is reported as such by the CLI, never as uniform weights (#15, 6)."""

import jax.numpy as jnp
import numpyro
import pytest

import lmppl
from lmppl import potentials
from lmppl.cli import main

LM = lmppl.table_lm(3, context_length=12, seed=1)


def impossible():
    s = numpyro.sample("s", lmppl.LM(LM, prompt="a", max_new_tokens=2, stop_at_eos=False))
    numpyro.factor("never", potentials.log_indicator(jnp.all(s > 100)))


def test_sample_on_an_impossible_target_exits_nonzero_and_says_why(capsys, tmp_path):
    out = tmp_path / "result.json"
    with pytest.warns(RuntimeWarning, match="every particle has weight zero"):
        code = main(["sample", f"{__file__}:impossible", "--particles", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "every particle has weight zero" in printed
    assert "×" not in printed  # no sample lines with made-up weights
    assert not out.exists()
