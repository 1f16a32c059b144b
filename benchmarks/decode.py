"""Batched sampling throughput: ``lmppl.generate`` against transformers' ``generate``.

For each model and each number of rows N, both libraries sample N continuations of
``new_tokens`` tokens from the same prompt with the same float32 weights (the torch
``LlamaForCausalLM`` is built from the tensors lmppl's reader produces), with ancestral
sampling from the full distribution (torch: ``do_sample=True, top_k=0, top_p=1``,
``min_new_tokens = max_new_tokens`` so that it generates exactly as many tokens; lmppl:
``stop_at_eos=False``). Throughput is ``N * new_tokens / seconds``, prefill included,
compilation excluded (one warm-up call per shape). The two are timed interleaved and the
ratio ``lmppl / torch`` of median throughputs is reported (> 1: lmppl is faster).

A torch call is stopped after ``--torch-time-limit`` seconds (``generate(max_time=...)``);
its throughput is then computed from the tokens it did generate and the row is marked
``capped``.

    python benchmarks/decode.py                       # the full table (~15 min on 2 cores)
    python benchmarks/decode.py --quick               # smoke test (< 60 s)
    python benchmarks/decode.py --models stories260k --rows 1 16 256 --repeats 5
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

import jax
from common import (
    PROMPT,
    environment_line,
    load_lm,
    load_torch_llama,
    markdown_table,
    median,
    say,
    time_once,
)

__all__ = ["DecodeRow", "lmppl_sampler", "main", "run_benchmark", "torch_sampler"]


class DecodeRow(NamedTuple):
    """One line of the table: median throughputs (tokens/s) of both libraries."""

    model: str
    rows: int
    lmppl_tokens_per_second: float
    torch_tokens_per_second: float
    torch_capped: bool

    @property
    def ratio(self) -> float:
        """lmppl throughput / torch throughput (> 1: lmppl is faster)."""
        return self.lmppl_tokens_per_second / self.torch_tokens_per_second


def lmppl_sampler(lm, rows: int, new_tokens: int) -> Callable[[int], tuple[float, int]]:
    """``run(seed) -> (seconds, tokens generated)`` for one ``lmppl.generate`` call."""
    import lmppl

    def run(seed: int) -> tuple[float, int]:
        key = jax.random.key(seed)
        seconds = time_once(
            lambda: (
                lmppl.generate(
                    lm,
                    PROMPT,
                    num_samples=rows,
                    max_new_tokens=new_tokens,
                    stop_at_eos=False,
                    rng_key=key,
                ).tokens
            )
        )
        return seconds, rows * new_tokens

    return run


def torch_sampler(
    model, prompt_ids: list[int], rows: int, new_tokens: int, time_limit: float
) -> Callable[[int], tuple[float, int]]:
    """``run(seed) -> (seconds, tokens generated)`` for one transformers ``generate`` call."""
    import time

    import torch

    input_ids = torch.tensor([prompt_ids])

    def run(seed: int) -> tuple[float, int]:
        torch.manual_seed(seed)
        with torch.inference_mode():
            start = time.perf_counter()
            output = model.generate(
                input_ids,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                num_return_sequences=rows,
                max_time=time_limit,
            )
            seconds = time.perf_counter() - start
        return seconds, rows * (output.shape[1] - len(prompt_ids))

    return run


def run_benchmark(
    models: list[str],
    row_counts: list[int],
    new_tokens: int,
    repeats: int,
    torch_time_limit: float,
    torch_threads: int,
) -> list[DecodeRow]:
    """Measure every (model, N), printing each row as it completes."""
    results = []
    for name in models:
        lm = load_lm(name)
        torch_model = load_torch_llama(name, num_threads=torch_threads)
        prompt_ids = lm.tokenizer.encode(PROMPT)
        for rows in row_counts:
            run_lmppl = lmppl_sampler(lm, rows, new_tokens)
            run_torch = torch_sampler(torch_model, prompt_ids, rows, new_tokens, torch_time_limit)
            compile_seconds, _ = run_lmppl(0)  # warm-up: compiles this shape
            torch_sampler(torch_model, prompt_ids, rows, 2, torch_time_limit)(0)
            lmppl_speeds, torch_speeds, capped = [], [], False
            for repeat in range(1, repeats + 1):
                seconds, tokens = run_lmppl(repeat)
                lmppl_speeds.append(tokens / seconds)
                if capped:
                    continue  # one capped torch call is estimate enough
                seconds, tokens = run_torch(repeat)
                torch_speeds.append(tokens / seconds)
                capped = tokens < rows * new_tokens
                if capped:
                    say(
                        f"  torch capped: {tokens // rows} of {new_tokens} tokens in {seconds:.0f} s"
                    )
            row = DecodeRow(name, rows, median(lmppl_speeds), median(torch_speeds), capped)
            results.append(row)
            say(
                f"{name:>13} N={rows:<4} lmppl {row.lmppl_tokens_per_second:9.1f} tok/s  "
                f"torch {row.torch_tokens_per_second:9.1f} tok/s{' (capped)' if capped else ''}  "
                f"ratio lmppl/torch {row.ratio:6.2f}   (first lmppl call, compile or cache load: {compile_seconds:.1f} s)"
            )
        del torch_model
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["stories260k", "smollm2-135m"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16, 256])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-time-limit", type=float, default=120.0)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    options = parser.parse_args(argv)
    if options.quick:
        options.models, options.rows, options.new_tokens, options.repeats = (
            ["stories260k"],
            [1, 4],
            8,
            1,
        )
    say(environment_line())
    say(
        f"models {options.models}, rows {options.rows}, new tokens {options.new_tokens}, "
        f"repeats {options.repeats} (interleaved), torch threads {options.torch_threads}"
    )
    results = run_benchmark(
        options.models,
        options.rows,
        options.new_tokens,
        options.repeats,
        options.torch_time_limit,
        options.torch_threads,
    )
    table = [
        (
            row.model,
            row.rows,
            f"{row.lmppl_tokens_per_second:.0f}",
            f"{row.torch_tokens_per_second:.1f}" + (" (capped)" if row.torch_capped else ""),
            f"{row.ratio:.2f}",
        )
        for row in results
    ]
    say()
    say(markdown_table(["model", "N", "lmppl tok/s", "torch tok/s", "ratio lmppl/torch"], table))


if __name__ == "__main__":
    main()
