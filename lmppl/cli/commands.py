"""The three subcommands: ``sample``, ``train-twist``, ``bounds``."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from lmppl.cli.errors import UsageError
from lmppl.cli.output import (
    _key,
    _out_prefix,
    _print,
    _with_suffix,
    check_output_path,
    format_samples,
    write_result,
)
from lmppl.cli.targets import parse_options, resolve_target
from lmppl.cli.twist_files import _condition_length, _twist_line, load_task_twist, make_backend

__all__ = ["cmd_bounds", "cmd_sample", "cmd_train_twist"]


def cmd_sample(options: argparse.Namespace) -> int:
    import jax

    from lmppl import infer

    out = Path(options.out).expanduser() if options.out else None
    if out is not None and out.suffix not in (".json", ".nc"):
        raise UsageError(f"--out must end in .json or .nc, got {options.out}")
    if out is not None:
        check_output_path(out)
    if options.weighted and (out is None or out.suffix != ".nc"):
        raise UsageError("--weighted applies to --out FILE.nc")
    if options.show < 0 or options.particles < 1:
        raise UsageError("--show must be >= 0 and --particles >= 1")
    backend = options.backend or ("twisted" if options.twist else "smc")
    if options.twist and backend != "twisted":
        raise UsageError(f"--twist is used by --backend twisted, not {backend}")
    if backend == "twisted" and not options.twist:
        raise UsageError("--backend twisted needs --twist CHECKPOINT")
    task = resolve_target(options.target, parse_options(options.set))
    _print(f"task: {task.name} — {task.description or task.program.__name__}")
    twist = None
    if options.twist:
        twist, info = load_task_twist(options.twist, task)
        _print(_twist_line(info))
        trained_on = info.get("metadata", {}).get("task")
        if trained_on and trained_on != task.name:
            _print(
                f"warning: this twist was trained on {trained_on}, not {task.name}: its bounds "
                "and proposal were measured for another target"
            )
        warning = _untrusted_twist_warning(info)
        if warning:
            _print(warning)

    start = time.perf_counter()
    if backend == "exact":
        result = infer.Exact(task.program).run(_key(options.seed), *task.args, **task.kwargs)
        seconds = time.perf_counter() - start
        _print(
            f"backend: Exact, {result.num_particles} sequences enumerated ({seconds:.1f}s)",
            f"log Z = {float(result.log_marginal):.4f} (exact)",
        )
    else:
        sampler = make_backend(backend, task, twist)(task.program, options.particles)
        result = sampler.run(_key(options.seed), *task.args, **task.kwargs)
        seconds = time.perf_counter() - start
        _print(
            f"backend: {result.backend}, {result.num_particles} particles, seed {options.seed} "
            f"({seconds:.1f}s incl. compilation)",
            f"log Ẑ = {float(result.log_marginal):.4f}   ESS = "
            f"{result.effective_sample_size:.1f} of {result.num_particles}",
        )
    if not np.isfinite(np.asarray(result.log_weights)).any():
        _print(
            "error: every particle has weight zero (the potentials are -inf for every sampled "
            "sequence): there is no sample of the target to show. Try more particles "
            "(--particles) or a twist"
        )
        return 1
    _print(*format_samples(result, options.show))
    if out is not None:
        header = {"task": task.name, "target": options.target, "seed": options.seed}
        resample_key = None
        if out.suffix == ".nc" and not options.weighted:
            resample_key = jax.random.fold_in(_key(options.seed), 1)
        write_result(out, result, header, resample_key)
        what = ""
        if out.suffix == ".nc":
            what = (
                " (weighted particles: use sample_stats.weight)"
                if options.weighted
                else " (equally weighted resample; --weighted keeps the weighted particles)"
            )
        _print(f"wrote {out}{what}")
    return 0


def _history_csv(path: Path, history: dict[str, list]) -> None:
    names = [name for name, values in history.items() if isinstance(values, list)]
    rows = zip(*(history[name] for name in names), strict=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        writer.writerows(rows)


def _trend(values: list[float]) -> str:
    if not values:
        return "n/a"
    width = max(1, min(10, len(values) // 5))
    return f"{np.mean(values[:width]):.4g} → {np.mean(values[-width:]):.4g}"


#: The gap (nats) above which a twist's measured bounds make ``sample`` print a warning.
GAP_TOLERANCE = 0.2


def _untrusted_twist_warning(info: dict) -> str | None:
    """A warning line when the twist file records bounds that stayed apart."""
    bounds = info.get("metadata", {}).get("bounds") or {}
    gap = bounds.get("gap")
    if gap is None or not np.isfinite(gap) or abs(gap) <= GAP_TOLERANCE:
        return None
    return (
        f"warning: this twist's bounds on log Z were measured {gap:.3g} nats apart at "
        f"K={bounds.get('K')} (lower {bounds.get('lower'):.4g}, upper {bounds.get('upper'):.4g}): "
        "its log Ẑ and samples are not to be trusted on this target (lmppl bounds re-measures)"
    )


def _training_bounds(options, history) -> dict | None:
    """The best evaluation of ``fit(eval_every=...)`` as a record (None if none ran)."""
    if "best_step" not in history:
        return None
    index = history["best_step"] - 1
    record = {
        "K": options.eval_particles,
        "runs": options.eval_runs,
        "step": history["best_step"],
        "lower": history["bound_lower"][index],
        "upper": history["bound_upper"][index],
        "gap": history["bound_gap"][index],
    }
    return {
        k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in record.items()
    }


def _evaluation_options(options, task) -> dict:
    """``fit``'s evaluation arguments: every steps / 5 by default, with exact samples
    when the task has an unconditional exact sampler (else the lower bound only)."""
    import jax

    every = options.eval_every
    if every is None:
        every = max(1, options.steps // 5)
    if every < 0 or min(options.eval_particles, options.eval_runs, options.exact_samples) < 1:
        raise UsageError(
            "--eval-every, --eval-particles, --eval-runs and --exact-samples must be positive"
        )
    if every == 0:
        return {}
    extra = {
        "eval_every": every,
        "eval_particles": options.eval_particles,
        "eval_runs": options.eval_runs,
    }
    if task.exact is not None and not task.conditional:
        start = time.perf_counter()
        exact = task.exact_samples(jax.random.fold_in(_key(options.seed), 7), options.exact_samples)
        extra["exact_samples"] = exact.samples
        _print(
            f"evaluation: bounds at K={options.eval_particles} every {every} steps, upper bounds "
            f"from {exact.num_samples} exact samples by {task.exact} "
            f"({time.perf_counter() - start:.1f}s)"
        )
    else:
        _print(
            f"evaluation: lower bound at K={options.eval_particles} every {every} steps (no "
            "unconditional exact sampler: no upper bound)"
        )
    return extra


POSITIVE_METHODS = ("ctl", "sixo", "dpg")  # the losses whose σ term reads positives


def _exact_positives(options, task) -> dict:
    """``fit``'s ``target_sampler`` over ``--positives`` exact samples of σ (drawn once,
    independent of the evaluation's), when the task has an unconditional exact sampler
    and the loss reads positives; ``{}`` otherwise (positives from the training batch)."""
    import jax

    from lmppl import twists

    if options.positives < 0 or options.positive_draws < 1:
        raise UsageError("--positives must be ≥ 0 and --positive-draws positive")
    if options.positives == 0 or options.method not in POSITIVE_METHODS:
        return {}
    if task.exact is None or task.conditional:
        _print("positives: from the training batch (the task has no unconditional exact sampler)")
        return {}
    start = time.perf_counter()
    key = jax.random.fold_in(_key(options.seed), 8)
    extra = {}
    if task.exact == "rejection":
        extra = {"max_draws": options.positive_draws, "batch_size": 1024, "allow_fewer": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a short pool is reported below
        exact = task.exact_samples(key, options.positives, **extra)
    if exact.num_samples == 0:
        _print(
            f"positives: no exact sample in {options.positive_draws} draws by {task.exact}; "
            "positives from the training batch (raise --positive-draws)"
        )
        return {}
    _print(
        f"positives: {exact.num_samples} exact samples of σ by {task.exact} "
        f"({exact.num_draws} draws, {time.perf_counter() - start:.1f}s), drawn with "
        "replacement for every step"
    )
    return {"target_sampler": twists.pool_sampler(exact.samples)}


def cmd_train_twist(options: argparse.Namespace) -> int:
    from lmppl import twists

    for name in ("steps", "particles"):
        if getattr(options, name) < 1:
            raise UsageError(f"--{name} must be a positive integer")
    if not options.lr > 0:
        raise UsageError("--lr must be positive")
    check_output_path(Path(options.out).expanduser(), folder=True)
    task = resolve_target(options.target, parse_options(options.set))
    _print(f"task: {task.name} — {task.description or task.program.__name__}")
    output = "log_sigmoid" if options.method == "fudge" else "log"
    head = {"output": output, "condition_length": _condition_length(task), "seed": options.seed}
    if options.twist == "linear":
        twist = twists.LinearTwist(task.lm, **head)
    elif options.twist == "transformer":  # a trainable copy of the LM body (reads the condition)
        twist = twists.TransformerTwist(
            task.lm, output=output, conditional=bool(head["condition_length"])
        )
    else:
        twist = twists.MLPTwist(task.lm, options.hidden_size, **head)
    _print(
        f"training {type(twist).__name__} ({output}) with {options.method}: {options.steps} "
        f"steps, {options.particles} particles, lr {options.lr}, batch {options.batch}"
    )
    out = Path(options.out).expanduser()
    checkpoints = out / "checkpoints"
    if options.checkpoint_every < 0:
        raise UsageError("--checkpoint-every must be 0 or a positive integer")
    if twists.step_checkpoints(checkpoints) and not options.resume:
        raise UsageError(
            f"{checkpoints} holds checkpoints of an earlier run: pass --resume to continue it, "
            "or choose another --out"
        )
    if options.resume:
        found = twists.step_checkpoints(checkpoints)
        _print(
            f"resuming from {found[0]}" if found else f"no checkpoint in {checkpoints}: starting"
        )
    evaluation = _evaluation_options(options, task)
    positives = _exact_positives(options, task)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", twists.TwistGapWarning)  # printed below instead
        trained, history = twists.fit(
            task.program,
            twist,
            options.method,
            num_steps=options.steps,
            num_particles=options.particles,
            learning_rate=options.lr,
            rng_key=_key(options.seed),
            args=task.args,
            kwargs=task.kwargs,
            twist_condition=task.twist_condition,
            batch=options.batch,
            progress=sys.stderr.isatty(),
            checkpoint_dir=checkpoints,
            checkpoint_every=options.checkpoint_every,
            resume=options.resume,
            **evaluation,
            **positives,
        )
    seconds = time.perf_counter() - start
    bounds = _training_bounds(options, history)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {
        "task": task.name,
        "target": options.target,
        "options": parse_options(options.set),
        "site": task.site,
        "method": options.method,
        "num_particles": options.particles,
        "learning_rate": options.lr,
        "seed": options.seed,
        "batch": options.batch,
        "exact_positives": options.positives if positives else 0,
        "bounds": bounds,
    }
    path = twists.save_twist(
        out / "twist.npz",
        trained,
        lm=task.lm,
        step=options.steps,
        history=history,
        metadata=json.loads(json.dumps(metadata, default=str)),
    )
    _history_csv(out / "history.csv", history)
    _print(
        f"trained in {seconds:.1f}s; first → last steps: loss {_trend(history['loss'])}, "
        f"ESS/N {_trend(history['ess'])}, SIS log Ẑ {_trend(history['log_marginal'])}",
        f"wrote {path} and {out / 'history.csv'}",
    )
    if bounds is not None:
        upper = "n/a" if bounds["upper"] is None else f"{bounds['upper']:.4f}"
        gap = "n/a" if bounds["gap"] is None else f"{bounds['gap']:.4f}"
        _print(
            f"bounds at K={bounds['K']} (kept the best evaluation, step {bounds['step']}): "
            f"lower {bounds['lower']:.4f}, upper {upper}, gap {gap} nats"
        )
        warning = _untrusted_twist_warning({"metadata": {"bounds": bounds}})
        if warning:
            _print(warning)
    _print(f"use it: lmppl sample {options.target} --twist {out}")
    return 0


def cmd_bounds(options: argparse.Namespace) -> int:
    import jax

    from lmppl import evaluation, infer, plots

    if min(options.particles) < 1 or options.runs < 1:
        raise UsageError("--particles and --runs must be positive integers")
    num_exact = options.exact_samples or options.runs
    if num_exact < 1:
        raise UsageError("--exact-samples must be a positive integer")
    methods = list(
        dict.fromkeys(options.methods or (["smc", "twisted"] if options.twist else ["smc"]))
    )
    if "twisted" in methods and not options.twist:
        raise UsageError("--methods twisted needs --twist CHECKPOINT")
    task = resolve_target(options.target, parse_options(options.set), exact=options.exact)
    if task.exact is None:
        raise UsageError(
            f"{options.target} has no exact sampler for the upper bounds; pass --exact "
            "enumerate (tiny models) or --exact rejection (φ ≤ 1)"
        )
    prefix = _out_prefix(options.out)
    check_output_path(_with_suffix(prefix, ".md"))
    _print(f"task: {task.name} — {task.description or task.program.__name__}")
    twist = None
    if options.twist:
        twist, info = load_task_twist(options.twist, task)
        _print(_twist_line(info))

    sampler_key, bounds_key, exact_key = jax.random.split(_key(options.seed), 3)
    args, kwargs = task.arguments_without_condition()
    start = time.perf_counter()
    log_z = None
    if task.exact == "enumerate":  # one enumeration gives log Z and the exact samples
        enumerated = infer.Exact(task.program).run(exact_key, *args, **kwargs)
        log_z = float(enumerated.log_marginal)
        index = jax.random.categorical(sampler_key, enumerated.log_weights, shape=(num_exact,))
        tokens = np.asarray(enumerated.samples[enumerated.site])[np.asarray(index)]
        exact = evaluation.ExactSamples(
            tokens.astype(np.int32), enumerated.site, num_draws=num_exact
        )
    else:
        extra: dict = {}
        if task.exact == "rejection":
            extra = {"max_draws": options.max_draws, "progress": _rejection_bar(num_exact)}
        exact = task.exact_samples(sampler_key, num_exact, **extra)
    rate = f", acceptance rate {exact.acceptance_rate:.3g}" if task.exact == "rejection" else ""
    _print(
        f"exact samples: {exact.num_samples} by {task.exact} ({exact.num_draws} draws{rate}, "
        f"{time.perf_counter() - start:.1f}s)"
    )
    reference = None
    if task.exact == "rejection" and exact.num_samples:
        # P(accept) = Z / exp(log_envelope): an estimate of log Z independent of the bounds.
        error = math.sqrt(max(1.0 / exact.num_samples - 1.0 / exact.num_draws, 0.0))
        reference = (math.log(exact.acceptance_rate) + task.log_envelope, error)
        _print(f"rejection's acceptance rate gives log Z ≈ {reference[0]:.3f} ± {error:.3f}")
    labels = {"smc": "SMC", "is": "SIS", "twisted": "Twisted SMC"}
    table = evaluation.BoundsTable([], log_z=log_z)
    for index, method in enumerate(methods):
        start = time.perf_counter()
        table = table + evaluation.log_z_bounds(
            task.program,
            make_backend(method, task, twist),
            exact,
            options.particles,
            options.runs,
            jax.random.fold_in(bounds_key, index),
            args=args,
            kwargs=kwargs,
            name=labels[method],
            log_z=log_z,
            progress=True,
        )
        _print(f"{labels[method]}: K = {options.particles} in {time.perf_counter() - start:.1f}s")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    title = f"{task.name}: {options.runs} runs per K, {exact.num_samples} exact samples"
    markdown = table.to_markdown()
    _with_suffix(prefix, ".md").write_text(f"# log Z bounds — {title}\n\n{markdown}")
    table.to_csv(_with_suffix(prefix, ".csv"))
    figure = _with_suffix(prefix, ".png")
    plots.plot_bounds(table, path=figure, title=title)
    _print("", markdown.rstrip(), "")
    for problem in table.problems(reference):
        _print(f"warning: {problem}")
    _print(
        f"figure: {figure}",
        f"table: {_with_suffix(prefix, '.md')}, {_with_suffix(prefix, '.csv')}",
    )
    return 0


def _rejection_bar(total: int):
    """A ``progress(accepted, drawn)`` callback drawing a tqdm bar of accepted samples."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="exact samples (rejection)", unit="sample", leave=False)

    def progress(accepted: int, drawn: int) -> None:
        bar.update(min(accepted, total) - bar.n)
        bar.set_postfix_str(f"{drawn} drawn")
        if accepted >= total:
            bar.close()

    return progress


# --------------------------------------------------------------------------- parser
