"""Learned twists on stories260K with a real host scorer: quality and speed.

Target: ``σ(s) ∝ p0(s) · p(offensive | s)`` with p0 = stories260K after the prompt
"Once upon a time, there was a" (T new tokens) and ``p(offensive | ·)`` the linear
offensive-language classifier of ``alt-profanity-check`` on the decoded text (a host
scorer, one ``jax.pure_callback`` per sweep).

* ``--quality``: train a twist for a few hundred steps (CTL by default) and compare the
  untrained twist (ψ ≡ 1: bootstrap) with the trained one at the same N: mean SIS ESS
  (no resampling, the proposal's quality) and the spread of log Ẑ over independent
  twisted-SMC runs (resampling at every step).
* ``--speed``: training steps per second for every method and head, and one step's time
  relative to one SMC sweep of the same size (bootstrap SMC, N particles, T tokens).

Run: ``.venv/bin/python benchmarks/twists.py --quality --speed``; it prints markdown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import optax  # noqa: E402

import lmppl  # noqa: E402
from lmppl import potentials  # noqa: E402
from lmppl.twists.losses import get_loss  # noqa: E402
from lmppl.twists.training import build_train_step  # noqa: E402

__all__ = ["make_program", "quality", "speed"]

PROMPT = "Once upon a time, there was a"


def make_program(lm, max_new_tokens: int):
    from profanity_check import predict_prob

    offensive = potentials.text_classifier(predict_prob, lm.tokenizer, 1, name="offensive")

    def toxic_story():
        story = numpyro.sample("story", lmppl.LM(lm, PROMPT, max_new_tokens))
        numpyro.factor("offensive", offensive(story))

    return toxic_story


def make_twist(head: str, lm, output: str = "log"):
    if head == "linear":
        return lmppl.twists.LinearTwist(lm, output=output)
    if head == "mlp":
        return lmppl.twists.MLPTwist(lm, hidden_size=128, output=output)
    return lmppl.twists.TransformerTwist(lm, output=output)


def evaluate(program, twist, num_particles: int, num_runs: int, seed: int) -> dict:
    sis = lmppl.infer.TwistedSMC(
        program, num_particles, twists={"story": twist}, ess_threshold=None
    )
    ess = [
        float(sis.run(jax.random.key(seed + i)).ess[-1]) / num_particles for i in range(num_runs)
    ]
    smc = lmppl.infer.TwistedSMC(program, num_particles, twists={"story": twist})
    log_z = np.asarray(smc.log_marginals(jax.random.key(seed + 1000), num_runs))
    sis_log_z = np.asarray(sis.log_marginals(jax.random.key(seed + 2000), num_runs))
    return {
        "sis_ess": float(np.mean(ess)),
        "smc_log_z_mean": float(log_z.mean()),
        "smc_log_z_std": float(log_z.std(ddof=1)),
        "sis_log_z_mean": float(sis_log_z.mean()),
        "sis_log_z_std": float(sis_log_z.std(ddof=1)),
    }


def quality(args) -> str:
    lm = lmppl.load("stories260k")
    program = make_program(lm, args.tokens)
    rows = []
    for head in args.heads:
        twist = make_twist(head, lm)
        before = evaluate(program, twist, args.particles, args.runs, seed=1)
        start = time.perf_counter()
        trained, history = lmppl.twists.fit(
            program,
            twist,
            args.method,
            num_steps=args.steps,
            num_particles=args.particles,
            learning_rate=args.learning_rate,
            rng_key=jax.random.key(0),
            progress=False,
        )
        seconds = time.perf_counter() - start
        after = evaluate(program, trained, args.particles, args.runs, seed=1)
        for label, result in (
            ("untrained (ψ ≡ 1)", before),
            (f"{args.method}, {args.steps} steps", after),
        ):
            rows.append(
                f"| {head} | {label} | {result['sis_ess']:.3f} | {result['sis_log_z_mean']:.3f} ± "
                f"{result['sis_log_z_std']:.3f} | {result['smc_log_z_mean']:.3f} ± "
                f"{result['smc_log_z_std']:.3f} |"
            )
        rows.append(f"| {head} | training time | {seconds:.0f} s | | |")
        print(rows[-3], rows[-2], rows[-1], sep="\n", flush=True)
    header = (
        f"N = {args.particles}, T = {args.tokens}, {args.runs} runs; SIS ESS is the mean final ESS / N "
        "with no resampling; log Ẑ as mean ± std over runs (SMC resamples every step).\n\n"
        "| head | twist | SIS ESS / N | SIS log Ẑ | twisted SMC log Ẑ |\n|---|---|---|---|---|\n"
    )
    return header + "\n".join(rows) + "\n"


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(args) -> str:
    lm = lmppl.load("stories260k")
    program = make_program(lm, args.tokens)
    sweep = lmppl.infer.SMC(program, args.particles, ess_threshold=1.0)
    sweep.run(jax.random.key(0))
    sweep_time = _median_time(lambda: sweep.run(jax.random.key(1)).log_marginal, args.repeats)
    rows = [f"| bootstrap SMC sweep | — | {1 / sweep_time:.1f} sweeps/s | 1.00 |"]
    print(rows[-1], flush=True)
    for head in args.heads:
        for method in args.methods:
            twist = make_twist(head, lm, "log_sigmoid" if method == "fudge" else "log")
            optimizer = optax.adam(1e-3)
            step, model_params, arrays = build_train_step(
                program, twist, get_loss(method), optimizer, args.particles, (), {}
            )
            state = [twist.params, optimizer.init(twist.params)]

            def one(step=step, state=state, model_params=model_params, arrays=arrays):
                state[0], state[1], metrics = step(
                    state[0], state[1], jax.random.key(0), model_params, arrays
                )
                return metrics["loss"]

            one()
            seconds = _median_time(one, args.repeats)
            rows.append(
                f"| {head} | {method} | {1 / seconds:.1f} steps/s | {seconds / sweep_time:.2f} |"
            )
            print(rows[-1], flush=True)
    header = (
        f"stories260K, N = {args.particles}, T = {args.tokens}, median of {args.repeats}; "
        f"{jax.default_backend()}, jax {jax.__version__}. Ratio: one training step / one "
        "bootstrap SMC sweep of the same N and T.\n\n"
        "| head | method | speed | step / sweep |\n|---|---|---|---|\n"
    )
    return header + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", default="ctl")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--heads", nargs="+", default=["linear", "mlp", "transformer"])
    parser.add_argument("--methods", nargs="+", default=["ctl", "rl", "sixo", "fudge", "dpg"])
    args = parser.parse_args()
    if args.quality:
        print(quality(args), flush=True)
    if args.speed:
        print(speed(args), flush=True)


if __name__ == "__main__":
    main()
