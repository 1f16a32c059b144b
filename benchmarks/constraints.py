"""Cost of a regex / JSON-schema constraint inside the SMC sweep, against the same sweep without it.

For each constraint (a date, an e-mail address, a small JSON object) the automaton is built
once (build time reported), then two programs are timed interleaved, each warmed up first:

    constrained:  s ~ LM(lm, prompt, T);  constrain("c", s, automaton)
    free:         s ~ LM(lm, prompt, T)

both run by ``SMC`` (N particles, ``ess_threshold=0.5``). Reported: median sweep time per
token for each, the ratio constrained / free, the fraction of the constrained samples whose
text is in the language (checked with Python's ``re`` / ``json``), and log Ẑ (the
log-probability that p0's text is in the language) as mean ± standard deviation over the
repeats.

    python benchmarks/constraints.py            # smollm2-135m, N 32, 3 repeats (~5 min on 2 cores)
    python benchmarks/constraints.py --quick    # stories260k, date only (smoke test)
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jax
import numpy as np
import numpyro
from common import environment_line, load_lm, markdown_table, median, say, time_once

import lmppl
from lmppl import potentials

__all__ = ["CONSTRAINTS", "main"]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
}
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
EMAIL = r"[a-z0-9._]{1,20}@[a-z0-9]{1,20}(\.[a-z]{2,6}){1,3}"


def _json_person(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == set(PERSON["required"])


CONSTRAINTS = {
    # name: (build(lm), prompt, T, membership check of a decoded text)
    "date": (lambda lm: potentials.regex(DATE, lm), "Date (YYYY-MM-DD): ", 12, DATE),
    "email": (lambda lm: potentials.regex(EMAIL, lm), "Contact: ", 16, EMAIL),
    "json": (lambda lm: potentials.json_schema(PERSON, lm), "A person as JSON: ", 36, None),
}


def _member(pattern: str | None, text: str) -> bool:
    return _json_person(text) if pattern is None else re.fullmatch(pattern, text) is not None


def _programs(lm, automaton, prompt: str, steps: int):
    def constrained():
        s = numpyro.sample("s", lmppl.LM(lm, prompt, steps))
        potentials.constrain("c", s, automaton)

    def free():
        numpyro.sample("s", lmppl.LM(lm, prompt, steps))

    return constrained, free


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--constraints", nargs="+", default=sorted(CONSTRAINTS))
    parser.add_argument("--particles", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    options = parser.parse_args(argv)
    if options.quick:
        options.model, options.constraints, options.particles, options.repeats = (
            "stories260k",
            ["date"],
            8,
            1,
        )
    say(environment_line())
    lm = load_lm(options.model)
    rows = []
    for name in options.constraints:
        build, prompt, steps, pattern = CONSTRAINTS[name]
        start = time.perf_counter()
        automaton = build(lm)
        build_seconds = time.perf_counter() - start
        say(
            f"{name}: {automaton.num_states} states, {automaton.num_classes} token classes, "
            f"built in {build_seconds:.2f} s"
        )
        constrained, free = _programs(lm, automaton, prompt, steps)
        samplers = {
            "constrained": lmppl.infer.SMC(constrained, options.particles),
            "free": lmppl.infer.SMC(free, options.particles),
        }
        for sampler in samplers.values():  # warm-up: compile
            jax.block_until_ready(sampler.run(jax.random.key(0)).log_marginal)
        times: dict[str, list[float]] = {key: [] for key in samplers}
        log_marginals, valid, total = [], 0, 0
        for repeat in range(options.repeats):
            for key, sampler in samplers.items():
                holder = {}

                def run(sampler=sampler, holder=holder, repeat=repeat):
                    holder["result"] = sampler.run(jax.random.key(repeat + 1))
                    jax.block_until_ready(holder["result"].log_marginal)

                times[key].append(time_once(run))
                if key == "constrained":
                    result = holder["result"]
                    log_marginals.append(float(result.log_marginal))
                    texts = result.text("s")
                    valid += sum(_member(pattern, text) for text in texts)
                    total += len(texts)
        per_token = {key: median(values) / steps * 1e3 for key, values in times.items()}
        rows.append(
            [
                name,
                automaton.num_states,
                automaton.num_classes,
                f"{build_seconds:.2f}",
                steps,
                f"{per_token['constrained']:.0f}",
                f"{per_token['free']:.0f}",
                f"{per_token['constrained'] / per_token['free']:.2f}",
                f"{valid}/{total}",
                f"{np.mean(log_marginals):.2f} ± {np.std(log_marginals):.2f}",
            ]
        )
        say(rows[-1])
    say(f"\n{options.model}, N = {options.particles}, {options.repeats} repeats (interleaved)\n")
    say(
        markdown_table(
            [
                "constraint",
                "states",
                "token classes",
                "build s",
                "T",
                "constrained ms/token",
                "free ms/token",
                "ratio",
                "valid",
                "log Ẑ (mean ± sd)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
