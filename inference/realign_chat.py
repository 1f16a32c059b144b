"""DeRa between a base (reference) and an instruct (aligned) chat model: a λ sweep.

Decoding-time realignment (Liu et al. 2024) mixes a reference model π_ref (e.g. a base
model) and its aligned version π_al (e.g. the instruct / chat model trained from it) at
decoding time, ``softmax(λ h_al + (1 − λ) h_ref)`` per token (``lmppl.realign(ref,
aligned, λ)``, token mode): λ = 0 is the reference, λ = 1 the aligned model, 0 < λ < 1 a
weaker and λ > 1 a stronger alignment, without retraining. The script

1. loads both models (``--reference``, ``--aligned``: HF folders or hub ids that
   ``lmppl.load`` reads; they must share a vocabulary). Base and instruct checkpoints often
   end a sequence at different tokens (Qwen2.5: ``<|endoftext|>`` vs ``<|im_end|>``): the
   reference then reads the aligned model's tokenizer (``lm.with_tokenizer``), so both
   stop at the end of the assistant's turn;
2. formats every prompt (``--prompts FILE``: one per line, or JSONL with a ``prompt``
   field; a few built-in ones otherwise) as one user turn with the aligned model's chat
   template (``lm.tokenizer.apply_chat_template(..., add_generation_prompt=True)``), or as
   ``User: ...\\nAssistant:`` when its tokenizer has no template;
3. samples ``--samples`` replies of at most ``--tokens`` tokens per prompt for every λ of
   ``--lambdas`` in one ``jax.vmap`` over λ with the same random key (coupled draws);
4. reports per λ: mean reply length and fraction that ended (EOS), the mean sequence
   log-probability of the replies under the reference, under the aligned model and under
   the realigned law itself (λ = 0 equals the reference's, λ = 1 the aligned model's),
   and BLEU-4 of the replies against the reference's replies drawn with the same key
   (the realigned law at λ = 0, always drawn; paired, 100 = identical); and a few replies
   per λ.

Outputs: ``<out>.md`` (table and sample replies), ``<out>.csv`` (one row per λ),
``<out>_samples.csv`` (every reply) and ``<out>.png`` (log-probabilities and length vs λ).

With internet (hub ids download once, then come from the Hugging Face cache):

    python inference/realign_chat.py --reference Qwen/Qwen2.5-0.5B \\
        --aligned Qwen/Qwen2.5-0.5B-Instruct --lambdas 0 0.5 1 1.5 --dtype bfloat16
    python inference/realign_chat.py --reference meta-llama/Llama-3.2-1B \\
        --aligned meta-llama/Llama-3.2-1B-Instruct --prompts prompts.txt --tokens 96

``tests/recipes/test_seq2seq_recipes.py`` runs it offline on two tiny random Qwen2 folders
that share a tokenizer with a chat template.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import lmppl
from lmppl import tnt

PROMPTS = (
    "Give me three tips for staying focused while studying.",
    "Write a two-sentence story about a lighthouse.",
    "How do I politely decline a meeting invitation?",
    "Explain what a neural network is to a ten-year-old.",
)
FALLBACK = "User: {prompt}\nAssistant:"
COLUMNS = (
    "lam",
    "mean_length",
    "ended",
    "log_p_ref",
    "log_p_aligned",
    "log_p_realigned",
    "bleu_vs_ref",
)


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(PROMPTS)
    lines = [line for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line.strip()]
    if lines and all(line.lstrip().startswith("{") for line in lines):
        return [json.loads(line)["prompt"] for line in lines]
    return lines


def format_prompt(tokenizer, prompt: str, system: str | None = None) -> tuple[list[int], bool]:
    """``(ids, templated)``: one user turn by the tokenizer's chat template (ready for the
    assistant's reply), or the plain ``User: ... Assistant:`` text when it has none."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)), True
    text = FALLBACK.format(prompt=prompt)
    if system:
        text = f"{system}\n{text}"
    return list(tokenizer.encode(text, add_bos=True)), False


def shared_stop(ref, aligned, prompts: list[str]):
    """The reference with the aligned model's tokenizer when their EOS ids differ (after
    checking that the two tokenizers agree on the prompts)."""
    if ref.eos_token_id == aligned.eos_token_id:
        return ref
    if ref.vocab_size != aligned.vocab_size:
        sys.exit(
            f"error: vocabularies of {ref.vocab_size} (reference) and {aligned.vocab_size} "
            "(aligned) tokens: DeRa needs one vocabulary"
        )
    for text in prompts:
        if ref.tokenizer.encode(text, add_bos=False) != aligned.tokenizer.encode(
            text, add_bos=False
        ):
            sys.exit(f"error: the two tokenizers encode {text!r} differently")
    print(
        f"the reference stops at EOS {ref.eos_token_id}, the aligned model at "
        f"{aligned.eos_token_id}: the reference reads the aligned model's tokenizer"
    )
    return ref.with_tokenizer(aligned.tokenizer, name=f"{ref.name} (aligned tokenizer)")


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", default="Qwen/Qwen2.5-0.5B")
    parser.add_argument("--aligned", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--prompts", default=None, help="text file (one per line) or JSONL")
    parser.add_argument("--system", default=None, help="a system message for every prompt")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    parser.add_argument("--samples", type=int, default=8, help="replies per prompt and λ")
    parser.add_argument("--tokens", type=int, default=64, help="at most this many tokens")
    parser.add_argument("--show", type=int, default=2, help="replies shown per prompt and λ")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16")
    parser.add_argument("--out", default="inference/results/realign_chat")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    from tqdm.auto import tqdm

    args = parse(argv)
    started = time.time()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python inference/realign_chat.py " + " ".join(sys.argv[1:] if argv is None else argv)
    prompts = read_prompts(args.prompts)

    aligned = lmppl.load(args.aligned, dtype=args.dtype)
    ref = shared_stop(lmppl.load(args.reference, dtype=args.dtype), aligned, prompts)
    realigned = lmppl.realign(ref, aligned, 0.0)
    eos = realigned.eos_token_id
    num, steps = args.samples, args.tokens

    # λ = 0 first: the realigned law at λ = 0 is the reference's, so its replies (same key)
    # are the reference's own, the baseline of BLEU
    sweep = [0.0, *args.lambdas]
    lams = jnp.asarray(sweep, jnp.float32)
    per_prompt = []  # (templated, tokens [L, n, T], log p ref / aligned / realigned [L, n])
    for i, prompt in enumerate(tqdm(prompts, desc="prompts", leave=False)):
        ids, templated = format_prompt(aligned.tokenizer, prompt, args.system)
        key = jax.random.fold_in(jax.random.key(args.seed), i)
        dist = lmppl.LM(realigned, ids, steps)
        at = lambda lam, dist=dist: dist.with_params(realigned.with_lam(realigned.params, lam))
        tokens = jax.vmap(lambda lam, at=at, key=key: at(lam).sample(key, (num,)))(lams)
        log_mix = jax.vmap(lambda lam, t, at=at: at(lam).log_prob(t))(lams, tokens)
        log_ref = lmppl.LM(ref, ids, steps).log_prob(tokens)
        log_al = lmppl.LM(aligned, ids, steps).log_prob(tokens)
        per_prompt.append(
            (
                templated,
                np.asarray(tokens),
                *(np.asarray(x, np.float64) for x in (log_ref, log_al, log_mix)),
            )
        )

    rows, samples = [], []
    baseline = np.concatenate([p[1][0] for p in per_prompt])
    for j, lam in enumerate(sweep[1:], start=1):
        tokens = np.concatenate([p[1][j] for p in per_prompt])
        trimmed = tnt.metrics.trim(tokens, eos)
        rows.append(
            {
                "lam": lam,
                "mean_length": float(np.mean([len(t) for t in trimmed])),
                "ended": float(np.mean(np.any(tokens == eos, axis=-1))),
                "log_p_ref": float(np.mean([p[2][j] for p in per_prompt])),
                "log_p_aligned": float(np.mean([p[3][j] for p in per_prompt])),
                "log_p_realigned": float(np.mean([p[4][j] for p in per_prompt])),
                "bleu_vs_ref": tnt.bleu_to_old(tokens, baseline, eos_token_id=eos),
            }
        )
        for i, p in enumerate(per_prompt):
            for k, row in enumerate(tnt.metrics.trim(p[1][j], eos)):
                samples.append(
                    {"lam": lam, "prompt": i, "sample": k, "reply": aligned.tokenizer.decode(row)}
                )
        r = rows[-1]
        print(
            f"λ={lam:g}: length {r['mean_length']:.1f} (ended {r['ended']:.2f}), log p ref "
            f"{r['log_p_ref']:.2f}, aligned {r['log_p_aligned']:.2f}, realigned "
            f"{r['log_p_realigned']:.2f}, BLEU vs ref {r['bleu_vs_ref']:.1f}"
        )
    seconds = time.time() - started
    templated = all(p[0] for p in per_prompt)
    write_outputs(out, rows, samples, prompts, args, command.strip(), seconds, templated)
    plot(out, rows)
    print(f"wrote {out}.md/.csv/.png and {out}_samples.csv in {seconds / 60:.1f} min")
    return rows


def write_outputs(out, rows, samples, prompts, args, command, seconds, templated):
    with out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    samples_path = out.parent / f"{out.name}_samples.csv"
    with samples_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=("lam", "prompt", "sample", "reply"))
        writer.writeheader()
        writer.writerows(samples)
    formatting = (
        "the aligned model's chat template" if templated else f"the plain text {FALLBACK!r}"
    )
    lines = [
        f"# DeRa λ sweep: {args.reference} (λ = 0) → {args.aligned} (λ = 1)",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min). {len(prompts)} prompts, formatted "
        f"with {formatting}; {args.samples} replies of at most {args.tokens} tokens per "
        "prompt and λ, token-mode DeRa (`lmppl.realign(ref, aligned, λ)`), the same random "
        "key for every λ and for the reference's own replies.",
        "",
        "| λ | mean length | ended | log p_ref | log p_aligned | log p_λ | BLEU vs ref |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lam']:g} | {r['mean_length']:.1f} | {r['ended']:.2f} | "
            f"{r['log_p_ref']:.2f} | {r['log_p_aligned']:.2f} | {r['log_p_realigned']:.2f} | "
            f"{r['bleu_vs_ref']:.1f} |"
        )
    lines += [
        "",
        "*log p*: mean sequence log-probability of the replies (up to and including EOS) "
        "under the reference, the aligned model and the realigned per-token law at that λ. "
        "*BLEU vs ref*: corpus BLEU-4 on token ids against the reference's replies drawn with "
        "the same key (the realigned law at λ = 0; 100 = the reference's replies). *ended*: fraction of replies that "
        "reached the end-of-turn token.",
        "",
    ]
    for i, prompt in enumerate(prompts[:3]):
        lines += [f"## Prompt {i}: {prompt}", ""]
        for r in rows:
            replies = [s["reply"] for s in samples if (s["lam"], s["prompt"]) == (r["lam"], i)]
            for reply in replies[: args.show]:
                flat = " ".join(reply.split())
                lines.append(f"- λ = {r['lam']:g}: {flat[:300]}")
        lines.append("")
    lines += [f"![λ sweep]({out.name}.png)", ""]
    out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")


def plot(out, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [r["lam"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (
        ("log_p_ref", "under the reference"),
        ("log_p_aligned", "under the aligned model"),
        ("log_p_realigned", "under the realigned law"),
    ):
        left.plot(lam, [r[key] for r in rows], "o-", label=label)
    left.set_xlabel("λ  (0 = reference, 1 = aligned)")
    left.set_ylabel("mean log p(reply)")
    left.legend(fontsize=8)
    right.plot(lam, [r["mean_length"] for r in rows], "o-", color="C3")
    right.set_xlabel("λ")
    right.set_ylabel("mean reply length (tokens)")
    for ax in (left, right):
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    fig.suptitle("DeRa between a base and an instruct model")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    if not all(math.isfinite(r["log_p_realigned"]) for r in rows):
        print("warning: a non-finite log-probability in the table")


if __name__ == "__main__":
    lmppl.enable_compilation_cache()
    main()
