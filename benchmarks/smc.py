"""Cost of an SMC sweep relative to plain batched sampling with the same model, N and T.

The program is the paper's setting with a cheap potential::

    story ~ LM(lm, prompt, T, stop_at_eos=False)
    factor(-0.1 * #{t : story_t = penalised_id})

run by ``SMC`` and ``TwistedSMC`` resampling before every step (``ess_threshold=1.0``,
multinomial resampling, the default; SMC also with systematic resampling); the
twist is a small parametric head ``log ψ(s_1:t, v) = hidden_t · W[:, v]`` with ``W``
``[H, V]`` near zero. The baseline is ``lmppl.generate`` with ``num_samples = N`` and
``max_new_tokens = T`` (``stop_at_eos=False``): the same prefill and the same ``T`` decoding
steps, without weights, resampling or twist. Each contender is warmed up (compiled) and then
timed interleaved with the others; the ratio ``sweep / generate`` of medians is reported
(goal <= 1.10).

The second table shows linear growth: stories260K sweep time for N in {64, 256, 1024}
(T = 32) and T in {8, 16, 32} (N = 256), as microseconds per particle-token.

    python benchmarks/smc.py            # both tables (~5 min on 2 cores)
    python benchmarks/smc.py --quick    # smoke test (< 60 s)
    python benchmarks/smc.py --models stories260k --particles 64 1024 --steps 32 --repeats 7
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
from common import PROMPT, environment_line, load_lm, markdown_table, median, say, time_once

__all__ = [
    "LinearTwist",
    "SweepRow",
    "main",
    "penalised_story",
    "sweep_runners",
]

PENALTY_PER_TOKEN = -0.1
TWIST_NOISE_SCALE = 1e-3


def penalised_story(lm, prompt: str, steps: int, penalised_id: int) -> None:
    """``story ~ LM(lm, prompt, T)`` with ``log φ = -0.1 · #{t : story_t = penalised_id}``."""
    import lmppl

    story = numpyro.sample(
        "story", lmppl.LM(lm, prompt=prompt, max_new_tokens=steps, stop_at_eos=False)
    )
    numpyro.factor("penalty", PENALTY_PER_TOKEN * jnp.sum(story == penalised_id))


class LinearTwist:
    """A linear twist head ``log ψ(s_1:t, v) = hidden_t · W[:, v]``, ``W`` ``[H, V]``.

    ``W`` starts at zero plus small Gaussian noise (so the twist is not trivially zero);
    it enters the jitted sweep as an argument through ``params``.
    """

    def __init__(self, hidden_size: int, vocab_size: int, rng_key: jax.Array):
        noise = jax.random.normal(rng_key, (hidden_size, vocab_size), jnp.float32)
        self.params = {"weight": TWIST_NOISE_SCALE * noise}  # [H, V]

    def apply(self, params: dict, inputs: Any) -> jax.Array:
        """``[N, V]`` log ψ of every one-token extension of every particle."""
        return inputs.hidden.astype(jnp.float32) @ params["weight"]


class SweepRow(NamedTuple):
    """Median seconds of one sweep of each kind for one (model, N, T)."""

    model: str
    particles: int
    steps: int
    generate_seconds: float
    smc_seconds: float
    systematic_seconds: float
    twisted_seconds: float


def sweep_runners(lm, particles: int, steps: int) -> dict[str, Callable[[int], Any]]:
    """``{contender: run(seed)}`` for plain sampling, SMC (multinomial and systematic
    resampling) and twisted SMC (multinomial) at (N, T)."""
    import lmppl

    penalised_id = lm.tokenizer.encode("the", add_bos=False)[0]
    arguments = (lm, PROMPT, steps, penalised_id)
    smc = lmppl.infer.SMC(penalised_story, num_particles=particles, ess_threshold=1.0)
    systematic = lmppl.infer.SMC(
        penalised_story, num_particles=particles, ess_threshold=1.0, resampling="systematic"
    )
    twist = LinearTwist(lm.hidden_size, lm.vocab_size, jax.random.key(1))
    twisted = lmppl.infer.TwistedSMC(
        penalised_story, num_particles=particles, twists={"story": twist}, ess_threshold=1.0
    )
    return {
        "generate": lambda seed: (
            lmppl.generate(
                lm,
                PROMPT,
                num_samples=particles,
                max_new_tokens=steps,
                stop_at_eos=False,
                rng_key=jax.random.key(seed),
            ).tokens
        ),
        "smc": lambda seed: smc.run(jax.random.key(seed), *arguments).log_marginal,
        "systematic": lambda seed: systematic.run(jax.random.key(seed), *arguments).log_marginal,
        "twisted": lambda seed: twisted.run(jax.random.key(seed), *arguments).log_marginal,
    }


def measure(lm, name: str, particles: int, steps: int, repeats: int) -> SweepRow:
    """Warm up every contender, then time them interleaved ``repeats`` times."""
    runners = sweep_runners(lm, particles, steps)
    for run in runners.values():
        time_once(lambda run=run: run(0))
    seconds: dict[str, list[float]] = {contender: [] for contender in runners}
    for repeat in range(1, repeats + 1):
        for contender, run in runners.items():
            seconds[contender].append(time_once(lambda run=run, seed=repeat: run(seed)))
    return SweepRow(
        name,
        particles,
        steps,
        median(seconds["generate"]),
        median(seconds["smc"]),
        median(seconds["systematic"]),
        median(seconds["twisted"]),
    )


def report_ratio(row: SweepRow) -> None:
    say(
        f"{row.model:>13} N={row.particles:<5} T={row.steps:<3} generate {row.generate_seconds:8.4f} s"
        f"  SMC {row.smc_seconds:8.4f} s (ratio {row.smc_seconds / row.generate_seconds:5.2f})"
        f"  SMC systematic {row.systematic_seconds:8.4f} s "
        f"(ratio {row.systematic_seconds / row.generate_seconds:5.2f})"
        f"  TwistedSMC {row.twisted_seconds:8.4f} s "
        f"(ratio {row.twisted_seconds / row.generate_seconds:5.2f})"
    )


def ratio_table(rows: list[SweepRow]) -> str:
    return markdown_table(
        [
            "model",
            "N",
            "T",
            "generate s",
            "SMC s",
            "SMC / generate",
            "SMC systematic / generate",
            "TwistedSMC s",
            "twisted / generate",
        ],
        [
            (
                row.model,
                row.particles,
                row.steps,
                f"{row.generate_seconds:.4f}",
                f"{row.smc_seconds:.4f}",
                f"{row.smc_seconds / row.generate_seconds:.2f}",
                f"{row.systematic_seconds / row.generate_seconds:.2f}",
                f"{row.twisted_seconds:.4f}",
                f"{row.twisted_seconds / row.generate_seconds:.2f}",
            )
            for row in rows
        ],
    )


def growth_table(rows: list[SweepRow]) -> str:
    def per_particle_token(seconds: float, row: SweepRow) -> str:
        return f"{1e6 * seconds / (row.particles * row.steps):.2f}"

    return markdown_table(
        [
            "N",
            "T",
            "SMC s",
            "µs / particle-token: SMC",
            "SMC systematic",
            "generate",
            "SMC / generate",
        ],
        [
            (
                row.particles,
                row.steps,
                f"{row.smc_seconds:.4f}",
                per_particle_token(row.smc_seconds, row),
                per_particle_token(row.systematic_seconds, row),
                per_particle_token(row.generate_seconds, row),
                f"{row.smc_seconds / row.generate_seconds:.2f}",
            )
            for row in rows
        ],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["stories260k", "smollm2-135m"])
    parser.add_argument(
        "--particles", nargs="+", type=int, default=None, help="N (default: 64 1024 / 64)"
    )
    parser.add_argument("--steps", type=int, default=32, help="T of the ratio table")
    parser.add_argument("--growth-particles", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--growth-steps", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-growth", action="store_true", help="skip the linear-growth table")
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    options = parser.parse_args(argv)
    if options.quick:
        options.models, options.particles, options.steps, options.repeats = (
            ["stories260k"],
            [16],
            4,
            1,
        )
        options.growth_particles, options.growth_steps = [8, 16], [4]
    default_particles = {"stories260k": [64, 1024], "smollm2-135m": [64]}
    say(environment_line())
    say(f"models {options.models}, repeats {options.repeats} (interleaved), ess_threshold=1.0")

    measured: dict[tuple[str, int, int], SweepRow] = {}
    models = {}

    def row_for(name: str, particles: int, steps: int) -> SweepRow:
        if (name, particles, steps) not in measured:
            if name not in models:
                models[name] = load_lm(name)
            row = measure(models[name], name, particles, steps, options.repeats)
            measured[name, particles, steps] = row
            report_ratio(row)
        return measured[name, particles, steps]

    ratio_rows = [
        row_for(name, particles, options.steps)
        for name in options.models
        for particles in options.particles or default_particles.get(name, [64])
    ]

    growth_rows = []
    if not options.no_growth:
        middle_particles = options.growth_particles[len(options.growth_particles) // 2]
        settings = [
            (particles, max(options.growth_steps)) for particles in options.growth_particles
        ]
        settings += [(middle_particles, steps) for steps in options.growth_steps]
        growth_rows = [
            row_for("stories260k", particles, steps) for particles, steps in dict.fromkeys(settings)
        ]

    say()
    say(ratio_table(ratio_rows))
    if growth_rows:
        say()
        say("stories260k, linear growth:")
        say(growth_table(growth_rows))


if __name__ == "__main__":
    main()
