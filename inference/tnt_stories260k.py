"""Targeted negative training on stories260K: stop " Lily", change little else (one command).

The real 260K-parameter TinyStories Llama, prompted with "Once upon a time,", names its
heroine " Lily" (one token) in about a third of its stories. That is the unwanted
behaviour. The script

1. samples N of the model's own stories (T tokens) and annotates every " Lily" token
   (``lmppl.tnt.from_detector``);
2. fine-tunes a copy of the model with each TNT loss (TNFF, TNRF, TNRR, TNFLL, TNRLL) and
   the baselines NL and UL (``lmppl.tnt.train``; Adam, the same steps, batch and α for
   all), evaluating after several numbers of steps;
3. samples the exact minimal targeted update σ(s) = p_o(s) 1[no " Lily"] / Z, both with
   bootstrap SMC on the banned-token program (``lmppl.tnt.estimate_minimal_update``,
   which also estimates Z) and by rejection from p_o coupled to the evaluation stories
   (a clean old story is kept as it is, a story with " Lily" is replaced by the next
   clean fresh draw: exact samples of σ that change nothing they need not change);
4. reports for every model its prevalence of " Lily" (token level, and the word in the
   decoded text), BLEU-4 against the old model's stories drawn with the same random key
   (paired: an unchanged model scores 100), BLEU against the old stories as a reference
   set (unpaired), and KL(σ ‖ p_θ), the distance to the minimal targeted update,
   estimated with the exact rejection samples of σ:
   ``KL = E_σ[log p_o(s) − log p_θ(s)] − log Z``;
5. writes ``<out>.md`` / ``<out>.csv`` (table), ``<out>.png`` (trade-off plot) and the
   TNFF-updated parameters ``<out>_tnff.npz``, which load back into a model with
   ``lmppl.tnt.load_params(path, lmppl.load("stories260k"))``.

    python inference/tnt_stories260k.py                       # ~10 minutes on 2 CPU cores
    python inference/tnt_stories260k.py --small --out /tmp/tnt  # ~2 minutes
"""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import lmppl
from lmppl import tnt

PROMPT = "Once upon a time,"
WORD = "Lily"
METHODS = ("tnff", "tnrf", "tnrr", "tnfll", "tnrll", "nl", "ul")
COLUMNS = (
    "method",
    "steps",
    "prevalence",
    "prevalence_text",
    "bleu_paired",
    "bleu_unpaired",
    "kl_sigma",
    "kl_sigma_se",
)


def settings(args) -> dict:
    small = args.small
    return {
        "num_generations": args.generations or (128 if small else 512),
        "num_tokens": args.tokens or (24 if small else 40),
        "num_eval": args.eval_samples or (128 if small else 512),
        "eval_steps": args.eval_steps or ([10, 30] if small else [25, 50, 100]),
        "batch_size": args.batch_size or (16 if small else 32),
        "learning_rate": args.learning_rate,
        "alpha": args.alpha,
        "smc_particles": args.smc_particles or (128 if small else 512),
        "smc_runs": args.smc_runs or (4 if small else 8),
        "methods": args.methods,
    }


class Evaluator:
    """Metrics of a model's stories against the old model's, with shared compiled samplers."""

    def __init__(self, lm, unwanted, num_tokens, num_eval, rng_key):
        self.lm, self.unwanted, self.num_tokens = lm, unwanted, num_tokens
        self.eos = lm.tokenizer.eos_token_id
        self.key = rng_key
        self.num_eval = num_eval
        self.old = self.sample(lm.params)
        self.word = re.compile(rf"\b{WORD}\b")

    def dist(self, params):
        # the old LanguageModel with other parameters: one compiled sampler / scorer for all
        return lmppl.LM(self.lm, PROMPT, self.num_tokens, params=params)

    def sample(self, params, key=None):
        return self.dist(params).sample(self.key if key is None else key, (self.num_eval,))

    def text_prevalence(self, tokens):
        texts = [self.lm.tokenizer.decode(row) for row in tnt.metrics.trim(tokens, self.eos)]
        return float(np.mean([bool(self.word.search(t)) for t in texts]))

    def metrics(self, tokens, *, paired=True):
        return {
            "prevalence": tnt.prevalence(tokens, self.unwanted, eos_token_id=self.eos),
            "prevalence_text": self.text_prevalence(tokens),
            "bleu_paired": tnt.bleu_to_old(tokens, self.old, eos_token_id=self.eos)
            if paired
            else math.nan,
            "bleu_unpaired": tnt.bleu_to_old(tokens, self.old, eos_token_id=self.eos, paired=False),
        }

    def coupled_rejection(self, key):
        """Exact samples of σ coupled to the old evaluation stories (see the docstring)."""
        dirty = tnt.contains_unwanted(self.old, self.unwanted, eos_token_id=self.eos)
        pool = np.asarray(self.dist(self.lm.params).sample(key, (3 * self.num_eval,)))
        clean = pool[~tnt.contains_unwanted(pool, self.unwanted, eos_token_id=self.eos)]
        if len(clean) < dirty.sum():
            raise RuntimeError("too few clean fresh stories for the rejection sampler")
        samples = np.array(self.old)
        samples[dirty] = clean[: dirty.sum()]
        return samples, 1.0 - float(dirty.mean())

    def kl_to_sigma(self, params, sigma_samples, log_z):
        """``KL(σ ‖ p_θ) = E_σ[log p_o − log p_θ] − log Z`` and its standard error."""
        samples = jnp.asarray(sigma_samples)
        log_old = np.asarray(self.dist(self.lm.params).log_prob(samples), np.float64)
        log_new = np.asarray(self.dist(params).log_prob(samples), np.float64)
        difference = log_old - log_new
        se = float(difference.std(ddof=1) / np.sqrt(len(difference)))
        return float(difference.mean() - log_z), se


def write_outputs(out: pathlib.Path, rows, config, facts, command, seconds):
    with out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in COLUMNS})

    def fmt(value, digits=3):
        return "–" if isinstance(value, float) and math.isnan(value) else f"{value:.{digits}f}"

    lines = [
        '# TNT on stories260K: stop " Lily", change little else',
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min on this machine's CPU).",
        "",
        f'Old model p_o: `lmppl.load("stories260k")`, prompt "{PROMPT}", '
        f'T = {config["num_tokens"]} tokens. Unwanted behaviour: the token " {WORD}" '
        f"(id {facts['unwanted']}). Training data: {config['num_generations']} of the model's own "
        f'stories, {facts["annotated_rows"]} of them with " {WORD}" '
        f"({facts['annotated_tokens']} annotated tokens). Every method: Adam, learning rate "
        f"{config['learning_rate']}, batch {config['batch_size']}, α = {config['alpha']}, "
        f"evaluated after {', '.join(map(str, config['eval_steps']))} steps on "
        f"{config['num_eval']} stories sampled with the same key as the old model's "
        "evaluation stories. α = 10 rather than the paper's 1e4: with Adam on this 260K model, "
        "α = 1e4 needs a smaller learning rate and gave a worse trade-off for TNFF and UL in a "
        "pilot run (`--alpha 1e4 --learning-rate 1e-4`).",
        "",
        f'Exact target σ = p_o · 1[no " {WORD}"] / Z: SMC ({config["smc_runs"]} runs × '
        f"{config['smc_particles']} particles) gives log Z = {facts['log_z']:.4f}, i.e. the old "
        f"model's prevalence 1 − Z = {facts['smc_prevalence']:.4f} ± {facts['smc_prevalence_se']:.4f}"
        f" (Monte Carlo: {facts['old_prevalence']:.4f} over the evaluation stories).",
        "",
        "| method | steps | prevalence (token) | prevalence (word in text) | BLEU paired | "
        "BLEU unpaired | KL(σ ‖ p_θ) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        kl = (
            f"{fmt(row['kl_sigma'])} ± {fmt(row['kl_sigma_se'])}"
            if not math.isnan(row["kl_sigma"])
            else "–"
        )
        lines.append(
            f"| {row['method']} | {row['steps']} | {fmt(row['prevalence'])} | "
            f"{fmt(row['prevalence_text'])} | {fmt(row['bleu_paired'], 1)} | "
            f"{fmt(row['bleu_unpaired'], 1)} | {kl} |"
        )
    lines += [
        "",
        "Columns. *prevalence*: fraction of stories with the token (or, in the text, the "
        f'word "{WORD}" however it is spelled in tokens). *BLEU paired*: corpus BLEU-4 on '
        "token ids of story i against the old model's story i drawn with the same key (same "
        "Gumbel noise: an unchanged model scores 100; two independent old-model draws score "
        "the `old model (fresh key)` row). *BLEU unpaired*: every story against all old "
        "stories as references. *KL(σ ‖ p_θ)*: distance to the exact minimal targeted "
        "update, from the exact rejection samples of σ and the SMC log Z "
        "(`E_σ[log p_o − log p_θ] − log Z`, ± one standard error); for the old model it is "
        "−log Z. `exact σ (SMC)`: resampled particles of the banned-token program; `exact σ "
        "(coupled rejection)`: clean old stories kept, the others replaced by clean fresh "
        "draws of p_o.",
        "",
        "Load the TNFF model (saved after the last step):",
        "",
        "```python",
        'lm = lmppl.load("stories260k")',
        f'lm_tnff = lmppl.tnt.load_params("{facts["params_path"]}", lm)  # same graph, new params',
        "# DeRa between the two: lmppl.realign(lm, lm_tnff, ...)",
        "```",
        "",
        f"![trade-off]({out.name}.png)",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


def plot(out: pathlib.Path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "bleu_paired", "BLEU to the old stories (paired, same key)"),
        (axes[1], "kl_sigma", "KL(σ ‖ p_θ) to the minimal targeted update"),
    ):
        for method in METHODS:
            points = [r for r in rows if r["method"] == method]
            if points:
                ax.plot(
                    [r[key] for r in points],
                    [r["prevalence"] for r in points],
                    "o-",
                    label=method.upper(),
                )
        for r in rows:
            if r["method"].startswith(("old", "exact")) and not math.isnan(r[key]):
                ax.plot(r[key], r["prevalence"], "k*" if "exact" in r["method"] else "ks", ms=10)
                ax.annotate(
                    r["method"],
                    (r[key], r["prevalence"]),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
        ax.set_xlabel(label)
        ax.set_ylabel('prevalence of " Lily" (symlog)')
        ax.set_yscale("symlog", linthresh=0.01)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("TNT on stories260K: prevalence vs similarity (points: increasing steps)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="inference/results/tnt_stories260k")
    parser.add_argument("--small", action="store_true", help="fewer stories and steps (~2 min)")
    parser.add_argument("--generations", type=int, help="training stories N (512, small 128)")
    parser.add_argument("--tokens", type=int, help="T (40, small 24)")
    parser.add_argument("--eval-samples", type=int, help="evaluation stories (512, small 128)")
    parser.add_argument("--eval-steps", type=int, nargs="+", help="evaluate after these steps")
    parser.add_argument("--batch-size", type=int, help="(32, small 16)")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--alpha", type=float, default=10.0, help="weight of annotated tokens")
    parser.add_argument("--smc-particles", type=int)
    parser.add_argument("--smc-runs", type=int)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = settings(args)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python inference/tnt_stories260k.py" + (" " + " ".join(argv) if argv else "")
    started = time.time()
    keys = jax.random.split(jax.random.key(args.seed), 6)

    lm = lmppl.load("stories260k")
    unwanted = [v for v in range(lm.vocab_size) if lm.tokenizer.decode([v]).strip() == WORD]
    num_tokens = config["num_tokens"]
    generations = lmppl.LM(lm, PROMPT, num_tokens).sample(keys[0], (config["num_generations"],))
    annotations = tnt.from_detector(generations, unwanted, eos_token_id=lm.tokenizer.eos_token_id)
    print(
        f"{int(annotations.negative_rows.sum())}/{len(generations)} training stories say "
        f"' {WORD}' ({annotations.num_annotated} tokens)"
    )
    dataset = tnt.build_dataset(lm, PROMPT, generations, annotations)
    evaluator = Evaluator(lm, unwanted, num_tokens, config["num_eval"], keys[1])

    exact = tnt.estimate_minimal_update(
        lm,
        PROMPT,
        num_tokens,
        unwanted,
        num_particles=config["smc_particles"],
        num_runs=config["smc_runs"],
        rng_key=keys[2],
    )
    coupled, acceptance = evaluator.coupled_rejection(keys[3])
    rows = []

    def add(method, steps, tokens, params=None, paired=True):
        row = {"method": method, "steps": steps, **evaluator.metrics(tokens, paired=paired)}
        kl, se = (math.nan, math.nan)
        if params is not None:
            kl, se = evaluator.kl_to_sigma(params, coupled, exact.log_z)
        row.update(kl_sigma=kl, kl_sigma_se=se)
        rows.append(row)
        print(
            f"{method:>28} {steps:>4}: prevalence {row['prevalence']:.3f} "
            f"(text {row['prevalence_text']:.3f}), BLEU {row['bleu_paired']:.1f} / "
            f"{row['bleu_unpaired']:.1f}, KL(σ‖p) {kl:.3f}"
        )

    add("old model", 0, evaluator.old, lm.params)
    add("old model (fresh key)", 0, evaluator.sample(lm.params, keys[4]))
    add("exact σ (SMC)", 0, exact.samples, paired=False)
    add("exact σ (coupled rejection)", 0, coupled)

    params_path = out.parent / f"{out.name}_tnff.npz"
    for method in config["methods"]:
        # train once, evaluating on the way: each call resumes from the last checkpoint
        with tempfile.TemporaryDirectory() as checkpoints:
            for steps in config["eval_steps"]:
                lm_new, _ = tnt.train(
                    lm,
                    PROMPT,
                    None,
                    None,
                    method,
                    dataset=dataset,
                    num_steps=steps,
                    learning_rate=config["learning_rate"],
                    alpha=config["alpha"],
                    batch_size=config["batch_size"],
                    rng_key=keys[5],
                    checkpoint_dir=checkpoints,
                    checkpoint_every=0,
                )
                add(method, steps, evaluator.sample(lm_new.params), lm_new.params)
        if method == "tnff":
            tnt.save_params(params_path, lm_new)
    seconds = time.time() - started
    facts = {
        "unwanted": ", ".join(map(str, unwanted)),
        "annotated_rows": int(annotations.negative_rows.sum()),
        "annotated_tokens": annotations.num_annotated,
        "log_z": exact.log_z,
        "smc_prevalence": exact.prevalence,
        "smc_prevalence_se": exact.prevalence_se,
        "old_prevalence": 1.0 - acceptance,
        "params_path": str(params_path),
    }
    write_outputs(out, rows, config, facts, command, seconds)
    plot(out, rows)
    print(f"wrote {out}.md/.csv/.png and {params_path} in {seconds / 60:.1f} min")
    return rows


if __name__ == "__main__":
    lmppl.enable_compilation_cache()
    main()
