"""Can a learned twist be trusted? The old (SIS-positive) and the default CTL recipe against
an independent reference, on real-model targets (issue #11).

For each task the script computes

* a reference for log Z from plain importance sampling with p0 (``--reference-draws``
  draws, ≥ 300k by default; its standard error by the delta method over batches of 4096);
* exact samples of σ by rejection (``Task.exact_samples``), cached in ``--out`` and split into
  ``--exact`` held out for the final upper bounds, ``--validation`` for the evaluations
  during training and ``--positives``;
* for each recipe an MLP twist trained with CTL (``lmppl.twists.fit``):
  ``old``: ``batch="proposal"`` (positives and negatives from the SIS batch of the twisted
  proposal, the last parameters); ``default``: ``batch="mixture"`` (p0 rollouts pooled
  into the batch with balance-heuristic weights) and ``eval_every`` (the bounds measured
  during training on ``--validation`` exact samples, the best evaluated parameters kept);
  ``exact``: the default with ``--positives`` exact samples of σ as CTL's positives
  (``target_sampler=lmppl.twists.pool_sampler(...)``);
* ``--twist transformer``: a trainable copy of the LM body (``TransformerTwist``) instead of
  the MLP head on the frozen LM;
* twisted SMC with K particles (resampling every step): the lower bound E[log Ẑ_K] and the
  conditional-SMC upper bound on the exact samples (``lmppl.evaluation.log_z_bounds``),
  ``--runs`` runs each, with 95% intervals.

It writes ``trust.md`` / ``trust.csv`` (one row per task and recipe) and ``trust.png``
into ``--out``:

    python inference/trust_twists.py --out inference/results/trust
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import lmppl  # noqa: E402
import models  # noqa: E402

RECIPES = {
    "old": {"batch": "proposal"},
    "default": {"batch": "mixture"},
    "exact": {"batch": "mixture"},
}
TASKS = ("infilling-fixed", "toxicity-threshold", "toxicity-classifier")


def reference_log_z(task, draws: int, rng_key, batch: int = 4096, chunk: int = 8):
    """``(log Ẑ, standard error)`` of plain importance sampling with ``draws`` p0 draws."""
    sampler = lmppl.infer.ImportanceSampling(task.program, batch)
    runs = max(2, -(-draws // batch))
    values = []
    for start in tqdm(range(0, runs, chunk), desc=f"{task.name}: IS reference", leave=False):
        count = min(chunk, runs - start)
        key = jax.random.fold_in(rng_key, start)
        values.append(np.asarray(sampler.log_marginals(key, count, *task.args, **task.kwargs)))
    log_z = np.concatenate(values).astype(np.float64)
    top = log_z.max()
    ratios = np.exp(log_z - top)
    estimate = top + np.log(ratios.mean())
    error = ratios.std(ddof=1) / np.sqrt(len(ratios)) / ratios.mean()
    return float(estimate), float(error), runs * batch


def train(task, recipe: str, options, rng_key, validation, positives):
    if options.twist == "transformer":
        twist = lmppl.twists.TransformerTwist(task.lm)
    else:
        twist = lmppl.twists.MLPTwist(task.lm, hidden_size=options.hidden, seed=options.seed)
    extra = dict(RECIPES[recipe])
    if recipe != "old":
        extra.update(
            eval_every=options.eval_every,
            eval_particles=options.eval_particles,
            eval_runs=options.eval_runs,
            exact_samples=validation,
        )
    if recipe == "exact":
        extra.update(target_sampler=lmppl.twists.pool_sampler(positives))
    began = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", lmppl.twists.TwistGapWarning)
        trained, history = lmppl.twists.fit(
            task.program,
            twist,
            "ctl",
            num_steps=options.steps,
            num_particles=options.particles,
            learning_rate=options.lr,
            rng_key=rng_key,
            args=task.args,
            kwargs=task.kwargs,
            **extra,
        )
    warned = any(issubclass(w.category, lmppl.twists.TwistGapWarning) for w in caught)
    return trained, history, time.perf_counter() - began, warned


def exact_pool(task, count: int, rng_key, out: Path, suffix: str):
    """``count`` exact samples of σ by rejection, cached in ``out`` (rejection from p0 is
    the slow part at low acceptance; a rerun with more samples draws only the rest)."""
    cache = out / f"exact_{task.name}{suffix}.npz"
    have = None
    if cache.is_file():
        stored = np.load(cache)
        have = (stored["samples"], int(stored["draws"]))
        if len(have[0]) >= count:
            return lmppl.evaluation.ExactSamples(
                have[0][:count],
                task.site,
                num_draws=have[1],
                acceptance_rate=len(have[0]) / have[1],
            )
    start = 0 if have is None else len(have[0])
    bar = tqdm(total=count - start, desc=f"{task.name}: exact samples", leave=False)

    def progress(accepted: int, drawn: int) -> None:
        bar.update(min(accepted, count - start) - bar.n)
        bar.set_postfix(drawn=drawn)

    fresh = task.exact_samples(
        jax.random.fold_in(rng_key, start),
        count - start,
        batch_size=4096,
        max_draws=50_000_000,
        progress=progress,
    )
    bar.close()
    samples = fresh.samples if have is None else np.concatenate([have[0], fresh.samples])
    draws = fresh.num_draws + (0 if have is None else have[1])
    np.savez(cache, samples=samples, draws=draws)
    return lmppl.evaluation.ExactSamples(
        samples, task.site, num_draws=draws, acceptance_rate=len(samples) / draws
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(models.TASKS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--reference-draws", type=int, default=327_680)
    parser.add_argument(
        "--exact", type=int, default=64, help="held-out exact samples for the upper bounds"
    )
    parser.add_argument(
        "--validation", type=int, default=16, help="exact samples for fit's evaluations"
    )
    parser.add_argument(
        "--positives", type=int, default=512, help="exact positives (recipe 'exact')"
    )
    parser.add_argument(
        "--threshold-limit",
        type=float,
        default=-1.0,
        help="toxicity-threshold: σ ∝ p0 · 1[score < limit] (−1: P ≈ 2e-3, a reference "
        "log Z to ±0.04 from 327k draws; the paper's −5 has P ≈ 3e-5)",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument(
        "--twist",
        choices=("mlp", "transformer"),
        default="mlp",
        help="MLP head on the frozen LM (width --hidden) or a trainable copy of its body",
    )
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-particles", type=int, default=256, help="K of fit's evaluations")
    parser.add_argument(
        "--eval-runs", type=int, default=8, help="runs per bound in fit's evaluations"
    )
    parser.add_argument("--K", type=int, default=256)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPOSITORY / "inference/results/trust")
    parser.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="CSV",
        help="no runs: draw the rows of earlier runs' trust.csv files in one figure "
        "(--out/trust.png; the recipe label gets the run's folder name)",
    )
    options = parser.parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    if options.combine:
        return combine(options.combine, options.out / "trust.png")
    command = "python inference/trust_twists.py " + shlex.join(argv or sys.argv[1:])
    key = jax.random.key(options.seed)
    rows = []
    for task_index, name in enumerate(options.tasks):
        settings = {"limit": options.threshold_limit} if name == "toxicity-threshold" else {}
        task = models.TASKS[name](**settings)
        suffix = f"_limit{options.threshold_limit:g}" if settings else ""
        task_key = jax.random.fold_in(key, task_index)
        began = time.perf_counter()
        cache = options.out / f"reference_{name}{suffix}_{options.reference_draws}.json"
        if cache.is_file():
            log_z, log_z_error, draws = json.loads(cache.read_text())
        else:
            log_z, log_z_error, draws = reference_log_z(
                task, options.reference_draws, jax.random.fold_in(task_key, 0)
            )
            cache.write_text(json.dumps([log_z, log_z_error, draws]))
        needed = options.exact + options.validation
        if "exact" in options.recipes:
            needed += options.positives
        pool = exact_pool(task, needed, jax.random.fold_in(task_key, 1), options.out, suffix)
        exact = pool._replace(samples=pool.samples[: options.exact])
        validation = pool.samples[options.exact : options.exact + options.validation]
        positives = pool.samples[options.exact + options.validation :]
        print(
            f"{name}: IS reference log Z = {log_z:.4f} ± {log_z_error:.4f} ({draws:,} draws); "
            f"{pool.num_samples} exact samples ({options.exact} held out, {len(validation)} "
            f"validation, {len(positives)} positives), acceptance {pool.acceptance_rate:.3g} "
            f"({time.perf_counter() - began:.0f}s)",
            flush=True,
        )
        for recipe in options.recipes:
            trained, history, seconds, warned = train(
                task, recipe, options, jax.random.fold_in(task_key, 2), validation, positives
            )
            table = lmppl.evaluation.log_z_bounds(
                task.program,
                lambda program, k, trained=trained, site=task.site: lmppl.infer.TwistedSMC(
                    program, k, twists={site: trained}
                ),
                exact,
                [options.K],
                options.runs,
                jax.random.fold_in(task_key, 3),
                args=task.args,
                kwargs=task.kwargs,
                name=f"CTL/{recipe}",
            )
            row = table.rows[0]
            record = {
                "task": name,
                "recipe": recipe,
                "twist": options.twist,
                "reference": log_z,
                "reference_se": log_z_error,
                "reference_draws": draws,
                "K": options.K,
                "lower": row.lower.mean,
                "lower_ci": row.lower.half_width,
                "upper": row.upper.mean,
                "upper_ci": row.upper.half_width,
                "lower_minus_reference": row.lower.mean - log_z,
                "gap": row.gap,
                "train_ess_last": float(np.mean(history["ess"][-20:])),
                "best_step": history.get("best_step", options.steps),
                "warned": warned,
                "train_seconds": seconds,
            }
            rows.append(record)
            print(
                f"  {recipe:8s} lower {record['lower']:.3f} ± {record['lower_ci']:.3f}  upper "
                f"{record['upper']:.3f} ± {record['upper_ci']:.3f}  lower − ref "
                f"{record['lower_minus_reference']:+.3f}  gap {record['gap']:.3f}  train ESS "
                f"{record['train_ess_last']:.2f}  warned={warned}  ({seconds:.0f}s)",
                flush=True,
            )
            write(rows, options, command)
    return 0


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def combine(paths: list[Path], figure: Path) -> int:
    """One figure from several runs' ``trust.csv`` (e.g. different twists or steps)."""
    rows = []
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                numbers = {k: _number(v) for k, v in row.items()}
                label = f"{row['recipe']}, {path.parent.name.replace('_', ' ')}"
                rows.append({**row, **numbers, "recipe": label, "twist": "mlp"})  # label says it
    plot(rows, figure, int(rows[0]["K"]))
    print(f"wrote {figure} ({len(rows)} rows)")
    return 0


def write(rows, options, command: str) -> None:
    with open(options.out / "trust.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Learned twists against an independent reference (stories260K, CPU)",
        "",
        f"`{command}`",
        "",
        (
            f"MLP twist (width {options.hidden})"
            if options.twist == "mlp"
            else "TransformerTwist (a trainable copy of the LM body)"
        )
        + f", CTL, {options.steps} Adam steps at lr "
        f"{options.lr}, N = {options.particles}; twisted SMC with K = {options.K}, "
        f"{options.runs} runs per bound (95% intervals); upper bounds from conditional SMC on "
        'exact samples (rejection). `old`: SIS positives (`batch="proposal"`), last '
        'parameters. `default`: `fit`\'s defaults (`batch="mixture"`) with '
        f"`eval_every={options.eval_every}` (best evaluated parameters). `exact`: the default "
        f"with {options.positives} exact positives (`target_sampler=pool_sampler(...)`); the "
        "evaluations during training use separate exact samples from the final upper bounds.",
        "",
        "| task | recipe | twist | IS reference log Z | lower (K) | upper (K) | lower − ref | gap "
        "| train ESS/N | warned |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['recipe']} | {r['twist']} | {r['reference']:.3f} ± {r['reference_se']:.3f} "
            f"| {r['lower']:.3f} ± {r['lower_ci']:.3f} | {r['upper']:.3f} ± {r['upper_ci']:.3f} "
            f"| {r['lower_minus_reference']:+.3f} | {r['gap']:.3f} | {r['train_ess_last']:.2f} "
            f"| {'yes' if r['warned'] else 'no'} |"
        )
    (options.out / "trust.md").write_text("\n".join(lines) + "\n")
    plot(rows, options.out / "trust.png", options.K)


def plot(rows, path: Path, k: int) -> None:
    """One panel per task: each recipe's lower and upper bound (95% CI) against the IS
    reference (its ±2 standard errors shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    most = max(sum(r["task"] == t for r in rows) for t in tasks)
    width = max(4.2, 0.75 * most)
    figure, axes = plt.subplots(
        1, len(tasks), figsize=(width * len(tasks), 3.6 + (1.6 if most > 4 else 0)), squeeze=False
    )
    for axis, task in zip(axes[0], tasks, strict=True):
        mine = [r for r in rows if r["task"] == task]
        reference, error = mine[0]["reference"], mine[0]["reference_se"]
        axis.axhspan(reference - 2 * error, reference + 2 * error, color="0.85")
        axis.axhline(reference, color="0.3", lw=1, label="IS reference ± 2 se")
        for x, r in enumerate(mine):
            axis.errorbar(
                x - 0.08,
                r["lower"],
                yerr=r["lower_ci"],
                fmt="o",
                color="C0",
                label="lower (twisted SMC)" if x == 0 else None,
            )
            axis.errorbar(
                x + 0.08,
                r["upper"],
                yerr=r["upper_ci"],
                fmt="s",
                color="C3",
                label="upper (conditional SMC)" if x == 0 else None,
            )
        labels = [
            r["recipe"] if r.get("twist", "mlp") == "mlp" else f"{r['recipe']}\n({r['twist']})"
            for r in mine
        ]
        if len(mine) > 4:  # many runs side by side (--combine): slanted, smaller labels
            axis.set_xticks(range(len(mine)), labels, rotation=40, ha="right", fontsize=7)
        else:
            axis.set_xticks(range(len(mine)), labels)
        axis.set_xlim(-0.6, len(mine) - 0.4)
        axis.set_title(f"{task} (K = {k})", fontsize=10)
        axis.set_ylabel("log Z")
    axes[0][0].legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    lmppl.enable_compilation_cache()
    jnp.zeros(())  # initialise JAX before tqdm
    raise SystemExit(main())
