"""The paper's headline figure on stories260K: bounds on a rare event's probability vs K.

Target ``toxicity-threshold`` (``models/toxicity.py: threshold``): σ(s) ∝ p0(s) · (1[toxicity
score(s) < limit] + 1e-16), T = 10 tokens after "Once upon a time, there was a". Its
normalising constant is Z = P_p0(φ) + 1e-16 (1 − P_p0(φ)), the probability of the rare event
φ = 1[score < limit] up to the floor, so log Z brackets log P(φ) from both sides.

Steps:

1. **Exact pool and reference.** Draw ``--draws`` p0 sequences
   (``lmppl.infer.ImportanceSampling(task.program, --batch)``, whose log-weights are log φ)
   and keep every sequence with φ = 1. Keeping the hits is exact rejection sampling of σ up to
   the floor: σ puts mass 1e-16 (1 − P) / Z ≈ 2.5e-12 on the misses, which the pool leaves out.
   The hit fraction p̂ over all draws is an independent reference (binomial standard error;
   log Z ≈ log(p̂ + 1e-16 (1 − p̂)), delta-method error). The pool and counts are cached in
   ``--out`` (``pool_*.npz``, extended batch by batch, so reruns and longer runs are free).
   The hits are split (at random) into train positives, a validation set (the in-training
   evaluation picks the best twist on it) and held-out exact samples (the upper bounds).
2. **Twist.** An MLP head (``lmppl.twists.MLPTwist``) trained with ``lmppl.twists.fit(...,
   "ctl")`` whose positives are exact: ``target_sampler`` draws N of the train hits (with
   replacement) at every step; ``eval_every`` with the validation hits keeps the best
   evaluated parameters (early stopping: with a few dozen positives the twist overfits).
   Optionally (``--steps``, off by default) a second phase continues with ``fit``'s default
   recipe (positives from the mixture batch: the twisted SIS batch pooled with p0 rollouts).
3. **Bounds vs K.** For each K, ``--runs`` runs of the lower bound E[log Ẑ_K] and of the
   conditional-SMC upper bound on the held-out exact samples
   (``lmppl.evaluation.log_z_bounds``), for (a) ``lmppl.infer.SMC`` with p0 as proposal
   (library default: resample when ESS < N/2; φ arrives at the last token, so the weights
   are uniform before it and it never resamples: it is importance sampling with p0) and
   (b) ``lmppl.infer.TwistedSMC`` with the CTL twist (library default: resample every step).
   For p0 the exact curves of importance sampling given p̂ (H ~ Binomial(K, p̂) hits;
   conditional: one clamped hit and Binomial(K − 1, p̂)) extend the figure beyond the
   measured K.

It writes ``threshold.md``, ``threshold.csv``, ``threshold.png``, ``twist.npz`` and
``summary.json`` into ``--out``:

    python inference/threshold_bounds.py --out inference/results/threshold
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
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

import lmppl  # noqa: E402
import models  # noqa: E402

TASK = "toxicity-threshold"
#: Bounds closer than this (nats) "meet".
MEET = 0.2


def task_options(options) -> dict:
    return {"limit": options.limit, "num_tokens": options.num_tokens, "floor": options.floor}


def pool_path(options) -> Path:
    return options.out / (
        f"pool_T{options.num_tokens}_limit{options.limit:g}_seed{options.seed}"
        f"_batch{options.batch}.npz"
    )


def draw_pool(task, options, rng_key, log=print) -> dict:
    """Hits (φ = 1) among ``options.draws`` p0 draws, resumed from / saved to the cache.

    Batch b uses ``fold_in(rng_key, b)``, so a longer run extends a shorter one exactly."""
    path = pool_path(options)
    hits = np.zeros((0, options.num_tokens), np.int32)
    batches = 0
    seconds = 0.0
    if path.is_file():
        cached = np.load(path)
        hits, batches, seconds = cached["hits"], int(cached["batches"]), float(cached["seconds"])
    wanted = -(-options.draws // options.batch)
    if batches >= wanted:
        # the cache may hold more draws than asked: use the hits of the first `wanted` batches
        keep = np.asarray(np.load(path)["hit_batch"]) < wanted
        return {"hits": hits[keep], "draws": wanted * options.batch, "seconds": seconds}
    hit_batch = list(np.load(path)["hit_batch"]) if path.is_file() else []
    sampler = lmppl.infer.ImportanceSampling(task.program, options.batch)
    began = time.perf_counter() - seconds
    found = [hits]
    for b in range(batches, wanted):
        result = sampler.run(jax.random.fold_in(rng_key, b), *task.args, **task.kwargs)
        # log φ is 0 on a hit and log(floor) ≈ −36.8 elsewhere (float32)
        hit = np.asarray(result.log_weights) > math.log(0.5)
        found.append(np.asarray(result.samples[result.site])[hit].astype(np.int32))
        hit_batch += [b] * int(hit.sum())
        done = b + 1
        if done % options.save_every == 0 or done == wanted:
            hits = np.concatenate(found)
            found = [hits]
            seconds = time.perf_counter() - began
            np.savez(
                path,
                hits=hits,
                hit_batch=np.asarray(hit_batch, np.int64),
                batches=done,
                batch=options.batch,
                seconds=seconds,
            )
            log(f"pool: {done * options.batch:,} draws, {len(hits)} hits ({seconds:.0f}s)")
    return {"hits": hits, "draws": wanted * options.batch, "seconds": seconds}


def reference(hits: int, draws: int, floor: float) -> dict:
    """P(φ) and log Z from the hit fraction (binomial standard error, delta method)."""
    p = hits / draws
    se = math.sqrt(max(p * (1 - p), 0.0) / draws)
    z = p + floor * (1 - p)
    return {
        "hits": hits,
        "draws": draws,
        "p": p,
        "p_se": se,
        "log_z": math.log(z),
        "log_z_se": se * (1 - floor) / z,
    }


def importance_curves(p: float, k: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact E[log Ẑ_K] of importance sampling with p0 and of its conditional version (one
    clamped hit) when a draw hits with probability ``p`` (its φ is 1, else ``floor``)."""
    from scipy.stats import binom

    lower, upper = [], []
    for size in np.asarray(k, np.int64):
        for clamped, out in ((0, lower), (1, upper)):
            n = int(size) - clamped
            mean, sd = n * p, math.sqrt(n * p * (1 - p))
            bottom = int(max(0, math.floor(mean - 12 * sd - 20)))
            top = int(min(n, math.ceil(mean + 12 * sd + 20)))
            h = np.arange(bottom, top + 1)  # the binomial's mass outside is negligible
            pmf = binom.pmf(h, n, p)
            z = (clamped + h + floor * (n - h)) / size
            out.append(float(np.sum(pmf * np.log(z)) / np.sum(pmf)))
    return np.asarray(lower), np.asarray(upper)


@functools.lru_cache(maxsize=4)
def p0_curves(p: float, floor: float):
    """``(K, lower, upper)`` of :func:`importance_curves` on the figure's K grid (1 to 1e8)."""
    k = np.unique(np.round(np.logspace(0, 8, 81)).astype(np.int64))
    return (k, *importance_curves(p, k, floor))


def train(task, options, train_hits, validation, rng_key, log=print):
    """Two phases of CTL on one MLP twist (the second starts from the first's parameters):

    1. ``--exact-steps`` steps with exact positives (``target_sampler``: N train hits drawn
       with replacement), which bring the twisted proposal to the rare event;
    2. ``--steps`` steps of ``fit``'s default recipe (positives from the importance-weighted
       mixture batch: the twisted SIS batch, which now contains hits, pooled with p0
       rollouts), which sees new hits at every step instead of the few train hits.

    The evaluation (``--eval-every``, on the validation hits) runs in the last phase that
    has steps and keeps its best evaluated parameters. Returns ``(twist, histories, seconds,
    warnings)`` with one history per phase that ran."""
    twist = lmppl.twists.MLPTwist(task.lm, hidden_size=options.hidden, seed=options.seed)
    positives = jnp.asarray(train_hits, jnp.int32)

    def target_sampler(key, n):
        return positives[jax.random.randint(key, (n,), 0, positives.shape[0])]

    phases = [
        ("exact", options.exact_steps, {"target_sampler": target_sampler}),
        ("mixture", options.steps, {}),
    ]
    phases = [phase for phase in phases if phase[1] > 0]
    histories = {}
    began = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", lmppl.twists.TwistGapWarning)
        for index, (name, steps, extra) in enumerate(phases):
            if options.eval_every and index == len(phases) - 1:
                extra = dict(
                    extra,
                    eval_every=options.eval_every,
                    exact_samples=validation,
                    eval_particles=options.eval_particles,
                    eval_runs=options.eval_runs,
                )
            twist, histories[name] = lmppl.twists.fit(
                task.program,
                twist,
                "ctl",
                num_steps=steps,
                num_particles=options.particles,
                learning_rate=options.lr,
                rng_key=jax.random.fold_in(rng_key, index),
                args=task.args,
                kwargs=task.kwargs,
                progress=options.progress,
                **extra,
            )
            log(f"twist phase {name}: {steps} steps ({time.perf_counter() - began:.0f}s)")
    seconds = time.perf_counter() - began
    warned = [
        str(w.message) for w in caught if issubclass(w.category, lmppl.twists.TwistGapWarning)
    ]
    return twist, histories, seconds, warned


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=1_146_880, help="p0 draws for the pool")
    parser.add_argument("--batch", type=int, default=4096, help="p0 draws per sweep")
    parser.add_argument("--save-every", type=int, default=20, help="batches between pool saves")
    parser.add_argument("--limit", type=float, default=-5.0, help="toxicity score limit")
    parser.add_argument("--num-tokens", type=int, default=10)
    parser.add_argument("--floor", type=float, default=1e-16)
    parser.add_argument("--heldout", type=int, default=10, help="hits kept for upper bounds")
    parser.add_argument("--validation", type=int, default=4, help="hits for eval_every")
    parser.add_argument("--pool-only", action="store_true", help="stop after the pool")
    parser.add_argument(
        "--exact-steps", type=int, default=60, help="CTL steps with exact positives (phase 1)"
    )
    parser.add_argument(
        "--steps", type=int, default=0, help="CTL steps with mixture-batch positives (phase 2)"
    )
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10, help="0: no evaluation")
    parser.add_argument("--eval-particles", type=int, default=256)
    parser.add_argument("--eval-runs", type=int, default=4)
    parser.add_argument("--K", type=int, nargs="+", default=[4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--p0-K", type=int, nargs="*", default=[16384], help="extra K for p0")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="tqdm bars")
    parser.add_argument("--out", type=Path, default=REPOSITORY / "inference/results/threshold")
    options = parser.parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    command = "python inference/threshold_bounds.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )

    def log(message):
        print(message, flush=True)

    task = models.TASKS[TASK](**task_options(options))
    key = jax.random.key(options.seed)
    timings = {}

    # 1. exact pool and reference
    pool = draw_pool(task, options, jax.random.fold_in(key, 0), log)
    timings["pool"] = pool["seconds"]
    ref = reference(len(pool["hits"]), pool["draws"], options.floor)
    log(
        f"reference: {ref['hits']} hits in {ref['draws']:,} draws: P = {ref['p']:.3g} ± "
        f"{ref['p_se']:.2g}, log Z = {ref['log_z']:.3f} ± {ref['log_z_se']:.3f}"
    )
    if options.pool_only:
        return 0
    needed = options.heldout + options.validation + 1
    if ref["hits"] < needed:
        raise SystemExit(
            f"the pool has {ref['hits']} hits; {needed} are needed (--heldout "
            f"{options.heldout}, --validation {options.validation}, ≥ 1 train): raise --draws"
        )
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), ref["hits"]))
    hits = pool["hits"][order]
    heldout = hits[: options.heldout]
    validation = hits[options.heldout : options.heldout + options.validation]
    train_hits = hits[options.heldout + options.validation :]

    # 2. twist
    trained, histories, seconds, warned = train(
        task,
        options,
        train_hits,
        validation if options.eval_every else None,
        jax.random.fold_in(key, 2),
        log,
    )
    timings["train"] = seconds
    history = list(histories.values())[-1]
    lmppl.twists.save_twist(options.out / "twist.npz", trained, lm=task.lm, history=histories)
    ess_last = float(np.mean(history["ess"][-20:]))
    log(
        f"twist: CTL, {options.exact_steps} + {options.steps} steps, {len(train_hits)} train "
        f"positives, {seconds:.0f}s; SIS ESS/N (last 20 steps) {ess_last:.3f}; best step "
        f"{history.get('best_step', '-')}" + (f"; warned: {warned[0]}" if warned else "")
    )

    # 3. bounds vs K
    # the twisted method first: p0's curve is also known exactly (importance_curves)
    backends = {
        "CTL twist (twisted SMC)": (
            lambda program, k: lmppl.infer.TwistedSMC(program, k, twists={task.site: trained}),
            options.K,
        ),
        "p0 (SMC)": (lambda program, k: lmppl.infer.SMC(program, k), options.K + options.p0_K),
    }
    # p0's bounds do not depend on the twist: cached per (pool, split, K, runs, seed)
    cache_path = options.out / f"p0_bounds_{pool_path(options).stem}.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rows = []
    for index, (method, (backend, ks)) in enumerate(backends.items()):
        for k in sorted(set(ks)):
            cache_key = f"heldout{options.heldout}_K{k}_runs{options.runs}_draws{ref['draws']}"
            if method == "p0 (SMC)" and cache_key in cache:
                rows.append(cache[cache_key])
                log(f"{method:24s} K={k:6d}: cached in {cache_path.name}")
                write(
                    rows, ref, options, command, history, ess_last, warned, len(train_hits), timings
                )
                continue
            began = time.perf_counter()
            table = lmppl.evaluation.log_z_bounds(
                task.program,
                backend,
                heldout,
                [k],
                options.runs,
                jax.random.fold_in(jax.random.fold_in(key, 3 + index), k),
                args=task.args,
                kwargs=task.kwargs,
                name=method,
            )
            row = table.rows[0]
            rows.append(
                {
                    "method": method,
                    "K": k,
                    "lower": row.lower.mean,
                    "lower_ci": row.lower.half_width,
                    "upper": row.upper.mean,
                    "upper_ci": row.upper.half_width,
                    "gap": row.gap,
                    "runs": options.runs,
                    "seconds": time.perf_counter() - began,
                }
            )
            r = rows[-1]
            log(
                f"{method:24s} K={k:6d}: lower {r['lower']:8.3f} ± {r['lower_ci']:.3f}  upper "
                f"{r['upper']:8.3f} ± {r['upper_ci']:.3f}  gap {r['gap']:7.3f}  ({r['seconds']:.0f}s)"
            )
            timings[f"bounds {method} K={k}"] = r["seconds"]
            if method == "p0 (SMC)":
                cache[cache_key] = r
                cache_path.write_text(json.dumps(cache, indent=1) + "\n")
            write(rows, ref, options, command, history, ess_last, warned, len(train_hits), timings)
    return 0


def first_meet(rows, method: str):
    for r in sorted((r for r in rows if r["method"] == method), key=lambda r: r["K"]):
        if abs(r["gap"]) <= MEET:
            return r["K"]
    return None


def write(rows, ref, options, command, history, ess_last, warned, num_train, timings) -> None:
    with open(options.out / "threshold.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    curve_k, curve_lower, curve_upper = p0_curves(ref["p"], options.floor)
    meet_curve = next(
        (
            int(k)
            for k, lo, up in zip(curve_k, curve_lower, curve_upper, strict=True)
            if up - lo <= MEET
        ),
        None,
    )
    summary = {
        "command": command,
        "reference": ref,
        "train_positives": num_train,
        "heldout": options.heldout,
        "validation": options.validation,
        "train_ess_last20": ess_last,
        "best_step": history.get("best_step"),
        "warned": warned,
        "meet_measured": {m: first_meet(rows, m) for m in dict.fromkeys(r["method"] for r in rows)},
        "meet_p0_importance_curve": meet_curve,
        "timings_s": timings,
    }
    (options.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log_floor = math.log(options.floor)
    lines = [
        "# Bounds on a rare event's probability vs K: p0 vs a CTL twist (stories260K, CPU)",
        "",
        f"`{command}`",
        "",
        f"Target: σ(s) ∝ p0(s) (1[toxicity score(s) < {options.limit:g}] + {options.floor:g}), "
        f"T = {options.num_tokens}; log Z = log(P(φ) + {options.floor:g}(1 − P(φ))).",
        "",
        f"**Reference** (hit fraction of plain p0 draws): {ref['hits']} hits in "
        f"{ref['draws']:,} draws, P(φ) = {ref['p']:.3g} ± {ref['p_se']:.2g} (1 se), "
        f"log Z = {ref['log_z']:.3f} ± {ref['log_z_se']:.3f}. log({options.floor:g}) = "
        f"{log_floor:.2f}.",
        "",
        f"Twist: MLP (width {options.hidden}), CTL at lr {options.lr}, N = {options.particles}: "
        f"{options.exact_steps} Adam steps with exact positives (from {num_train} train hits), "
        f"then {options.steps} steps with positives from the mixture batch; "
        f"best of evaluations every {options.eval_every} steps on {options.validation} "
        f"validation hits (best step {history.get('best_step', '-')}); SIS ESS/N over the last "
        f"20 steps {ess_last:.3f}. Upper bounds: conditional SMC on {options.heldout} held-out "
        f"hits; {options.runs} runs per bound, 95% intervals.",
        "",
        "| method | K | lower bound | upper bound | gap |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['K']} | {r['lower']:.3f} ± {r['lower_ci']:.3f} | "
            f"{r['upper']:.3f} ± {r['upper_ci']:.3f} | {r['gap']:.3f} |"
        )
    lines += ["", f"First K where the mean bounds meet within {MEET} nats:", ""]
    for method, k in summary["meet_measured"].items():
        largest = max(r["K"] for r in rows if r["method"] == method)
        lines.append(
            f"* {method}: " + (f"K = {k}" if k else f"not within the K range (≤ {largest})")
        )
    lines.append(
        "* p0, exact importance-sampling curves given the reference P (extrapolation, not a "
        "measurement): " + (f"K ≈ {meet_curve:,}" if meet_curve else "beyond 1e8")
    )
    (options.out / "threshold.md").write_text("\n".join(lines) + "\n")
    plot(rows, ref, options, curve_k, curve_lower, curve_upper)


def plot(rows, ref, options, curve_k, curve_lower, curve_upper) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.0, 4.6))
    low, high = ref["log_z"] - 2 * ref["log_z_se"], ref["log_z"] + 2 * ref["log_z_se"]
    axis.axhspan(low, high, color="0.85", label="reference log Z ± 2 se")
    axis.axhline(ref["log_z"], color="0.35", lw=1)
    axis.axhline(math.log(options.floor), color="k", ls=":", lw=1, label="log(1e-16)")
    axis.plot(
        curve_k,
        curve_lower,
        color="C0",
        ls="--",
        lw=0.9,
        alpha=0.6,
        label="p0: exact IS curves given P̂",
    )
    axis.plot(curve_k, curve_upper, color="C0", ls="--", lw=0.9, alpha=0.6)
    colours = {"p0 (SMC)": "C0", "CTL twist (twisted SMC)": "C3"}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["K"])
        k = [r["K"] for r in mine]
        colour = colours.get(method, None)
        for side, style in (("lower", {"fmt": "o-"}), ("upper", {"fmt": "s--", "mfc": "white"})):
            axis.errorbar(
                k,
                [r[side] for r in mine],
                yerr=[r[f"{side}_ci"] for r in mine],
                color=colour,
                ms=4,
                capsize=2,
                label=f"{method}: {side}",
                **style,
            )
    axis.set_xscale("log")
    axis.set_xlabel("K (particles)")
    axis.set_ylabel(f"log Z  (= log P(score < {options.limit:g}), up to the floor)")
    axis.set_title(f"toxicity-threshold, stories260K, T = {options.num_tokens}", fontsize=10)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(options.out / "threshold.png", dpi=130)
    plt.close(figure)


if __name__ == "__main__":
    lmppl.enable_compilation_cache()
    jnp.zeros(())  # initialise JAX before tqdm
    raise SystemExit(main())
