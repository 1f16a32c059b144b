"""Bidirectional log Z bounds on stories260K with a real host classifier (one command).

Target: σ(s) ∝ p0(s) · p(offensive | s), with p0 the stories260K Llama continuing
"Once upon a time, there was a" for T tokens and p(offensive | s) the probability of
alt-profanity-check's linear classifier on the decoded story (the paper's toxicity
classifier task, offline). Exact samples of σ come from rejection: draw s ~ p0, draw a
label c ~ p(c | s), keep s when c is "offensive".

For SIS, bootstrap SMC (p0 proposal, resampling every step) and twisted SMC (an
untrained twist, log ψ ≡ 0, until a learned one is plugged in), the script measures
lower bounds E[log Ẑ_K] and conditional-SMC upper bounds at each K, the KL divergences
between p0 and σ, and writes ``<out>.png`` (bounds against K), ``<out>.md`` and
``<out>.csv``.

    python inference/bounds.py --out inference/results/bounds_stories260k --small
"""

from __future__ import annotations

import argparse
import pathlib
import time
import warnings

import jax
import jax.numpy as jnp
import numpyro
from tqdm.auto import tqdm

import lmppl
from lmppl import evaluation, plots, potentials

PROMPT = "Once upon a time, there was a"


def offensive_probability():
    """alt-profanity-check's ``predict_prob`` (imported lazily; it warns on import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from profanity_check import predict_prob
    return predict_prob


def make_program(lm, num_tokens: int):
    offensive = potentials.text_classifier(
        offensive_probability(), lm.tokenizer, target_class=1, name="profanity"
    )

    def offensive_story():
        story = numpyro.sample(
            "story", lmppl.LM(lm, prompt=PROMPT, max_new_tokens=num_tokens, stop_at_eos=False)
        )
        numpyro.factor("offensive", offensive(story))

    return offensive_story


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="inference/results/bounds_stories260k")
    parser.add_argument("--small", action="store_true", help="few runs, T = 10 (minutes on CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="T (default 20, small 10)")
    parser.add_argument("--runs", type=int, default=None, help="runs per K (default 32, small 8)")
    parser.add_argument(
        "--kl-samples",
        type=int,
        default=None,
        help="exact samples for KL (default 1000, small 100)",
    )
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    num_tokens = args.tokens or (10 if args.small else 20)
    num_runs = args.runs or (8 if args.small else 32)
    num_exact = max(num_runs, args.kl_samples or (100 if args.small else 1000))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()

    lm = lmppl.load("stories260k")
    program = make_program(lm, num_tokens)
    zero_twist = lambda inputs: jnp.zeros((inputs.tokens.shape[0], lm.vocab_size))
    methods = {
        "SIS (p0)": lmppl.infer.ImportanceSampling,
        "SMC (p0)": lambda p, k: lmppl.infer.SMC(p, k, ess_threshold=1.0),
        "Twisted SMC (untrained twist)": lambda p, k: lmppl.infer.TwistedSMC(
            p, k, twists={"story": zero_twist}
        ),
    }
    keys = jax.random.split(jax.random.key(args.seed), 3)

    with tqdm(total=num_exact, desc="exact samples (rejection)") as bar:
        exact = evaluation.rejection_sample(
            program,
            keys[0],
            num_exact,
            batch_size=512,
            max_draws=200_000,
            progress=lambda accepted, drawn: bar.update(min(accepted, num_exact) - bar.n),
        )
    table = evaluation.BoundsTable([])
    with tqdm(total=len(methods) * len(args.particles), desc="bounds") as bar:
        for index, (name, backend) in enumerate(methods.items()):
            for k in args.particles:
                bar.set_postfix(method=name, K=k)
                key = jax.random.fold_in(jax.random.fold_in(keys[1], index), k)
                table = table + evaluation.log_z_bounds(
                    program, backend, exact, [k], num_runs, key, name=name
                )
                bar.update()
    log_z = table.log_z_estimate()
    kl = evaluation.kl_estimates(
        program, lmppl.infer.ImportanceSampling, exact, log_z, keys[2], num_samples=512
    )

    title = f"stories260K, φ = p(offensive | s), T = {num_tokens}, {num_runs} runs per K"
    plots.plot_bounds(table, path=out.with_suffix(".png"), title=title)
    table.to_csv(out.with_suffix(".csv"))
    report = [
        f"# log Z bounds: {title}",
        "",
        f"Prompt {PROMPT!r}; classifier alt-profanity-check `predict_prob` (target class 1).",
        f"Exact samples: rejection from p0, acceptance rate {exact.acceptance_rate:.4f} "
        f"({exact.num_draws} draws; it estimates Z, log = "
        f"{jnp.log(exact.acceptance_rate):.3f}).",
        "Bounds: mean ± 95% half-width over runs; upper bounds by conditional SMC with one "
        f"particle clamped to an exact sample (run r uses sample r of the first {num_runs}). The untrained twist (log ψ ≡ 0) makes twisted "
        "SMC bootstrap SMC with resampling at every step, so its curves match SMC (p0) up to "
        "Monte Carlo error.",
        "",
        table.to_markdown(),
        f"KL between p0 and σ (Eq. 23; log Z from the tightest pair; E_p0 over 5 seeds × 512 "
        f"samples, E_σ over {exact.num_samples} exact samples in 5 batches):",
        "",
        kl.to_markdown("p0"),
        f"Produced by `python inference/bounds.py --out {args.out}"
        + (" --small" if args.small else "")
        + f"` in {time.time() - started:.0f} s.",
    ]
    out.with_suffix(".md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    lmppl.enable_compilation_cache()
    main()
