"""``python -m lmppl`` (``make run``): one task of ``models/`` end to end on SmolLM2-135M.

The task is ``models.sentiment`` with the embedded default model: p0 continues
"I bought this" for 10 tokens and φ(s) = p(class | "I bought this" + s) from VADER read
as five ordered classes (default: class 4, "strongly positive"; ``--target-class 0`` is
the paper's "strongly negative", about ten times rarer under p0). It prints

1. plain samples from p0 (``lmppl.generate``);
2. an SMC run on σ(s) ∝ p0(s) φ(s): the heaviest samples with their weights, log Ẑ, ESS;
3. bidirectional bounds on log Z (``lmppl.evaluation.log_z_bounds``): lower bounds from
   SMC and upper bounds from conditional SMC clamped to exact samples of σ (drawn by
   rejection from p0), for a few K, and the bounds-vs-K figure (``--out``).

The same steps for any task: ``lmppl sample`` and ``lmppl bounds`` (``lmppl --help``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

import lmppl
from lmppl.cli.errors import UsageError
from lmppl.cli.output import format_samples
from lmppl.cli.targets import _importable_paths

__all__ = ["main"]

CLASS_NAMES = ("strongly negative", "negative", "neutral", "positive", "strongly positive")


def _sentiment_module():
    """``models.sentiment`` from the current directory or the checkout beside ``lmppl``."""
    import importlib

    _importable_paths()
    try:
        return importlib.import_module("models.sentiment")
    except ModuleNotFoundError as error:
        if error.name not in ("models", "models.sentiment"):
            raise
        raise UsageError(
            "python -m lmppl runs models/sentiment.py of the lmppl repository: run it from the "
            "checkout (make run), or use 'lmppl sample' on your own target"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmppl",
        description="The main job (make run): models/sentiment.py end to end on SmolLM2-135M "
        "(plain samples, SMC, bounds on log Z and their figure). Other tasks: lmppl --help.",
    )
    parser.add_argument("--model", default="smollm2-135m", help="p0 (default smollm2-135m)")
    parser.add_argument(
        "--target-class",
        type=int,
        choices=range(5),
        default=4,
        help="0 strongly negative … 4 strongly positive (default 4)",
    )
    parser.add_argument("--tokens", type=int, default=10, help="T new tokens (default 10)")
    parser.add_argument("--particles", type=int, default=64, help="SMC particles (default 64)")
    parser.add_argument(
        "--bounds-particles", type=int, nargs="+", default=[4, 16], help="K values (default 4 16)"
    )
    parser.add_argument("--runs", type=int, default=4, help="runs per K (default 4)")
    parser.add_argument("--max-draws", type=int, default=4096, help="rejection budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        default="results/main/sentiment_bounds",
        help="prefix of the bounds figure and table (default results/main/sentiment_bounds)",
    )
    return parser


def run(options: argparse.Namespace) -> None:
    began = time.perf_counter()
    sentiment = _sentiment_module()
    plain_key, smc_key, exact_key, bounds_key = jax.random.split(jax.random.key(options.seed), 4)

    start = time.perf_counter()
    task = sentiment.sentiment(
        model=options.model, num_tokens=options.tokens, target_class=options.target_class
    )
    goal = CLASS_NAMES[options.target_class]
    print(f"loaded {task.lm} in {time.perf_counter() - start:.1f}s")
    print(f"target: σ(s) ∝ p0(s) · p({goal} | {sentiment.PROMPT!r} + s), {options.tokens} tokens")

    start = time.perf_counter()
    plain = lmppl.generate(
        task.lm,
        sentiment.PROMPT,
        num_samples=4,
        max_new_tokens=options.tokens,
        stop_at_eos=False,
        rng_key=plain_key,
    )
    print(f"\n1. plain samples from p0 ({time.perf_counter() - start:.1f}s):")
    for text in plain.texts:
        print(f"  {sentiment.PROMPT + text!r}")

    start = time.perf_counter()
    result = lmppl.infer.SMC(task.program, options.particles).run(smc_key)
    print(
        f"\n2. SMC, {options.particles} particles ({time.perf_counter() - start:.1f}s incl. "
        f"compilation): log Ẑ = {float(result.log_marginal):.3f}, ESS = "
        f"{result.effective_sample_size:.1f} of {options.particles}"
    )
    print("\n".join(format_samples(result, 5)))

    start = time.perf_counter()
    exact = task.exact_samples(exact_key, options.runs, batch_size=64, max_draws=options.max_draws)
    print(
        f"\n3. bounds on log Z: {exact.num_samples} exact samples of σ by rejection from p0 "
        f"({exact.num_draws} draws, acceptance rate {exact.acceptance_rate:.3f}; "
        f"{time.perf_counter() - start:.1f}s)"
    )
    start = time.perf_counter()
    table = lmppl.evaluation.log_z_bounds(
        task.program,
        lmppl.infer.SMC,
        exact,
        options.bounds_particles,
        options.runs,
        bounds_key,
        name="SMC",
    )
    print(f"SMC lower / conditional-SMC upper bounds ({time.perf_counter() - start:.1f}s):\n")
    print(table.to_markdown().rstrip())
    best = max(table.rows, key=lambda row: row.num_particles)
    print(
        f"\nlog Z ∈ [{best.lower.mean:.3f}, {best.upper.mean:.3f}] at K = {best.num_particles} "
        f"(means over {options.runs} runs; SMC's log Ẑ above = {float(result.log_marginal):.3f})"
    )

    prefix = Path(options.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    figure = prefix.parent / (prefix.name + ".png")
    title = f"{task.lm.name}: p({goal} | review), T = {options.tokens}, {options.runs} runs"
    lmppl.plots.plot_bounds(table, path=figure, title=title)
    table.to_csv(prefix.parent / (prefix.name + ".csv"))
    print(f"figure: {figure}  (table: {prefix.name}.csv)")
    print(f"\ntotal {time.perf_counter() - began:.0f}s")


def main(argv: list[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    lmppl.enable_compilation_cache()
    try:
        run(options)
    except (UsageError, ValueError, OSError, ImportError, RuntimeError) as error:
        print(f"python -m lmppl: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
