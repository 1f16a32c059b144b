"""Bounds on log Z of regex / JSON-schema constraints on SmolLM2: both sides, from exact samples.

log Z of a bare constraint is the log-probability that p0's text is in the language. The
lower bound is the mean of SMC's log Ẑ; the upper bound is the mean of conditional SMC's
log Ẑ with exact samples of σ as references (:func:`lmppl.evaluation.log_z_bounds`). Exact
samples come from rejection from the masked proposal, which accepts with probability Z, so
the prompts are few-shot prompts under which valid text is likely (with a bare instruction
Z is about e^-13 and rejection is hopeless; see RESULTS.md):

* date: ``[0-9]{4}-[0-9]{2}-[0-9]{2}`` on exactly 10 tokens (SmolLM2 splits digits), after
  three "event: date" lines;
* JSON: an object with a string, an integer and an enum, ended by the chat model's EOS,
  after two chat turns that answer with such objects.

    python benchmarks/constraint_bounds.py            # K 4 16 64, 8 runs, 16 exact samples
    python benchmarks/constraint_bounds.py --quick    # K 4, 2 runs, 2 exact samples (smoke)
"""

from __future__ import annotations

import argparse
import time

import jax
import numpyro
from common import environment_line, load_lm, markdown_table, say

import lmppl
from lmppl import evaluation, potentials

__all__ = ["main"]

DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
DATE_PROMPT = (
    "Dates in ISO 8601 format.\n"
    "The first moon landing: 1969-07-20\n"
    "The fall of the Berlin Wall: 1989-11-09\n"
    "The signing of the US Declaration of Independence: "
)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
}


def _turn(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


JSON_PROMPT = (
    _turn("system", "You answer with one JSON object and nothing else.")
    + _turn("user", "A person with a name, an age and a favourite color.")
    + _turn("assistant", '{"name": "Anna", "age": 34, "color": "green"}')
    + _turn("user", "Another one.")
    + _turn("assistant", '{"name": "Tom", "age": 51, "color": "red"}')
    + _turn("user", "Another one.")
    + "<|im_start|>assistant\n"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--particles", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--exact", type=int, default=16, help="exact samples by rejection")
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    options = parser.parse_args(argv)
    if options.quick:
        options.particles, options.runs, options.exact = [4], 2, 2
    say(environment_line())
    lm = load_lm(options.model)
    eos = lm.eos_token_id
    date = potentials.regex(DATE, lm)
    person = potentials.json_schema(PERSON, lm)

    def date_program():
        s = numpyro.sample("s", lmppl.LM(lm, DATE_PROMPT, 10, stop_at_eos=False))
        potentials.constrain("date", s, date, eos_token_id=None)

    def json_program():
        s = numpyro.sample("s", lmppl.LM(lm, JSON_PROMPT, 24))
        potentials.constrain("person", s, person, eos_token_id=eos)

    rows = []
    for name, program in (("date", date_program), ("JSON person", json_program)):
        start = time.perf_counter()
        exact = evaluation.rejection_sample(
            program, jax.random.key(1), options.exact, batch_size=64, max_draws=20_000
        )
        say(
            f"{name}: {exact.num_samples} exact samples from {exact.num_draws} draws "
            f"(acceptance {exact.acceptance_rate:.3f}) in {time.perf_counter() - start:.0f} s"
        )
        table = evaluation.log_z_bounds(
            program,
            lambda p, k: lmppl.infer.SMC(p, k, ess_threshold=1.0),
            exact,
            options.particles,
            options.runs,
            jax.random.key(2),
            name=name,
        )
        for row in table.rows:
            rows.append(
                [
                    name,
                    row.num_particles,
                    f"{row.lower.mean:.3f} ± {row.lower.half_width:.3f}",
                    f"{row.upper.mean:.3f} ± {row.upper.half_width:.3f}",
                    f"{row.gap:.3f}",
                    f"{exact.acceptance_rate:.3f}",
                ]
            )
            say(rows[-1])
    say(f"\n{options.model}, SMC (resampling every step), {options.runs} runs per K\n")
    say(
        markdown_table(
            [
                "constraint",
                "K",
                "lower (mean ± 95%)",
                "upper (mean ± 95%)",
                "gap",
                "rejection acceptance (≈ Z)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
