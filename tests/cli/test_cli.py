"""The ``lmppl`` command line, in process (``main([...])``) on tiny table-LM targets."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmppl
from lmppl.cli import main, parse_options, resolve_target
from tests.fixtures import small_lm, table_lm

HERE = Path(__file__).parent
TINY = str(HERE / "tiny_targets.py")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lmppl: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------- arguments and targets


@pytest.mark.parametrize(
    "argv", [["--help"], ["sample", "-h"], ["train-twist", "--help"], ["bounds", "--help"]]
)
def test_help_exits_zero(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 0 and err == ""
    assert out.startswith("usage: lmppl")
    assert "TARGET" in out or "COMMAND" in out


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        ([], ["required: COMMAND"]),
        (["sample"], ["required: TARGET"]),
        (["fly", "x"], ["invalid choice: 'fly'"]),
        (["sample", "not_a_module_anywhere:x"], ["cannot import module 'not_a_module_anywhere'"]),
        (["sample", "no-such-task"], ["unknown task 'no-such-task'", "toxicity-classifier"]),
        (["sample", "/no/such/file.py:program"], ["no file /no/such/file.py"]),
        (["sample", f"{TINY}:missing"], ["has no attribute 'missing'", "tiny", "TASK"]),
        (["sample", f"{TINY}:NUMBER"], ["is a int"]),
        (["sample", f"{TINY}:needs_arguments"], ["takes arguments (prompt)"]),
        (["sample", TINY], ["name the object in the file"]),
        (
            ["sample", f"{TINY}:tiny", "--set", "colour=red"],
            ["unknown option 'colour'", "num_tokens=3, weight=0.9"],
        ),
        (["sample", f"{TINY}:tiny", "--set", "weight"], ["--set takes name=value"]),
        (["sample", f"{TINY}:program", "--set", "weight=1"], ["plain program"]),
        (["sample", f"{TINY}:TASK", "--set", "weight=1"], ["is a Task"]),
        (["sample", f"{TINY}:program", "--backend", "twisted"], ["needs --twist"]),
        (["sample", f"{TINY}:program", "--particles", "many"], ["invalid int value: 'many'"]),
        (["sample", f"{TINY}:program", "--out", "result.txt"], [".json or .nc"]),
        (["bounds", f"{TINY}:program", "--out", "b"], ["no exact sampler", "--exact enumerate"]),
        (["train-twist", f"{TINY}:program", "--out", "d"], ["required: --method"]),
        (
            ["train-twist", f"{TINY}:program", "--method", "magic", "--out", "d"],
            ["invalid choice: 'magic'"],
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, fragments):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert_one_line_error(err, *fragments)


def test_unknown_option_of_a_models_task_lists_its_parameters(capsys):
    code, _, err = run(capsys, "sample", "sentiment", "--set", "clas=1")
    assert code == 2
    assert_one_line_error(err, "unknown option 'clas' for sentiment", "target_class=0")


def test_a_class_the_classifier_does_not_have_fails_before_compiling(capsys):
    """Issue #15 item 7: ``--set target_class=7`` used to surface from inside the compiled
    sweep as a ``JaxRuntimeError``; the classifier is now probed when the task is built."""
    code, _, err = run(capsys, "sample", "sentiment", "--set", "target_class=7")
    assert code == 1
    assert_one_line_error(err, "target_class=7", "sentiment has 5 classes")


def test_runtime_errors_exit_1_with_one_line_and_traceback_on_request(capsys):
    code, _, err = run(capsys, "sample", f"{TINY}:no_lm")
    assert code == 1
    assert_one_line_error(err, "LM")
    code, _, err = run(capsys, "sample", f"{TINY}:no_lm", "--traceback")
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("lmppl: error: ")


def test_missing_twist_file_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "sample", f"{TINY}:program", "--twist", tmp_path / "none")
    assert code == 1
    assert_one_line_error(err, "no twist file")


def test_set_values_are_literals_or_strings():
    assert parse_options(["a=3", "b=0.5", "c=None", "d=smollm2-135m", "e=[1, 2]", "f-g='x'"]) == {
        "a": 3,
        "b": 0.5,
        "c": None,
        "d": "smollm2-135m",
        "e": [1, 2],
        "f_g": "x",
    }


def test_target_forms_resolve_to_tasks(monkeypatch):
    import models

    task = resolve_target(f"{TINY}:tiny", {"num_tokens": 2, "weight": 0.5})
    assert (task.name, task.site, task.exact) == ("tiny", "s", "enumerate")
    wrapped = resolve_target(f"{TINY}:program")
    assert (wrapped.name, wrapped.site, wrapped.exact) == ("program", "s", None)
    assert wrapped.lm.vocab_size == 5
    assert resolve_target(f"{TINY}:program", exact="enumerate").exact == "enumerate"
    # module:attr with the current directory importable, and task names with _ or -
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(HERE)
    assert resolve_target("tiny_targets:TASK").name == "tiny"
    assert models.TASKS["toxicity-threshold"] is resolve_task_factory("toxicity_threshold")


def resolve_task_factory(name: str):
    """The factory a task name resolves to (without building it)."""
    from lmppl.cli import targets as cli

    tasks = cli._task_names()
    return tasks[name.replace("_", "-")]


def test_models_are_found_from_another_directory(monkeypatch, tmp_path):
    """Task names work outside the checkout: ``models`` is found beside ``lmppl``."""
    from lmppl.cli import targets as cli

    root = Path(lmppl.__file__).resolve().parent.parent
    assert cli.repo_root() == root
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "path", [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != root]
    )
    for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        monkeypatch.delitem(sys.modules, name)
    tasks = cli._task_names()
    assert "infilling-small" in tasks
    assert Path(sys.modules["models"].__file__).resolve() == root / "models" / "__init__.py"


# ----------------------------------------------------------------- sample


def test_sample_prints_log_z_and_writes_json(capsys, tmp_path):
    out_file = tmp_path / "result.json"
    code, out, err = run(
        capsys,
        "sample",
        f"{TINY}:program",
        "--particles",
        16,
        "--seed",
        3,
        "--show",
        3,
        "--out",
        out_file,
    )
    assert code == 0, err
    record = json.loads(out_file.read_text())
    assert record["num_particles"] == 16 and record["backend"] == "SMC"
    assert np.asarray(record["samples"]).shape == (16, 3)
    assert math.isclose(sum(record["weights"]), 1.0, rel_tol=1e-5)
    printed = re.search(r"log Ẑ = (-?\d+\.\d+)\s+ESS = (\d+\.\d) of 16", out)
    assert printed, out
    assert float(printed.group(1)) == pytest.approx(record["log_marginal"], abs=1e-4)
    shown = re.findall(r"^\s+(\d\.\d{4})  ×(\d+)", out, flags=re.M)
    assert 1 <= len(shown) <= 3
    weights = [float(w) for w, _ in shown]
    assert weights == sorted(weights, reverse=True)
    # the heaviest distinct sequence's weight is the sum over its particles
    rows = [tuple(r) for r in record["samples"]]
    totals = {}
    for row, weight in zip(rows, record["weights"], strict=True):
        totals[row] = totals.get(row, 0.0) + weight
    assert weights[0] == pytest.approx(max(totals.values()), abs=1e-4)


def test_sample_exact_backend_takes_factory_options(capsys, tmp_path):
    out_file = tmp_path / "exact.json"
    code, out, err = run(
        capsys,
        "sample",
        f"{TINY}:tiny",
        "--set",
        "num_tokens=2",
        "--set",
        "weight=0.5",
        "--backend",
        "exact",
        "--out",
        out_file,
    )
    assert code == 0, err
    record = json.loads(out_file.read_text())
    assert np.asarray(record["samples"]).shape == (25, 2)  # 5^2 sequences
    # weight 0.5 makes φ ≡ 1/2, so log Z = log 1/2 exactly
    assert record["log_marginal"] == pytest.approx(math.log(0.5), abs=1e-5)
    assert f"log Z = {math.log(0.5):.4f} (exact)" in out


# ----------------------------------------------------------------- train-twist, bounds


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CTL-trained MLP twist for the tiny task (T = 2), from ``lmppl train-twist``."""
    folder = tmp_path_factory.mktemp("twist")
    code = main(
        [
            "train-twist",
            f"{TINY}:TASK",
            "--method",
            "ctl",
            "--hidden-size",
            "8",
            "--steps",
            "6",
            "--particles",
            "8",
            "--lr",
            "0.05",
            "--eval-runs",
            "3",
            "--out",
            str(folder),
        ]
    )
    assert code == 0
    return folder


def test_train_twist_writes_a_checkpoint_and_history(trained):
    info = lmppl.twists.read_twist_info(trained / "twist.npz")
    assert info["class"] == "MLPTwist"
    assert info["options"]["hidden_size"] == 8 and info["options"]["output"] == "log"
    assert info["metadata"]["method"] == "ctl" and info["metadata"]["site"] == "s"
    assert info["step"] == 6 and len(info["history"]["loss"]) == 6
    # evaluated every 6 // 5 = 1 step against exact (enumerated) samples; the best is kept
    bounds = info["metadata"]["bounds"]
    assert (
        bounds["K"] == 64
        and bounds["runs"] == 3
        and 1 <= bounds["step"] <= 6
        and info["metadata"]["batch"] == "mixture"
    )
    assert info["metadata"]["exact_positives"] == 0  # positives from the mixture batch by default
    assert bounds["lower"] <= bounds["upper"] + 0.2 and np.isfinite(bounds["gap"])
    assert len(info["history"]["bound_gap"]) == 6
    with open(trained / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    twist = lmppl.twists.load_twist(trained / "twist.npz", small_lm())
    assert any(np.abs(np.asarray(leaf)).max() > 0 for leaf in twist.params["layers"][-1].values())


def test_sample_with_twist_uses_twisted_smc_and_writes_arviz_netcdf(capsys, trained, tmp_path):
    import arviz

    out_file = tmp_path / "twisted.nc"
    code, out, err = run(
        capsys, "sample", f"{TINY}:TASK", "--twist", trained, "--particles", 8, "--out", out_file
    )
    assert code == 0, err
    assert f"twist: {trained / 'twist.npz'} (MLPTwist, trained with ctl on tiny, step 6)" in out
    idata = arviz.from_netcdf(out_file)
    assert idata.posterior.attrs["backend"] == "TwistedSMC"
    assert idata.posterior["s"].shape == (1, 8, 2)
    # ArviZ reads draws as equally weighted: the default file holds a resample (#15, 9).
    assert idata.posterior.attrs["draws"] == "resampled (equal weights)"
    assert "particle" in idata.sample_stats and "equally weighted resample" in out
    weighted_file = tmp_path / "weighted.nc"
    argv = ["sample", f"{TINY}:TASK", "--twist", trained, "--particles", 8]
    code, out, err = run(capsys, *argv, "--out", weighted_file, "--weighted")
    assert code == 0, err
    idata = arviz.from_netcdf(weighted_file)
    assert idata.posterior.attrs["draws"] == "weighted particles"
    assert float(idata.sample_stats["weight"].sum()) == pytest.approx(1.0, rel=1e-5)
    code, _, err = run(capsys, *argv, "--weighted")
    assert code == 2
    assert_one_line_error(err, "--weighted applies to --out FILE.nc")
    code, _, err = run(capsys, "sample", f"{TINY}:TASK", "--twist", trained, "--backend", "smc")
    assert code == 2
    assert_one_line_error(err, "--twist is used by --backend twisted")


def test_sample_warns_when_the_twist_file_records_bounds_far_apart(capsys, trained, tmp_path):
    info = lmppl.twists.read_twist_info(trained / "twist.npz")
    lm = small_lm()
    twist = lmppl.twists.load_twist(trained / "twist.npz", lm)
    metadata = {
        **info["metadata"],
        "bounds": {"K": 64, "step": 6, "lower": -3.0, "upper": -1.0, "gap": 2.0},
    }
    lmppl.twists.save_twist(tmp_path / "twist.npz", twist, lm=lm, step=6, metadata=metadata)
    code, out, err = run(capsys, "sample", f"{TINY}:TASK", "--twist", tmp_path, "--particles", 8)
    assert code == 0, err
    assert "warning: this twist's bounds on log Z were measured 2 nats apart at K=64" in out
    code, out, err = run(capsys, "sample", f"{TINY}:TASK", "--twist", trained, "--particles", 8)
    assert code == 0 and "warning" not in out


def test_twist_of_another_model_is_refused(capsys, tmp_path):
    other = lmppl.twists.LinearTwist(table_lm(4, context_length=12))
    lmppl.twists.save_twist(tmp_path / "twist.npz", other, lm=table_lm(4, context_length=12))
    code, _, err = run(capsys, "sample", f"{TINY}:TASK", "--twist", tmp_path)
    assert code == 1
    assert_one_line_error(err, "trained on table-6", "vocab 6")


def test_twist_folder_of_the_learn_twists_recipe_loads(capsys, tmp_path):
    """A bare ``twist.npz`` beside the recipe's ``config.json`` is rebuilt from that config."""
    twist = lmppl.twists.MLPTwist(small_lm(), 4)
    lmppl.twists.save_checkpoint(tmp_path / "twist.npz", twist.params)  # no class record
    (tmp_path / "config.json").write_text(
        json.dumps({"task": "tiny", "method": "rl", "twist": "mlp", "hidden_size": 4})
    )
    code, out, err = run(capsys, "sample", f"{TINY}:TASK", "--twist", tmp_path, "--particles", 4)
    assert code == 0, err
    assert "(MLPTwist, trained with rl on tiny, step 0)" in out
    (tmp_path / "config.json").write_text(json.dumps({"twist": "mlp", "hidden_size": 5}))
    code, _, err = run(capsys, "sample", f"{TINY}:TASK", "--twist", tmp_path)
    assert code == 1
    assert_one_line_error(err, "has shape")


def test_bounds_writes_table_and_figure(capsys, trained, tmp_path):
    prefix = tmp_path / "bounds" / "tiny"
    code, out, err = run(
        capsys,
        "bounds",
        f"{TINY}:TASK",
        "--particles",
        4,
        "--runs",
        3,
        "--methods",
        "twisted",
        "--twist",
        trained,
        "--out",
        prefix,
    )
    assert code == 0, err
    assert re.search(r"^exact log Z = -?\d+\.\d{3}$", out, flags=re.M), out
    assert f"figure: {prefix}.png" in out
    assert (prefix.parent / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (prefix.parent / "tiny.md").read_text().startswith("# log Z bounds")
    with open(prefix.parent / "tiny.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], int(r["K"])) for r in rows] == [("Twisted SMC", 4)]
    assert all(int(r["runs"]) == 3 for r in rows)
    assert all(math.isfinite(float(r["lower"])) and math.isfinite(float(r["upper"])) for r in rows)


def test_plain_program_bounds_with_enumeration(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "bounds",
        f"{TINY}:program",
        "--exact",
        "enumerate",
        "--particles",
        1,
        2,
        "--runs",
        2,
        "--methods",
        "is",
        "--out",
        tmp_path / "p.png",
    )
    assert code == 0, err
    assert "exact samples: 2 by enumerate" in out
    assert f"figure: {tmp_path / 'p.png'}" in out
    with open(tmp_path / "p.csv") as handle:
        assert [int(r["K"]) for r in csv.DictReader(handle)] == [1, 2]


def test_conditional_twist_trains_and_samples(capsys, tmp_path):
    """Infilling-style task: the twist reads the observed ending (condition_length 2)."""
    code, out, err = run(
        capsys,
        "train-twist",
        f"{TINY}:tiny_infilling",
        "--method",
        "fudge",
        "--twist",
        "linear",
        "--steps",
        3,
        "--particles",
        8,
        "--out",
        tmp_path,
    )
    assert code == 0, err
    assert "LinearTwist (log_sigmoid) with fudge" in out
    info = lmppl.twists.read_twist_info(tmp_path / "twist.npz")
    assert info["options"]["condition_length"] == 2
    assert info["options"]["output"] == "log_sigmoid"
    code, out, err = run(
        capsys,
        "sample",
        f"{TINY}:tiny_infilling",
        "--set",
        "ending=cb",
        "--twist",
        tmp_path,
        "--particles",
        8,
    )
    assert code == 0, err
    assert re.search(r"log Ẑ = -?\d+\.\d+", out)


# ----------------------------------------------------------------- the console script


def test_console_script_entry_point(tmp_path):
    """The installed ``lmppl`` script exits with main()'s status (2 here) and one line."""
    script = shutil.which("lmppl", path=str(Path(sys.executable).parent)) or shutil.which("lmppl")
    if script is None:
        pytest.fail("the lmppl console script is not installed (pip install -e .)")
    bad = subprocess.run(
        [script, "sample", f"{TINY}:tiny", "--set", "colour=red"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert_one_line_error(bad.stderr, "unknown option 'colour'")


# ----------------------------------------------------------------- python -m lmppl


@pytest.mark.slow
def test_main_job_runs_end_to_end_at_a_small_size(capsys, tmp_path):
    """``python -m lmppl`` (``make run``) on stories260K: every step prints, the figure is
    written, and the bounds table is the one of the run."""
    from lmppl.__main__ import main as main_job

    prefix = tmp_path / "main" / "bounds"
    argv = ["--model", "stories260k", "--target-class", "2", "--tokens", "3", "--particles", "8"]
    argv += ["--bounds-particles", "4", "--runs", "2", "--out", str(prefix)]
    assert main_job(argv) == 0
    out = capsys.readouterr().out
    assert "1. plain samples from p0" in out and out.count("  'I bought this") == 4
    assert re.search(r"2\. SMC, 8 particles .*log Ẑ = -?\d+\.\d{3}, ESS = \d+\.\d of 8", out)
    assert "3. bounds on log Z: 2 exact samples of σ by rejection" in out
    assert re.search(r"log Z ∈ \[-?\d+\.\d{3}, -?\d+\.\d{3}\] at K = 4", out)
    assert f"figure: {prefix}.png" in out
    assert (tmp_path / "main" / "bounds.png").is_file()
    with open(tmp_path / "main" / "bounds.csv") as handle:
        assert [int(r["K"]) for r in csv.DictReader(handle)] == [4]


def test_train_twist_checkpoints_and_resumes(capsys, tmp_path):
    common = ["train-twist", f"{TINY}:TASK", "--method", "ctl", "--hidden-size", "4"]
    common += ["--particles", "4", "--eval-every", "0", "--out", str(tmp_path)]
    code, out, err = run(capsys, *common, "--steps", 4, "--checkpoint-every", 2, "--positives", 32)
    assert code == 0, err
    assert "positives: 32 exact samples of σ by enumerate" in out
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.npz")) == [
        "step_0000002.npz",
        "step_0000004.npz",
    ]
    code, _, err = run(capsys, *common, "--steps", 6)
    assert code == 2
    assert_one_line_error(err, "holds checkpoints of an earlier run: pass --resume")
    code, out, err = run(capsys, *common, "--steps", 6, "--resume", "--positives", 32)
    assert code == 0, err
    assert "resuming from" in out and "step_0000004.npz" in out
    info = lmppl.twists.read_twist_info(tmp_path / "twist.npz")
    assert info["history"]["step"] == [1, 2, 3, 4, 5, 6]
    assert info["metadata"]["exact_positives"] == 32


def test_train_twist_transformer_body_trains_saves_and_samples(capsys, tmp_path):
    argv = ["train-twist", f"{TINY}:TASK", "--method", "ctl", "--twist", "transformer"]
    argv += ["--steps", 3, "--particles", 4, "--eval-every", 0, "--out", tmp_path]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "training TransformerTwist (log) with ctl" in out
    info = lmppl.twists.read_twist_info(tmp_path / "twist.npz")
    assert info["class"] == "TransformerTwist" and info["options"]["conditional"] is False
    code, out, err = run(capsys, "sample", f"{TINY}:TASK", "--twist", tmp_path, "--particles", 4)
    assert code == 0, err
    assert "(TransformerTwist, trained with ctl on tiny, step 3)" in out


def test_unwritable_out_fails_before_any_compute(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cases = [
        (["sample", f"{TINY}:TASK", "--out", blocker / "run.json"], "is a file, not a folder"),
        (["sample", f"{TINY}:TASK", "--out", tmp_path], "must end in .json or .nc"),
        (["train-twist", f"{TINY}:TASK", "--method", "ctl", "--out", blocker], "is a file"),
        (["bounds", f"{TINY}:TASK", "--exact", "enumerate", "--out", blocker / "b"], "is a file"),
    ]
    for argv, fragment in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert_one_line_error(err, fragment)
        assert "exact samples" not in out and "training" not in out


def test_sample_warns_when_the_twist_was_trained_for_another_task(capsys, trained):
    """A twist file records its task; using it on another target says so (issue #15)."""
    code, out, err = run(capsys, "sample", f"{TINY}:program", "--twist", trained, "--particles", 4)
    assert code == 0, err
    assert "warning: this twist was trained on" in out
    code, out, _ = run(capsys, "sample", f"{TINY}:TASK", "--twist", trained, "--particles", 4)
    assert code == 0 and "trained on" not in out.replace("trained with", "")


@pytest.mark.parametrize("option", [["--show", "-1"], ["--particles", "0"]])
def test_sample_refuses_negative_counts(capsys, option):
    code, _, err = run(capsys, "sample", f"{TINY}:TASK", *option)
    assert code == 2
    assert_one_line_error(err, "--show must be >= 0 and --particles >= 1")
