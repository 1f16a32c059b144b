"""The headline sweeps on an accelerator: SmolLM2-135M, bf16 and fp32, N up to 4096.

For every (dtype, T, N) this times, on whatever ``jax.default_backend()`` is (a GPU when
one is present), the three sweeps of ``benchmarks/smc.py`` — plain batched sampling
(``lmppl.generate``), ``SMC`` and ``TwistedSMC`` with a linear twist head, all resampling
before every step — and prints one markdown row each:

- compile s: first call minus the median steady call (tracing, lowering and XLA
  compilation; ``LMPPL_COMPILATION_CACHE=0`` is set so a warm disk cache does not hide it);
- sweep s: the median of ``--repeats`` timed calls, the contenders interleaved;
- particle-tokens/s: ``N · T / sweep s``;
- SMC / generate, twisted / generate: ratios of medians timed in the same run;
- peak GiB: the device's ``peak_bytes_in_use`` after the row (the process-wide peak so
  far: rows run from the smallest to the largest N, so each is the peak of that row or an
  earlier, smaller one; "n/a" where the backend does not report memory, e.g. the CPU).

Device time is scarce, so the script stops starting new rows once ``--budget-s`` seconds
have passed (the table says which rows were skipped) and prints the table after every row.

    python benchmarks/gpu.py                  # SmolLM2-135M, bf16 + fp32, N 64..4096, T 20 and 64
    python benchmarks/gpu.py --budget-s 420 --dtypes bfloat16 --steps 32
    python benchmarks/gpu.py --quick          # CPU smoke test on stories260K (seconds)
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, NamedTuple

os.environ.setdefault("LMPPL_COMPILATION_CACHE", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import environment_line, load_lm, markdown_table, median, say, time_once  # noqa: E402
from smc import sweep_runners  # noqa: E402

__all__ = ["GpuRow", "main", "measure_row", "peak_memory_gib"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class GpuRow(NamedTuple):
    """One (model, dtype, N, T) measurement; seconds are medians."""

    model: str
    dtype: str
    particles: int
    steps: int
    compile_seconds: dict[str, float]
    sweep_seconds: dict[str, float]
    peak_gib: float | None

    def cells(self) -> list[Any]:
        tokens = self.particles * self.steps
        generate = self.sweep_seconds["generate"]
        peak = "n/a" if self.peak_gib is None else f"{self.peak_gib:.2f}"
        return [
            self.model,
            self.dtype,
            self.particles,
            self.steps,
            " / ".join(f"{self.compile_seconds[k]:.1f}" for k in ("generate", "smc", "twisted")),
            " / ".join(f"{self.sweep_seconds[k]:.3f}" for k in ("generate", "smc", "twisted")),
            f"{tokens / generate:,.0f} / {tokens / self.sweep_seconds['smc']:,.0f}",
            f"{self.sweep_seconds['smc'] / generate:.2f}",
            f"{self.sweep_seconds['twisted'] / generate:.2f}",
            peak,
        ]


HEADER = [
    "model",
    "dtype",
    "N",
    "T",
    "compile s (generate / SMC / twisted)",
    "sweep s (generate / SMC / twisted)",
    "particle-tokens/s (generate / SMC)",
    "SMC / generate",
    "twisted / generate",
    "peak GiB",
]


def peak_memory_gib() -> float | None:
    """The default device's peak bytes in use so far, in GiB (None when not reported)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1024**3


def measure_row(lm, model: str, dtype: str, particles: int, steps: int, repeats: int) -> GpuRow:
    """Compile each contender (timed), then time them interleaved ``repeats`` times."""
    runners = {
        name: run
        for name, run in sweep_runners(lm, particles, steps).items()
        if name in ("generate", "smc", "twisted")
    }
    first = {name: time_once(lambda run=run: run(0)) for name, run in runners.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(1, repeats + 1):
        for name, run in runners.items():
            seconds[name].append(time_once(lambda run=run, seed=repeat: run(seed)))
    sweep = {name: median(values) for name, values in seconds.items()}
    compile_seconds = {name: max(first[name] - sweep[name], 0.0) for name in runners}
    return GpuRow(model, dtype, particles, steps, compile_seconds, sweep, peak_memory_gib())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=DTYPES)
    parser.add_argument("--particles", nargs="+", type=int, default=[64, 256, 1024, 4096])
    parser.add_argument("--steps", nargs="+", type=int, default=[20, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--budget-s", type=float, default=480.0, help="start no new row after this many seconds"
    )
    parser.add_argument("--quick", action="store_true", help="CPU smoke test on stories260K")
    options = parser.parse_args(argv)
    if options.quick:
        options.model, options.dtypes, options.particles = "stories260k", ["float32"], [8]
        options.steps, options.repeats = [4], 1
    start = time.perf_counter()
    say(environment_line())
    say(f"devices: {jax.devices()}")
    base = load_lm(options.model)
    rows: list[GpuRow] = []
    skipped: list[str] = []
    for dtype in options.dtypes:
        lm = base.astype(DTYPES[dtype])
        for steps in options.steps:
            for particles in sorted(options.particles):
                label = f"{dtype} N={particles} T={steps}"
                if time.perf_counter() - start > options.budget_s:
                    skipped.append(label)
                    continue
                try:
                    rows.append(
                        measure_row(lm, options.model, dtype, particles, steps, options.repeats)
                    )
                except jax.errors.JaxRuntimeError as error:  # out of device memory: say so, go on
                    skipped.append(f"{label} ({type(error).__name__}: {str(error)[:120]})")
                    continue
                say(markdown_table(HEADER, [row.cells() for row in rows]))
    say()
    say(f"# {options.model} on {jax.default_backend()}, {time.perf_counter() - start:.0f} s")
    say(markdown_table(HEADER, [row.cells() for row in rows]))
    if skipped:
        say("skipped: " + "; ".join(skipped))
    say("ratio: SMC / generate and twisted / generate per row above")


if __name__ == "__main__":
    main()
