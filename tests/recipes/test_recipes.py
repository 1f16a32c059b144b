"""Smoke runs of the recipes ``inference/learn_twists.py`` and ``inference/evaluate.py``.

Tiny settings (a few steps, few particles, two K values) on stories260K: the outputs must
exist, parse, and hold finite numbers; a learned twist must load back and run.
"""

import csv
import json

import jax
import numpy as np
import pytest

import lmppl
from inference import evaluate, learn_twists


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def check_twist_directory(directory, method):
    for name in ("twist.npz", "config.json", "history.json", "history.csv", "curves.png"):
        assert (directory / name).is_file(), name
    assert not (directory / "checkpoints").exists()
    config = json.loads((directory / "config.json").read_text())
    assert config["method"] == method
    history = json.loads((directory / "history.json").read_text())
    steps = config["micro_steps"]
    assert history["step"] == list(range(1, steps + 1))
    for name in ("loss", "ess", "log_marginal", "grad_norm"):
        assert len(history[name]) == steps and np.all(np.isfinite(history[name])), name
    rows = read_csv(directory / "history.csv")
    assert len(rows) == steps and np.isfinite(float(rows[-1]["loss"]))
    return config


def check_evaluation(out, methods, ks):
    report = (out / "report.md").read_text()
    assert "python inference/evaluate.py" in report and "KL(q‖σ)" in report
    assert (out / "bounds.png").stat().st_size > 0
    kl = read_csv(out / "kl.csv")
    assert [row["proposal"] for row in kl][0] == "p0 (no twist)" and len(kl) == 1 + len(methods)
    for row in kl:
        for name in ("kl_q_sigma", "kl_sigma_q", "kl_q_sigma_half_width", "kl_sigma_q_half_width"):
            assert np.isfinite(float(row[name])), (row["proposal"], name)
    bounds = read_csv(out / "bounds.csv")
    assert {row["method"] for row in bounds} == {
        "SIS (p0)",
        "SMC (p0)",
        *(evaluate.twisted_name(m) for m in methods),
    }
    for row in bounds:
        assert np.isfinite(float(row["lower"])) and np.isfinite(float(row["upper"])), row
    gaps = read_csv(out / "gaps.csv")
    assert [int(row["K"]) for row in gaps] == ks


NO_CACHE = ["--compilation-cache", ""]  # keep JAX's global config untouched in the test process


@pytest.mark.slow
def test_learn_twists_and_evaluate_on_small_infilling(tmp_path):
    """Conditional target: new endings every step (exact positives), then bounds and KL."""
    twists = tmp_path / "twists"
    learn_twists.main(
        ["--task", "infilling-small", "--twist", "linear", "--particles", "8", "--method", "ctl"]
        + ["--steps", "2", "--conditions-per-step", "2", "--train-conditions", "16"]
        + ["--out", str(twists), *NO_CACHE]
    )
    directory = twists / "infilling_T2_c1" / "ctl_linear"
    config = check_twist_directory(directory, "ctl")
    assert config["micro_steps"] == 4 and config["conditions_per_step"] == 2
    assert config["positives"] == "exact" and "--method ctl" in config["command"]
    twist, _ = learn_twists.load_learned_twist(directory)
    task = learn_twists.build_task("infilling-small")
    result = lmppl.infer.TwistedSMC(
        task.program, 8, twists={task.site: twist}, twist_condition=task.twist_condition
    ).run(jax.random.key(0), *task.args)
    assert np.isfinite(float(result.log_marginal))

    out = tmp_path / "evaluation"
    evaluate.main(
        ["--task", "infilling-small", "--twists", str(twists), "--methods", "ctl"]
        + ["--twist", "linear", "--particles", "2", "--runs", "2", "--conditions", "3"]
        + ["--seeds", "2", "--kl-samples", "4", "--no-train", "--out", str(out), *NO_CACHE]
    )
    check_evaluation(out, ["ctl"], [2])
    per_ending = read_csv(out / "bounds_by_condition.csv")
    assert len(per_ending) >= 3 and all(np.isfinite(float(r["gap"])) for r in per_ending)


@pytest.mark.slow
def test_evaluate_trains_missing_twists_on_a_classifier_target(tmp_path):
    """Rejection-sampled target (profanity classifier, 4 tokens); FUDGE's twist (a
    probability, log-sigmoid output) is trained inline."""
    twists = tmp_path / "twists"
    out = tmp_path / "evaluation"
    evaluate.main(
        ["--task", "toxicity-classifier", "--task-option", "num_tokens=4", "--methods", "fudge"]
        + ["--twist", "linear", "--twists", str(twists), "--steps", "2"]
        + ["--train-particles", "8", "--particles", "2", "--runs", "2", "--exact-samples", "10"]
        + ["--seeds", "2", "--kl-samples", "4", "--out", str(out), *NO_CACHE]
    )
    config = check_twist_directory(twists / "toxicity_classifier" / "fudge_linear", "fudge")
    assert config["task_options"] == {"num_tokens": 4} and config["steps"] == 2
    check_evaluation(out, ["fudge"], [2])
    assert "toxicity-classifier --task-option num_tokens=4" in (out / "report.md").read_text()


@pytest.mark.slow
def test_kl_table_over_training_seeds(tmp_path):
    """``learn_twists --seeds`` writes one folder per seed; ``evaluate --kl-only
    --train-seeds`` gives the KL table over them (exact log Z by enumeration, T = 1)."""
    twists = tmp_path / "twists"
    task = [
        "--task",
        "infilling",
        "--task-option",
        "num_tokens=1",
        "--task-option",
        "num_observed=1",
    ]
    learn_twists.main(
        [*task, "--twist", "linear", "--particles", "4", "--method", "ctl", "--seeds", "0", "1"]
        + ["--steps", "2", "--conditions-per-step", "2", "--train-conditions", "8"]
        + ["--out", str(twists), *NO_CACHE]
    )
    for seed in (0, 1):
        config = check_twist_directory(
            twists / "infilling_T1_c1" / "ctl_linear" / f"seed{seed}", "ctl"
        )
        assert config["seed"] == seed and "--seeds 0 1" in config["command"]
    assert not (twists / "infilling_T1_c1" / "ctl_linear" / "twist.npz").exists()

    out = tmp_path / "kl"
    summary = evaluate.main(
        [*task, "--twists", str(twists), "--methods", "ctl", "--twist", "linear"]
        + ["--kl-only", "--train-seeds", "0", "1", "--log-z", "exact", "--conditions", "3"]
        + ["--seeds", "2", "--kl-samples", "4", "--no-train", "--out", str(out), *NO_CACHE]
    )
    assert [row["proposal"] for row in summary] == ["p0 (no twist)", "twisted / CTL"]
    assert summary[1]["interval_over"] == "training seeds" and summary[1]["seeds"] == 2
    rows = read_csv(out / "kl_seeds.csv")
    assert [(r["proposal"], r["train_seed"]) for r in rows] == [
        ("p0 (no twist)", "-"),
        ("p0 (no twist)", "-"),
        ("twisted / CTL", "0"),
        ("twisted / CTL", "1"),
    ]
    for row in rows:
        assert np.isfinite(float(row["kl_q_sigma"])) and np.isfinite(float(row["kl_sigma_q"]))
    ctl = [float(r["kl_q_sigma"]) for r in rows if r["train_seed"] != "-"]
    assert np.isclose(float(read_csv(out / "kl.csv")[1]["kl_q_sigma"]), np.mean(ctl))
    report = (out / "report.md").read_text()
    assert "--kl-only" in report and "exact, by enumerating" in report
    assert not (out / "bounds.csv").exists()


def test_train_seeds_needs_kl_only(tmp_path):
    with pytest.raises(SystemExit):
        evaluate.main(
            [
                "--task",
                "infilling-small",
                "--train-seeds",
                "0",
                "1",
                "--out",
                str(tmp_path),
                *NO_CACHE,
            ]
        )


@pytest.mark.slow
def test_kl_only_with_stored_exact_samples_and_a_given_log_z(tmp_path):
    """``--exact-file`` reads stored exact samples (no rejection) and ``--log-z-value``
    fixes log Z (no bounds): the report and the table use both."""
    twists = tmp_path / "twists"
    task = ["--task", "toxicity-classifier", "--task-option", "num_tokens=3"]
    learn_twists.main(
        [*task, "--twist", "linear", "--particles", "4", "--method", "ctl", "--seeds", "0", "1"]
        + ["--steps", "2", "--out", str(twists), *NO_CACHE]
    )
    stored = tmp_path / "exact.npz"
    samples = np.arange(24, dtype=np.int32).reshape(8, 3) + 100
    np.savez(stored, samples=samples, draws=np.int64(80))
    out = tmp_path / "kl"
    summary = evaluate.main(
        [*task, "--twists", str(twists), "--methods", "ctl", "--twist", "linear", "--kl-only"]
        + ["--train-seeds", "0", "1", "--exact-file", str(stored), "--exact-samples", "6"]
        + ["--log-z-value", "-2.5", "--seeds", "2", "--kl-samples", "4", "--no-train"]
        + ["--out", str(out), *NO_CACHE]
    )
    assert [row["proposal"] for row in summary] == ["p0 (no twist)", "twisted / CTL"]
    for row in summary:
        assert np.isfinite(row["kl_q_sigma"]) and np.isfinite(row["kl_sigma_q"])
    report = (out / "report.md").read_text()
    assert "Exact samples: 6 by rejection" in report and "80 draws" in report
    assert "log Z = -2.500 (given by --log-z-value)" in report
    assert not (out / "log_z_bounds.csv").exists()


def test_load_exact_reads_a_stored_pool(tmp_path):
    task = learn_twists.build_task("toxicity-threshold", options={"num_tokens": 3})
    path = tmp_path / "pool.npz"
    np.savez(path, samples=np.ones((5, 3), np.int32), draws=np.int64(1000))
    exact = evaluate.load_exact(task, path, 4)
    assert exact.samples.shape == (4, 3) and exact.site == task.site
    assert exact.num_draws == 1000 and np.isclose(exact.acceptance_rate, 5 / 1000)
    np.savez(path, samples=np.ones((5, 3), np.int32))
    assert evaluate.load_exact(task, path).num_samples == 5


@pytest.mark.parametrize("option", [["--log-z-value", "-1"], ["--exact-file", "x.npz"]])
def test_given_log_z_and_exact_file_need_kl_only(tmp_path, option):
    with pytest.raises(SystemExit):
        evaluate.main(["--task", "toxicity-threshold", *option, "--out", str(tmp_path), *NO_CACHE])
