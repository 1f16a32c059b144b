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

``--kl-only`` computes the KL table alone (no bounds-vs-K sweep, which is compile-heavy).
With ``--train-seeds 0 1 2 3 4`` it reads one twist per method and training seed from
``<method>_<twist>/seed<k>/`` (``learn_twists.py --seeds``), computes each seed's KL (mean
over ``--seeds`` evaluation batches) and reports the mean and a 95% Student-t interval
over the training seeds, as in the paper's tables; ``kl_seeds.csv`` holds the per-seed
values. log Z, shared by all rows and seeds (it is a property of the target), is

* ``--log-z bounds`` (default): the midpoint of the tightest lower/upper pair among
  SIS (p0) and twisted SMC with the first training seed's twist of each method, all at
  K = max(``--particles``) (per condition for infilling), as the full evaluation does;
* ``--log-z exact``: exact, by enumerating every sequence (``lmppl.infer.Exact``; only
  for tiny V^T such as infilling-small, 512² sequences per ending);
* ``--log-z-value V``: a given value (unconditional targets), e.g. an importance-sampling
  reference computed elsewhere, or the log Z of an earlier table to compare rows with it.

``--exact-file F.npz`` reads the exact samples (``samples`` ``[M, T]``, optionally
``draws``, as ``inference/trust_twists.py`` stores them) instead of rejection sampling, for
rare targets whose exact samples were drawn once (all M, or the first ``--exact-samples``).

    python inference/evaluate.py --task infilling-small --small --kl-only --log-z exact \\
        --train-seeds 0 1 2 3 4 --twists inference/results/kl_seeds/twists --no-train \\
        --out inference/results/kl_seeds/infilling_T2_c1
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

__all__ = ["gap_rows", "kl_over_seeds", "main", "write_kl_report", "write_report"]

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


def _updates(config: dict, unit: str = "") -> str:
    """A twist's training updates, ``× C`` conditions averaged per update when C > 1."""
    per_step = config["conditions_per_step"]
    return f"{config['steps']}" + (f" × {per_step}{unit}" if per_step > 1 else "")


def _ess_first_last(history: dict) -> str:
    """The SIS ESS / N averaged over the first and the last tenth of training."""
    tenth = max(1, len(history["ess"]) // 10)
    first = float(np.mean(history["ess"][:tenth]))
    last = float(np.mean(history["ess"][-tenth:]))
    return f"{first:.3f} → {last:.3f}"


def _training_commands(twist_configs: dict) -> list[str]:
    """The report lines listing the commands that trained the twists (none: no lines)."""
    commands = sorted({c["command"] for c, _ in twist_configs.values() if c.get("command")})
    if not commands:
        return []
    return ["", "Twists trained by", ""] + [f"    {c}" for c in commands] + [""]


def _report_header(task, command: str, settings: dict, seconds: float, timings: dict | None):
    """The lines every ``report.md`` opens with after its title: target, command, time, settings."""
    return [
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
        *_report_header(task, command, settings, seconds, timings),
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
            lines.append(
                f"| {NAMES[method]} | {config['twist']} | {_updates(config, ' conditions')}"
                f" | {config['particles']} | {config['lr']:g} | {config['positives']} | "
                f"{_ess_first_last(history)} | {config['seconds']:.0f} |"
            )
        lines += _training_commands(twist_configs)
    (out / "report.md").write_text("\n".join(lines))
    return "\n".join(lines)


def kl_label(method: str) -> str:
    """The KL table's row name of a method's proposal."""
    return "DPG proposal (twist-induced)" if method == "dpg" else f"twisted / {NAMES[method]}"


def twisted_backend(task, twist):
    """``(program, K) -> TwistedSMC`` with ``twist`` at the task's LM site."""
    return lambda p, k: lmppl.infer.TwistedSMC(
        p, k, twists={task.site: twist}, twist_condition=task.twist_condition
    )


def exact_log_z(task, exact, rng_key, max_sequences: int = 1 << 18) -> np.ndarray:
    """``[C]`` exact log Z per condition (in ``group_by_condition`` order) by enumeration."""
    conditions, _ = evaluation.group_by_condition(exact)
    enumerate_ = lmppl.infer.Exact(task.program, max_sequences=max_sequences)
    if conditions is None:
        return np.array([float(enumerate_.run(rng_key, *task.args, **task.kwargs).log_marginal)])
    values = []
    for condition in tqdm(conditions, desc="log Z (enumeration)"):
        call_args, call_kwargs = task.with_condition(condition)
        values.append(float(enumerate_.run(rng_key, *call_args, **call_kwargs).log_marginal))
    return np.asarray(values)


def kl_over_seeds(
    task,
    twists: dict,
    exact,
    log_z: np.ndarray,
    rng_key: jax.Array,
    *,
    num_samples: int,
    batches: int,
    train_seeds: list,
    progress: bool = True,
) -> tuple[list[dict], list[dict]]:
    """The KL table over training seeds: ``(summary rows, per-seed rows)``.

    ``twists[(method, seed)]`` is the twist of one training seed. Each seed's value is
    ``kl_estimates`` averaged over ``batches`` evaluation batches (``num_samples`` draws of
    q each); the summary is the mean with a 95% Student-t interval over the seeds. The p0
    row has no training: it is evaluated once per seed index with a fresh key, so its
    interval is evaluation noise only.
    """
    program = task.program
    args_, kwargs_ = task.arguments_without_condition()
    methods = list(dict.fromkeys(method for method, _ in twists))
    proposals = [("p0 (no twist)", None, lmppl.infer.ImportanceSampling)]
    proposals += [(kl_label(m), m, None) for m in methods]
    per_seed, summary = [], []
    bar = tqdm(total=len(proposals) * len(train_seeds), desc="KL", disable=not progress)
    for index, (label, method, backend) in enumerate(proposals):
        values = {"kl_q_sigma": [], "kl_sigma_q": []}
        for position, seed in enumerate(train_seeds):
            bar.set_postfix(proposal=label, seed=seed)
            if method is not None:
                backend = twisted_backend(task, twists[(method, seed)])
            key = jax.random.fold_in(jax.random.fold_in(rng_key, index), position)
            estimate = evaluation.kl_estimates(
                program,
                backend,
                exact,
                log_z,
                key,
                num_samples=num_samples,
                num_seeds=batches,
                args=args_,
                kwargs=kwargs_,
            )
            values["kl_q_sigma"].append(estimate.kl_q_sigma.mean)
            values["kl_sigma_q"].append(estimate.kl_sigma_q.mean)
            per_seed.append(
                {
                    "proposal": label,
                    "train_seed": "-" if method is None else ("single" if seed is None else seed),
                    "eval_index": position,
                    "kl_q_sigma": estimate.kl_q_sigma.mean,
                    "kl_q_sigma_batch_half_width": estimate.kl_q_sigma.half_width,
                    "kl_sigma_q": estimate.kl_sigma_q.mean,
                    "kl_sigma_q_batch_half_width": estimate.kl_sigma_q.half_width,
                }
            )
            bar.update()
        if len(train_seeds) > 1:
            q_sigma = evaluation.mean_interval(values["kl_q_sigma"])
            sigma_q = evaluation.mean_interval(values["kl_sigma_q"])
            over = "evaluation keys" if method is None else "training seeds"
        else:  # one twist per method: the interval over evaluation batches, as before
            q_sigma, sigma_q = estimate.kl_q_sigma, estimate.kl_sigma_q
            over = "evaluation batches"
        summary.append(
            {
                "proposal": label,
                "kl_q_sigma": q_sigma.mean,
                "kl_q_sigma_half_width": q_sigma.half_width,
                "kl_sigma_q": sigma_q.mean,
                "kl_sigma_q_half_width": sigma_q.half_width,
                "seeds": len(train_seeds),
                "interval_over": over,
            }
        )
    bar.close()
    return summary, per_seed


def write_kl_report(
    out: Path,
    *,
    command: str,
    task,
    settings: dict,
    exact,
    log_z: np.ndarray,
    log_z_note: str,
    summary: list[dict],
    per_seed: list[dict],
    twist_configs: dict,
    seconds: float,
    timings: dict | None = None,
) -> str:
    """``report.md`` of a ``--kl-only`` run (the KL table, per-seed values, settings)."""
    seeds = sorted({str(row["train_seed"]) for row in per_seed if row["train_seed"] != "-"})
    over = f"{len(seeds)} training seeds" if len(seeds) > 1 else "evaluation batches"
    lines = [
        f"# {task.name}: KL table over training seeds",
        "",
        *_report_header(task, command, settings, seconds, timings),
    ]
    if task.conditional:
        conditions, group = evaluation.group_by_condition(exact)
        lines += [
            f"Exact samples: {exact.num_samples} (sequence, ending) pairs drawn jointly from p0, "
            f"{len(conditions)} distinct endings. log Z per ending ({log_z_note}):",
            "",
            "| ending | exact samples | log Z |",
            "|---|---:|---:|",
        ]
        for index, condition in enumerate(conditions):
            lines.append(
                f"| {ending_text(task, condition)} | {int(np.sum(group == index))} | "
                f"{log_z[index]:.3f} |"
            )
        lines.append("")
    else:
        lines += [
            f"Exact samples: {exact.num_samples} by rejection from p0 (acceptance rate "
            f"{exact.acceptance_rate:.4f}, {exact.num_draws} draws; log of the rate = "
            f"{np.log(max(exact.acceptance_rate, 1e-300)):.3f} estimates log Z).",
            "",
            f"log Z = {float(log_z[0]):.3f} ({log_z_note}).",
            "",
        ]
    lines += [
        f"## KL divergences (mean ± 95% t-interval over {over}; lower is better)",
        "",
        "| proposal | KL(q‖σ) | KL(σ‖q) |",
        "|---|---:|---:|",
    ]
    for row in summary:
        mark = " ¹" if row["interval_over"] == "evaluation keys" else ""
        lines.append(
            f"| {row['proposal']}{mark} | {row['kl_q_sigma']:.3f} ± "
            f"{row['kl_q_sigma_half_width']:.3f} | {row['kl_sigma_q']:.3f} ± "
            f"{row['kl_sigma_q_half_width']:.3f} |"
        )
    lines += [
        "",
        *(
            [
                "¹ p0 has no training: its interval is over the same number of fresh "
                "evaluation keys (evaluation noise only).",
                "",
            ]
            if len(seeds) > 1
            else []
        ),
        "Each seed's value is KL(q‖σ) = log Z − E_q[log σ̃/q] and KL(σ‖q) = E_σ[log σ̃/q] − "
        "log Z (`lmppl.evaluation.kl_estimates`, averaged over its evaluation batches). "
        "All seeds share the exact samples and log Z, so the intervals hold the training "
        "seed and the draws of q, not the error of log Z or of the exact-sample pool.",
        "",
        "## Per seed",
        "",
        "| proposal | seed | KL(q‖σ) | KL(σ‖q) |",
        "|---|---:|---:|---:|",
    ]
    for row in per_seed:
        lines.append(
            f"| {row['proposal']} | {row['train_seed']} | {row['kl_q_sigma']:.3f} ± "
            f"{row['kl_q_sigma_batch_half_width']:.3f} | {row['kl_sigma_q']:.3f} ± "
            f"{row['kl_sigma_q_batch_half_width']:.3f} |"
        )
    lines += ["", "(± here: 95% over the evaluation batches of that seed.)", ""]
    if twist_configs:
        lines += [
            "## Twists",
            "",
            "| method | seed | twist | updates | N | lr | SIS ESS/N first → last tenth | "
            "training s |",
            "|---|---:|---|---:|---:|---:|---|---:|",
        ]
        for (method, seed), (config, history) in twist_configs.items():
            lines.append(
                f"| {NAMES[method]} | {seed if seed is not None else config['seed']} | "
                f"{config['twist']} | {_updates(config)}"
                f" | {config['particles']} | {config['lr']:g} | {_ess_first_last(history)} | "
                f"{config['seconds']:.0f} |"
            )
        lines += _training_commands(twist_configs)
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def draw_exact(task, rng_key, count: int):
    """Exact samples of σ: joint (condition, sample) pairs, or ``count`` by rejection."""
    if task.conditional:
        return task.exact_samples(rng_key, count)
    with tqdm(total=count, desc="exact samples (rejection)") as bar:
        return task.exact_samples(
            rng_key,
            count,
            batch_size=512,
            max_draws=2_000_000,
            progress=lambda accepted, drawn: bar.update(min(accepted, count) - bar.n),
        )


def load_exact(task, path: str | Path, count: int | None = None):
    """Exact samples of an unconditional target stored in ``path`` (``samples`` ``[M, T]``
    and optionally ``draws``, the rejection proposals they came from); the first ``count``."""
    if task.conditional:
        raise SystemExit("--exact-file is for unconditional targets")
    stored = np.load(path)
    samples = np.asarray(stored["samples"], np.int32)
    if samples.ndim != 2:
        raise SystemExit(f"{path}: samples must be [M, T], got shape {samples.shape}")
    draws = int(stored["draws"]) if "draws" in stored.files else 0
    rate = len(samples) / draws if draws else 1.0
    if count is not None:
        samples = samples[:count]
    return evaluation.ExactSamples(samples, task.site, num_draws=draws, acceptance_rate=rate)


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
        "--kl-only", action="store_true", help="the KL table alone (no bounds-vs-K sweep)"
    )
    parser.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        default=None,
        help="with --kl-only: twists of these training seeds (<method>_<twist>/seed<k>/), "
        "KL mean and 95%% interval over them",
    )
    parser.add_argument(
        "--log-z",
        choices=("bounds", "exact"),
        default="bounds",
        help="with --kl-only: log Z from the tightest bound pair at the largest K, or exact "
        "by enumeration (tiny V^T only)",
    )
    parser.add_argument(
        "--log-z-value",
        type=float,
        default=None,
        help="with --kl-only: this log Z (unconditional targets; overrides --log-z)",
    )
    parser.add_argument(
        "--exact-file",
        default=None,
        help="with --kl-only: exact samples from this .npz (samples [M, T], draws) instead "
        "of rejection sampling",
    )
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
    if args.train_seeds is not None and not args.kl_only:
        parser.error("--train-seeds needs --kl-only (the bounds sweep takes one twist per method)")
    if args.log_z == "exact" and not args.kl_only:
        parser.error("--log-z exact needs --kl-only")
    if (args.log_z_value is not None or args.exact_file) and not args.kl_only:
        parser.error("--log-z-value and --exact-file need --kl-only")
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
    train_seeds = args.train_seeds if args.train_seeds is not None else [None]
    twists, configs = {}, {}
    for seed in train_seeds:
        for method in args.methods:
            directory = twist_directory(args.twists, task, method, args.twist, seed)
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
                    seed=args.seed if seed is None else seed,
                    conditions_per_step=DEFAULTS["conditions_per_step"][args.small],
                    train_conditions=DEFAULTS["train_conditions"][args.small],
                    out=args.twists,
                    task_name=args.task,
                    model=args.model,
                    task_options=task_options,
                    command=f"(trained inline by) {command}",
                    seed_directory=seed is not None,
                )
            twist, config = load_learned_twist(directory, task)
            twists[(method, seed)] = twist
            history = json.loads((directory / "history.json").read_text())
            configs[(method, seed)] = (config, history)

    timings = {"twists (load or train)": time.perf_counter() - started}
    if args.kl_only:
        return _kl_only(args, task, twists, configs, keys, started, timings, command, pick)
    twists = {method: twist for (method, _), twist in twists.items()}
    configs = {method: config for (method, _), config in configs.items()}
    # exact samples of σ (with their conditions for infilling)
    count = pick("conditions") if task.conditional else max(pick("exact_samples"), runs, seeds)
    exact = draw_exact(task, keys[0], count)
    timings["exact samples"] = time.perf_counter() - started - sum(timings.values())
    program = task.program
    args_, kwargs_ = task.arguments_without_condition()
    backends = {
        SIS: lmppl.infer.ImportanceSampling,
        SMC: lambda p, k: lmppl.infer.SMC(p, k, ess_threshold=1.0),
    }
    for method, twist in twists.items():
        backends[twisted_name(method)] = twisted_backend(task, twist)

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
        kl_backends[kl_label(method)] = backends[twisted_name(method)]
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


def _kl_only(args, task, twists, configs, keys, started, timings, command, pick):
    """``--kl-only``: exact samples, one log Z for the target, the KL table over seeds."""
    out = Path(args.out)
    runs, batches = pick("runs"), pick("seeds")
    if args.exact_file:
        exact = load_exact(task, args.exact_file, args.exact_samples)
    else:
        count = pick("conditions") if task.conditional else max(pick("exact_samples"), batches)
        exact = draw_exact(task, keys[0], count)
    timings["exact samples"] = time.perf_counter() - started - sum(timings.values())
    first_seed = next(iter(twists))[1]
    if args.log_z_value is not None:
        if task.conditional:
            raise SystemExit("--log-z-value is for unconditional targets (one log Z)")
        log_z = np.array([args.log_z_value], np.float64)
        log_z_note = "given by --log-z-value"
    elif args.log_z == "exact":
        log_z = exact_log_z(task, exact, keys[3])
        log_z_note = "exact, by enumerating every sequence with lmppl.infer.Exact"
    else:
        k = max(pick("particles"))
        args_, kwargs_ = task.arguments_without_condition()
        backends = {SIS: lmppl.infer.ImportanceSampling}
        for (method, seed), twist in twists.items():
            if seed == first_seed:
                backends[twisted_name(method)] = twisted_backend(task, twist)
        table = None
        for index, (name, backend) in enumerate(tqdm(backends.items(), desc="log Z bounds")):
            part = evaluation.log_z_bounds(
                task.program,
                backend,
                exact,
                [k],
                runs,
                jax.random.fold_in(keys[1], index),
                args=args_,
                kwargs=kwargs_,
                name=name,
            )
            table = part if table is None else table + part
        log_z = np.asarray(table.log_z_by_condition(), np.float64)
        table.to_csv(out / "log_z_bounds.csv")
        which = "" if first_seed is None else f" (training seed {first_seed})"
        log_z_note = (
            f"midpoint of the tightest lower/upper pair among {', '.join(backends)}{which} "
            f"at K = {k}, {runs} runs each; `log_z_bounds.csv`"
        )
    timings["log Z"] = time.perf_counter() - started - sum(timings.values())
    train_seeds = list(dict.fromkeys(seed for _, seed in twists))
    summary, per_seed = kl_over_seeds(
        task,
        twists,
        exact,
        log_z,
        keys[2],
        num_samples=pick("kl_samples"),
        batches=batches,
        train_seeds=train_seeds,
    )
    timings["KL"] = time.perf_counter() - started - sum(timings.values())
    _write_csv(out / "kl.csv", summary)
    _write_csv(out / "kl_seeds.csv", per_seed)
    settings = {
        "training seeds": train_seeds if train_seeds != [None] else f"one ({args.twists})",
        "evaluation batches per seed": batches,
        "draws of q per batch": pick("kl_samples"),
        "log Z": args.log_z if args.log_z_value is None else f"{args.log_z_value:g} (given)",
        "exact samples": args.exact_file or "rejection",
        "twist": args.twist,
    }
    report = write_kl_report(
        out,
        command=command,
        task=task,
        settings=settings,
        exact=exact,
        log_z=log_z,
        log_z_note=log_z_note,
        summary=summary,
        per_seed=per_seed,
        twist_configs=configs,
        seconds=time.perf_counter() - started,
        timings=timings,
    )
    print(report, flush=True)
    return summary


if __name__ == "__main__":
    lmppl.enable_compilation_cache()
    main()
