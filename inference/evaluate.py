"""Evaluate learned twists on a task: log Z bounds against K and the KL table (Zhao et al. 2024).

For a task of ``models/`` and the twists written by ``inference/learn_twists.py`` (trained
here with the same options when missing), the script computes

* bidirectional bounds on log Z for each K (``lmppl.evaluation.log_z_bounds``): lower
  bounds E[log Ẑ_K] of SIS and bootstrap SMC with p0 as proposal and of twisted SMC with
  each method's twist (resampling at every step), upper bounds from the same samplers run
  conditionally on exact target samples (one particle clamped to an exact sample of σ);
* the KL table of the paper's Tables 2–4 (``lmppl.evaluation.kl_estimates``):
  ``KL(q‖σ)`` and ``KL(σ‖q)`` of each method's twist-induced proposal q, with p0 as a
  baseline row, mean ± 95% interval over ``--seeds`` independent batches, log Z taken as
  the midpoint of the tightest lower/upper pair (per condition for infilling);
* how fast lower and upper bounds meet: the gap ``upper − lower`` at every K for p0 and
  for each twist.

It writes ``report.md`` (tables, settings and the command), ``kl.csv``, ``bounds.csv``,
``gaps.csv`` (and ``bounds_by_condition.csv`` for infilling) and ``bounds.png`` (one
panel per twist method against p0, K on a log axis)
into ``--out``. Infilling (σ(s | y), conditions y drawn jointly with their exact samples):
bounds and KL are per condition, averaged over ``--conditions`` conditions.

    python inference/evaluate.py --task toxicity-classifier --small \\
        --twists inference/results/twists --out inference/results/toxicity-classifier
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import lmppl  # noqa: E402
from inference.learn_twists import (  # noqa: E402
    COMPILATION_CACHE,
    DEFAULTS,
    METHODS,
    TWISTS,
    build_task,
    default_steps,
    enable_compilation_cache,
    learn,
    load_learned_twist,
    parse_options,
    twist_directory,
)
from lmppl import evaluation, plots  # noqa: E402

__all__ = ["gap_rows", "main", "write_report"]

#: Evaluation defaults: (full, --small).
EVAL_DEFAULTS = {
    "particles": ([1, 8, 64, 512], [1, 8, 64]),
    "runs": (32, 32),
    "exact_samples": (2000, 300),
    "kl_samples": (512, 256),
    "seeds": (5, 5),
    "conditions": (100, 64),
}

NAMES = {"ctl": "CTL", "rl": "RL", "sixo": "SIXO", "fudge": "FUDGE", "dpg": "DPG"}
SIS, SMC = "SIS (p0)", "SMC (p0)"


def twisted_name(method: str) -> str:
    return f"twisted SMC ({NAMES[method]})"


def gap_half_width(row: evaluation.BoundsRow) -> float:
    """95% half-width of ``upper − lower`` (independent runs: the half-widths in quadrature)."""
    return float(np.hypot(row.lower.half_width, row.upper.half_width))


def gap_rows(table: evaluation.BoundsTable) -> list[dict]:
    """One row per K: ``upper − lower`` of every method and its 95% half-width (NaN where
    not computed)."""
    ks = sorted({row.num_particles for row in table.rows})
    rows = []
    for k in ks:
        row = {"K": k}
        for method in table.methods:
            found = [r for r in table.method(method) if r.num_particles == k]
            row[method] = found[0].gap if found else float("nan")
            row[f"{method} ±"] = gap_half_width(found[0]) if found else float("nan")
        rows.append(row)
    return rows


def first_k_below(table: evaluation.BoundsTable, method: str, tolerance: float) -> int | None:
    """The smallest K whose bound gap is below ``tolerance`` (None if none is)."""
    for row in sorted(table.method(method), key=lambda r: r.num_particles):
        if abs(row.gap) < tolerance:
            return row.num_particles
    return None


def ending_text(task, condition) -> str:
    ids = np.asarray(condition).reshape(-1).tolist()
    return f"{ids} {task.lm.tokenizer.decode(ids)!r}"


def condition_records(task, exact, table: evaluation.BoundsTable) -> list[dict]:
    """Per (method, K, ending): the bounds of that ending (``bounds_by_condition.csv``)."""
    conditions, group = evaluation.group_by_condition(exact)
    records = []
    for row in table.rows:
        for index, condition in enumerate(conditions):
            lower, upper = row.lower_by_condition[index], row.upper_by_condition[index]
            records.append(
                {
                    "method": row.method,
                    "K": row.num_particles,
                    "ending": ending_text(task, condition),
                    "exact_samples": int(np.sum(group == index)),
                    "lower": lower,
                    "upper": upper,
                    "gap": upper - lower,
                }
            )
    return records


def condition_lines(task, exact, table: evaluation.BoundsTable) -> list[str]:
    """Per ending: exact samples, log Z, and the gap of SMC (p0) → twisted SMC (CTL) per K."""
    conditions, group = evaluation.group_by_condition(exact)
    log_z = table.log_z_by_condition()
    ks = sorted({row.num_particles for row in table.rows})
    ctl = twisted_name("ctl")
    second = ctl if ctl in table.methods else None
    by = {(r.method, r.num_particles): r for r in table.rows}
    lines = [
        "Per ending, gap `upper − lower` of SMC (p0)"
        + (" → twisted SMC (CTL)" if second else "")
        + " at each K:",
        "",
        "| ending | exact samples | log Z | " + " | ".join(f"K = {k}" for k in ks) + " |",
        "|---|---:|---:|" + "---:|" * len(ks),
    ]
    for index, condition in enumerate(conditions):
        cells = []
        for k in ks:
            gaps = [
                by[(m, k)].upper_by_condition[index] - by[(m, k)].lower_by_condition[index]
                for m in (SMC, second)
                if m is not None
            ]
            cells.append(" → ".join(f"{g:.2f}" for g in gaps))
        lines.append(
            f"| {ending_text(task, condition)} | {int(np.sum(group == index))} | "
            f"{log_z[index]:.3f} | " + " | ".join(cells) + " |"
        )
    return lines


def _write_csv(path: Path, records: list[dict]):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def plot_panels(table: evaluation.BoundsTable, methods: list[str], log_z: float, path, title):
    """One panel per twist method (its twisted SMC against SIS / SMC with p0), shared y."""
    from matplotlib.figure import Figure

    columns = min(3, max(1, len(methods)))
    rows = -(-max(1, len(methods)) // columns)
    figure = Figure(figsize=(5.0 * columns, 3.8 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, sharey=True, squeeze=False)).ravel()
    for ax, method in zip(axes, methods or [None], strict=False):
        names = [SIS, SMC] + ([twisted_name(method)] if method else [])
        sub = evaluation.BoundsTable([r for r in table.rows if r.method in names])
        plots.plot_bounds(sub, ax=ax, log_z=log_z, title=NAMES.get(method, "p0"))
    for ax in axes[len(methods or [None]) :]:
        ax.set_visible(False)
    figure.suptitle(title)
    figure.savefig(path, dpi=130)
    return figure


def write_report(
    out: Path,
    *,
    command: str,
    task,
    settings: dict,
    exact,
    table: evaluation.BoundsTable,
    kl_records: list[dict],
    twist_configs: dict,
    log_z: float,
    seconds: float,
    timings: dict | None = None,
):
    gaps = gap_rows(table)
    methods = table.methods
    lines = [
        f"# {task.name}: learned twists, KL table and log Z bounds",
        "",
        f"Target: {task.description}. Produced by",
        "",
        f"    {command}",
        "",
        f"in {seconds:.0f} s ({jax.default_backend()}, jax {jax.__version__}"
        + "".join(f"; {name} {value:.0f} s" for name, value in (timings or {}).items())
        + ").",
        "",
        "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()) + ".",
        "",
    ]
    if task.conditional:
        conditions, _ = evaluation.group_by_condition(exact)
        lines += [
            f"Exact samples: {exact.num_samples} (sequence, ending) pairs drawn jointly from p0, "
            f"{len(conditions)} distinct endings; every bound and KL term is taken per ending "
            "and averaged over endings (log Z below: the mean of the per-ending midpoints).",
            "",
        ]
    else:
        lines += [
            f"Exact samples: {exact.num_samples} by rejection from p0 (acceptance rate "
            f"{exact.acceptance_rate:.4f}, {exact.num_draws} draws; log of the rate = "
            f"{np.log(max(exact.acceptance_rate, 1e-300)):.3f} estimates log Z).",
            "",
        ]
    lines += [
        f"log Z ≈ {log_z:.3f} (midpoint of the tightest lower/upper pair).",
        "",
        "## KL divergences (mean ± 95% interval over seeds; lower is better)",
        "",
        "| proposal | KL(q‖σ) | KL(σ‖q) |",
        "|---|---:|---:|",
    ]
    for record in kl_records:
        lines.append(
            f"| {record['proposal']} | {record['kl_q_sigma']:.3f} ± "
            f"{record['kl_q_sigma_half_width']:.3f} | {record['kl_sigma_q']:.3f} ± "
            f"{record['kl_sigma_q_half_width']:.3f} |"
        )
    lines += [
        "",
        "KL(q‖σ) = log Z − E_q[log σ̃/q] (E_q over seeds × samples draws of q); "
        "KL(σ‖q) = E_σ[log σ̃/q] − log Z (E_σ over the exact samples split into seeds). "
        "The intervals do not include the error of the estimated log Z.",
        "",
        "## Do lower and upper bounds meet sooner with a learned twist?",
        "",
        "Gap `upper − lower` (nats) at each K, ± its 95% half-width (lower and upper "
        "half-widths in quadrature); a negative gap is Monte Carlo error of a converged pair:",
        "",
        "| K | " + " | ".join(methods) + " |",
        "|---:|" + "---:|" * len(methods),
    ]
    for row in gaps:
        lines.append(
            f"| {row['K']} | "
            + " | ".join(f"{row[m]:.2f} ± {row[f'{m} ±']:.2f}" for m in methods)
            + " |"
        )
    lines += ["", "Smallest K with |gap| < 0.1 nats (— : none of the K tried):", ""]
    for method in methods:
        k = first_k_below(table, method, 0.1)
        lines.append(f"- {method}: {k if k is not None else '—'}")
    if task.conditional:
        lines += ["", *condition_lines(task, exact, table)]
    lines += ["", "## Bounds", "", table.to_markdown(), "", "![bounds](bounds.png)", ""]
    if twist_configs:
        lines += [
            "## Twists",
            "",
            "| method | twist | updates | N | lr | positives | SIS ESS/N first → last tenth | "
            "training s |",
            "|---|---|---:|---:|---:|---|---|---:|",
        ]
        for method, (config, history) in twist_configs.items():
            tenth = max(1, len(history["ess"]) // 10)
            first = float(np.mean(history["ess"][:tenth]))
            last = float(np.mean(history["ess"][-tenth:]))
            lines.append(
                f"| {NAMES[method]} | {config['twist']} | {config['steps']}"
                + (
                    f" × {config['conditions_per_step']} conditions"
                    if config["conditions_per_step"] > 1
                    else ""
                )
                + f" | {config['particles']} | {config['lr']:g} | {config['positives']} | "
                f"{first:.3f} → {last:.3f} | {config['seconds']:.0f} |"
            )
        commands = sorted({c["command"] for c, _ in twist_configs.values() if c.get("command")})
        if commands:
            lines += ["", "Twists trained by", ""] + [f"    {c}" for c in commands] + [""]
    (out / "report.md").write_text("\n".join(lines))
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--twists", default="inference/results/twists", help="learn_twists --out")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--twist", default="mlp", choices=TWISTS)
    parser.add_argument("--particles", type=int, nargs="+", default=None, help="the K values")
    parser.add_argument("--runs", type=int, default=None, help="runs per K (and per condition)")
    parser.add_argument("--exact-samples", type=int, default=None, help="rejection targets")
    parser.add_argument("--conditions", type=int, default=None, help="infilling: endings")
    parser.add_argument("--kl-samples", type=int, default=None, help="draws of q per seed")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--task-option", action="append")
    parser.add_argument(
        "--no-train", action="store_true", help="fail instead of training missing twists"
    )
    parser.add_argument("--steps", type=int, default=None, help="inline training: updates")
    parser.add_argument("--train-particles", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--small", action="store_true", help="minutes on 2 CPU cores")
    parser.add_argument(
        "--compilation-cache",
        default=COMPILATION_CACHE,
        help='JAX persistent compilation cache directory ("" for none)',
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    enable_compilation_cache(args.compilation_cache)
    for method in args.methods:
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {METHODS}")
    pick = lambda name: (  # noqa: E731
        getattr(args, name) if getattr(args, name) is not None else EVAL_DEFAULTS[name][args.small]
    )
    train_pick = lambda value, name: value if value is not None else DEFAULTS[name][args.small]  # noqa: E731
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python inference/evaluate.py " + " ".join(shlex.quote(a) for a in argv)

    task_options = parse_options(args.task_option)
    task = build_task(args.task, args.model, task_options)
    print(f"task {args.task}: {task.description}", flush=True)
    ks = pick("particles")
    runs, seeds = pick("runs"), pick("seeds")
    keys = jax.random.split(jax.random.key(args.seed), 4)

    # twists: load, or train with learn_twists' options
    twists, configs = {}, {}
    for method in args.methods:
        directory = twist_directory(args.twists, task, method, args.twist)
        if not (directory / "twist.npz").exists():
            if args.no_train:
                raise SystemExit(f"no twist at {directory} (run inference/learn_twists.py)")
            print(f"training the missing {method} twist into {directory}", flush=True)
            learn(
                task,
                method,
                twist_kind=args.twist,
                steps=args.steps if args.steps is not None else default_steps(task, args.small),
                particles=train_pick(args.train_particles, "particles"),
                lr=train_pick(args.lr, "lr"),
                seed=args.seed,
                conditions_per_step=DEFAULTS["conditions_per_step"][args.small],
                train_conditions=DEFAULTS["train_conditions"][args.small],
                out=args.twists,
                task_name=args.task,
                model=args.model,
                task_options=task_options,
                command=f"(trained inline by) {command}",
            )
        twist, config = load_learned_twist(directory, task)
        twists[method] = twist
        history = json.loads((directory / "history.json").read_text())
        configs[method] = (config, history)

    timings = {"twists (load or train)": time.perf_counter() - started}
    # exact samples of σ (with their conditions for infilling)
    if task.conditional:
        count = pick("conditions")
        exact = task.exact_samples(keys[0], count)
    else:
        count = max(pick("exact_samples"), runs, seeds)
        with tqdm(total=count, desc="exact samples (rejection)") as bar:
            exact = task.exact_samples(
                keys[0],
                count,
                batch_size=512,
                max_draws=2_000_000,
                progress=lambda accepted, drawn: bar.update(min(accepted, count) - bar.n),
            )
    timings["exact samples"] = time.perf_counter() - started - sum(timings.values())
    program = task.program
    args_, kwargs_ = task.arguments_without_condition()
    site = task.site
    backends = {
        SIS: lmppl.infer.ImportanceSampling,
        SMC: lambda p, k: lmppl.infer.SMC(p, k, ess_threshold=1.0),
    }
    for method, twist in twists.items():
        backends[twisted_name(method)] = lambda p, k, twist=twist: lmppl.infer.TwistedSMC(
            p, k, twists={site: twist}, twist_condition=task.twist_condition
        )

    # bounds
    parts = []
    with tqdm(total=len(backends) * len(ks), desc="bounds") as bar:
        for index, (name, backend) in enumerate(backends.items()):
            for k in ks:
                bar.set_postfix(method=name, K=k)
                key = jax.random.fold_in(jax.random.fold_in(keys[1], index), k)
                parts.append(
                    evaluation.log_z_bounds(
                        program,
                        backend,
                        exact,
                        [k],
                        runs,
                        key,
                        args=args_,
                        kwargs=kwargs_,
                        name=name,
                    )
                )
                bar.update()
    table = parts[0]
    for part in parts[1:]:
        table = table + part
    log_z = float(np.mean(table.log_z_by_condition()))
    timings["bounds"] = time.perf_counter() - started - sum(timings.values())

    # KL table: p0, then each twist's proposal
    kl_backends = {"p0 (no twist)": lmppl.infer.ImportanceSampling}
    for method in twists:
        label = "DPG proposal (twist-induced)" if method == "dpg" else f"twisted / {NAMES[method]}"
        kl_backends[label] = backends[twisted_name(method)]
    kl_records = []
    for index, (label, backend) in enumerate(tqdm(kl_backends.items(), desc="KL")):
        estimate = evaluation.kl_estimates(
            program,
            backend,
            exact,
            table,
            jax.random.fold_in(keys[2], index),
            num_samples=pick("kl_samples"),
            num_seeds=seeds,
            args=args_,
            kwargs=kwargs_,
        )
        kl_records.append(
            {
                "proposal": label,
                "kl_q_sigma": estimate.kl_q_sigma.mean,
                "kl_q_sigma_half_width": estimate.kl_q_sigma.half_width,
                "kl_sigma_q": estimate.kl_sigma_q.mean,
                "kl_sigma_q_half_width": estimate.kl_sigma_q.half_width,
                "seeds": seeds,
            }
        )

    timings["KL"] = time.perf_counter() - started - sum(timings.values())
    seconds = time.perf_counter() - started
    table.to_csv(out / "bounds.csv")
    _write_csv(out / "kl.csv", kl_records)
    _write_csv(out / "gaps.csv", gap_rows(table))
    if task.conditional:
        _write_csv(out / "bounds_by_condition.csv", condition_records(task, exact, table))
    title = f"{task.description}; {runs} runs per K"
    plot_panels(table, list(twists), log_z, out / "bounds.png", title)
    settings = {
        "K": ks,
        "runs per K": runs,
        "seeds": seeds,
        "draws of q per seed": pick("kl_samples"),
        "twist": args.twist,
    }
    report = write_report(
        out,
        command=command,
        task=task,
        settings=settings,
        exact=exact,
        table=table,
        kl_records=kl_records,
        twist_configs=configs,
        log_z=log_z,
        seconds=seconds,
        timings=timings,
    )
    print(report, flush=True)


if __name__ == "__main__":
    lmppl.enable_compilation_cache()
    main()
