"""DeRa λ sweep on stories260K: from the original model to its TNT-updated copy (one command).

The reference π_ref is the real stories260K Llama; the "aligned" model π_al is its copy
fine-tuned by targeted negative training (TNFF) not to name its heroine " Lily"
(``inference/tnt_stories260k.py`` writes ``tnt_stories260k_tnff.npz``). Decoding-time
realignment (Liu et al. 2024) interpolates (λ ∈ [0, 1]) and extrapolates (λ > 1) between
them without retraining. For every λ the script measures, on stories after
"Once upon a time,":

* token mode, ``softmax(λ h_al + (1 − λ) h_ref)`` per step: N stories sampled for all λ
  in one ``jax.vmap`` over λ, with the same random key as the reference's stories
  (coupled draws); prevalence of " Lily" and paired BLEU-4 against the reference's
  stories (100 = unchanged);
* global mode, the exact sequence-level mixture ``π_ref^(1−λ) π_al^λ / Z_λ``: bootstrap
  SMC with K particles (again one vmap over λ of the compiled sweep), the weighted
  prevalence of " Lily" (a self-normalised estimate under σ_λ), and log Ẑ_λ over R runs
  (log Z_0 = log Z_1 = 0; for 0 < λ < 1, log Z_λ ≤ 0 by Hölder's inequality).

Outputs ``<out>.md`` / ``<out>.csv`` (table with the command) and ``<out>.png`` (prevalence
and BLEU against λ).

    python inference/realign_stories260k.py                      # ~3 minutes on 2 CPU cores
    python inference/realign_stories260k.py --small --out /tmp/dera
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from scipy.special import logsumexp

import lmppl
from lmppl import tnt

PROMPT = "Once upon a time,"
WORD = "Lily"
COLUMNS = (
    "lam",
    "token_prevalence",
    "token_bleu_paired",
    "global_prevalence",
    "global_log_z",
    "global_log_z_half_width",
    "global_ess",
)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aligned", default="inference/results/tnt_stories260k_tnff.npz")
    parser.add_argument("--out", default="inference/results/realign_stories260k")
    parser.add_argument(
        "--lams", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
    )
    parser.add_argument("--samples", type=int, default=None, help="stories per λ (512; small 64)")
    parser.add_argument("--tokens", type=int, default=None, help="T (32; small 16)")
    parser.add_argument("--particles", type=int, default=None, help="K of SMC (256; small 32)")
    parser.add_argument("--runs", type=int, default=None, help="SMC runs per λ (8; small 2)")
    parser.add_argument("--small", action="store_true", help="a quick run (well under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    small = args.small
    num_samples = args.samples or (64 if small else 512)
    num_tokens = args.tokens or (16 if small else 32)
    num_particles = args.particles or (32 if small else 256)
    num_runs = args.runs or (2 if small else 8)
    aligned_path = pathlib.Path(args.aligned)
    if not aligned_path.exists():
        sys.exit(
            f"error: {aligned_path} not found; run `python inference/tnt_stories260k.py` first "
            "(it writes the TNT-updated parameters)"
        )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    ref = lmppl.load("stories260k")
    aligned = tnt.load_params(aligned_path, ref, name="stories260k-tnff")
    unwanted = [v for v in range(ref.vocab_size) if ref.tokenizer.decode([v]).strip() == WORD]
    lams = jnp.asarray(args.lams, jnp.float32)
    key_old, key_smc = jax.random.split(jax.random.key(args.seed))

    # Token mode: all λ in one vmap, the same key as the reference's own stories.
    token = lmppl.realign(ref, aligned, 0.0)
    dist = lmppl.LM(token, PROMPT, max_new_tokens=num_tokens, stop_at_eos=False)
    old = np.asarray(
        lmppl.LM(ref, PROMPT, max_new_tokens=num_tokens, stop_at_eos=False).sample(
            key_old, (num_samples,)
        )
    )
    sample_at = lambda lam: dist.with_params(token.with_lam(token.params, lam)).sample(
        key_old, (num_samples,)
    )
    token_samples = np.asarray(jax.vmap(sample_at)(lams))

    # Global mode: the exact geometric mixture by SMC, the compiled sweep vmapped over λ.
    mixture = lmppl.realign(ref, aligned, 0.0, mode="global")

    def story():
        numpyro.sample(
            "story", lmppl.LM(mixture, PROMPT, max_new_tokens=num_tokens, stop_at_eos=False)
        )

    structure, sweep, arrays, _ = lmppl.infer.SMC(story, num_particles).compile()

    def run_at(lam, key):
        params = structure.model_params({mixture.name: mixture.with_lam(mixture.params, lam)})
        output = sweep(key, params, None, arrays, None)
        return output.tokens, output.log_weights, output.log_marginal

    keys = jax.random.split(key_smc, num_runs)
    smc_tokens, smc_log_weights, smc_log_z = jax.vmap(
        lambda lam: jax.vmap(lambda key: run_at(lam, key))(keys)
    )(lams)
    smc_tokens, smc_log_weights = np.asarray(smc_tokens), np.asarray(smc_log_weights, np.float64)
    smc_log_z = np.asarray(smc_log_z, np.float64)

    rows = []
    for i, lam in enumerate(args.lams):
        weights = np.exp(smc_log_weights[i] - logsumexp(smc_log_weights[i], axis=-1, keepdims=True))
        has_word = np.stack(
            [tnt.contains_unwanted(smc_tokens[i, r], unwanted) for r in range(num_runs)]
        )
        ess = 1.0 / np.sum(weights**2, axis=-1)
        half = 1.96 * smc_log_z[i].std(ddof=1) / np.sqrt(num_runs) if num_runs > 1 else float("nan")
        rows.append(
            {
                "lam": lam,
                "token_prevalence": tnt.prevalence(token_samples[i], unwanted),
                "token_bleu_paired": tnt.bleu_to_old(token_samples[i], old, paired=True),
                "global_prevalence": float(np.mean(np.sum(weights * has_word, axis=-1))),
                "global_log_z": float(smc_log_z[i].mean()),
                "global_log_z_half_width": float(half),
                "global_ess": float(ess.mean() / num_particles),
            }
        )
    seconds = time.perf_counter() - started
    command = "python inference/realign_stories260k.py " + " ".join(argv or sys.argv[1:])
    write_table(
        out, rows, command.strip(), seconds, num_samples, num_tokens, num_particles, num_runs
    )
    plot(out, rows)
    print((out.with_suffix(".md")).read_text())
    print(f"figure: {out.with_suffix('.png')}")


def write_table(out, rows, command, seconds, num_samples, num_tokens, num_particles, num_runs):
    with open(out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        '# DeRa λ sweep on stories260K: original → TNT (TNFF, no " Lily")',
        "",
        f"`{command}` ({seconds:.0f} s on CPU). T = {num_tokens} tokens after "
        f'"{PROMPT}"; token mode: {num_samples} stories per λ (same key for every λ and for '
        f"the reference, so BLEU is paired); global mode: SMC with K = {num_particles}, "
        f"{num_runs} runs per λ (prevalence is the self-normalised weighted estimate, averaged "
        "over runs; log Ẑ ± 95% half-width over runs; ESS as a fraction of K after the last step).",
        "",
        "| λ | token: prevalence | token: BLEU vs ref | global: prevalence | global: log Ẑ_λ | global: ESS/K |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lam']:g} | {r['token_prevalence']:.3f} | {r['token_bleu_paired']:.1f} | "
            f"{r['global_prevalence']:.3f} | {r['global_log_z']:.3f} ± "
            f"{r['global_log_z_half_width']:.3f} | {r['global_ess']:.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot(out, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [r["lam"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(lam, [r["token_prevalence"] for r in rows], "o-", label="token mode (per-step mix)")
    left.plot(lam, [r["global_prevalence"] for r in rows], "s--", label="global mode (SMC, exact)")
    left.set_xlabel("λ  (0 = original, 1 = TNT model)")
    left.set_ylabel(f'prevalence of "{WORD}"')
    left.axvline(1.0, color="grey", lw=0.5)
    left.legend()
    right.plot(lam, [r["token_bleu_paired"] for r in rows], "o-", color="C2")
    right.set_xlabel("λ")
    right.set_ylabel("BLEU-4 vs original stories (paired)")
    right.axvline(1.0, color="grey", lw=0.5)
    fig.suptitle("DeRa between stories260K and its TNT update")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    lmppl.enable_compilation_cache()
    main()
