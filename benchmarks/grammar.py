"""Cost of a context-free grammar constraint (host parser) in the SMC sweep, against the free sweep.

The grammar (nested lists of integers, a context-free language: brackets must balance) is
compiled once over the model's vocabulary with llguidance; two programs are timed
interleaved, each warmed up first:

    constrained:  s ~ LM(lm, prompt, T);  constrain("c", s, grammar)
    free:         s ~ LM(lm, prompt, T)

both run by ``SMC`` (N particles, ``ess_threshold=0.5``). Reported: the median sweep time
per token of each, their ratio, the host time the parser callbacks took per token, how
many particles finished a word of the grammar within T tokens (the others have weight
zero: a grammar cannot tell how many tokens acceptance still needs), how many of those
``json.loads`` reads as a nested list of integers (all of them, or the constraint is
wrong), and
log Ẑ (the log-probability that p0's text is in the language) as mean ± sd over repeats.

    python benchmarks/grammar.py            # smollm2-135m, N 32, T 16, 3 repeats
    python benchmarks/grammar.py --quick    # stories260k, N 8, 1 repeat (smoke test)
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import numpyro
from common import environment_line, load_lm, markdown_table, median, say, time_once

import lmppl
from lmppl import potentials

__all__ = ["NESTED_LISTS", "main"]

NESTED_LISTS = r"""
start: list
list: "[" (item ("," " "? item)*)? "]"
item: INT | list
INT: /[0-9]{1,3}/
"""


def nested_integers(text: str) -> bool:
    """Whether ``text`` is JSON for a (possibly nested) list of integers."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False

    def ok(item) -> bool:
        if isinstance(item, list):
            return all(ok(x) for x in item)
        return isinstance(item, int) and not isinstance(item, bool)

    return isinstance(value, list) and ok(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--particles", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    options = parser.parse_args(argv)
    if options.quick:
        options.model, options.particles, options.steps, options.repeats = (
            "stories260k",
            8,
            8,
            1,
        )
    say(environment_line())
    lm = load_lm(options.model)
    start = time.perf_counter()
    grammar = potentials.grammar(NESTED_LISTS, lm)
    build_seconds = time.perf_counter() - start
    say(f"grammar compiled in {build_seconds:.2f} s")
    prompt, steps = "A nested list of numbers in JSON: ", options.steps

    def constrained():
        s = numpyro.sample("s", lmppl.LM(lm, prompt, steps))
        potentials.constrain("c", s, grammar)

    def free():
        numpyro.sample("s", lmppl.LM(lm, prompt, steps))

    samplers = {
        "constrained": lmppl.infer.SMC(constrained, options.particles),
        "free": lmppl.infer.SMC(free, options.particles),
    }
    for sampler in samplers.values():  # warm-up: compile
        jax.block_until_ready(sampler.run(jax.random.key(0)).log_marginal)
    times: dict[str, list[float]] = {key: [] for key in samplers}
    host: list[float] = []
    log_marginals, valid, finished, total, example = [], 0, 0, 0, ""
    for repeat in range(options.repeats):
        for key, sampler in samplers.items():
            holder = {}

            def run(sampler=sampler, holder=holder, repeat=repeat):
                holder["result"] = sampler.run(jax.random.key(repeat + 1))
                jax.block_until_ready(holder["result"].log_marginal)

            before = grammar.host_seconds
            times[key].append(time_once(run))
            if key == "constrained":
                host.append(grammar.host_seconds - before)
                result = holder["result"]
                log_marginals.append(float(result.log_marginal))
                texts = result.text("s")
                alive = np.isfinite(np.asarray(result.log_weights))
                finished += int(alive.sum())
                valid += sum(nested_integers(t) for t, a in zip(texts, alive, strict=True) if a)
                total += len(texts)
                example = texts[int(np.argmax(np.asarray(result.weights)))]
    per_token = {key: median(values) / steps * 1e3 for key, values in times.items()}
    row = [
        "nested integer lists",
        f"{build_seconds:.2f}",
        steps,
        f"{per_token['constrained']:.0f}",
        f"{per_token['free']:.0f}",
        f"{per_token['constrained'] / per_token['free']:.2f}",
        f"{median(host) / steps * 1e3:.0f}",
        f"{finished}/{total}",
        f"{valid}/{finished}",
        f"{np.mean(log_marginals):.2f} ± {np.std(log_marginals):.2f}",
    ]
    say(f"\n{options.model}, N = {options.particles}, {options.repeats} repeats (interleaved)")
    say(f"a sample: {example!r}\n")
    say(
        markdown_table(
            [
                "grammar",
                "build s",
                "T",
                "constrained ms/token",
                "free ms/token",
                "ratio",
                "host parser ms/token",
                "finished (weight > 0)",
                "valid among finished",
                "log Ẑ (mean ± sd)",
            ],
            [row],
        )
    )


if __name__ == "__main__":
    main()
