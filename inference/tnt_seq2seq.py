"""Targeted negative training of a seq2seq model (T5 / Flan-T5) from annotated triples.

The paper's setting (Zhang et al., TMLR 2024): a ``t5-base``-sized encoder-decoder, a
dataset of (input, output, annotation) triples where the output is the model's own
generation for the input and the annotation says what in it is unwanted. The script

1. reads the triples (``--data``: a JSONL or CSV file, or a Hugging Face ``datasets`` name
   when that package is installed) and holds out a fraction of them (``--holdout``);
2. turns every annotation into token-level negatives (``lmppl.tnt.from_pairs`` for a
   corrected output, marked spans or a whole-output flag otherwise) and fine-tunes a copy
   of the model with one TNT loss (``lmppl.tnt.train(..., source=inputs)``, ``--loss``
   ``tnff`` / ``tnrf`` / ``tnrr`` / ``tnfll`` / ``tnrll`` or the baselines ``nl`` / ``ul``);
3. reports, before and after, on training inputs and on held-out inputs: the prevalence of
   the unwanted behaviour in outputs sampled from the model given each input (``lmppl.LM(t5,
   source=inputs, ...)``, the same random key for the old and the new model), BLEU-4 of the
   new outputs against the old ones (paired: 100 = unchanged, ``lmppl.tnt.bleu_to_old``),
   and the mean log-probability of the annotated (negative) and of the clean training
   outputs given their inputs;
4. writes ``<out>.md`` / ``<out>.csv`` (the table), ``<out>.png`` (before/after bars) and
   the updated parameters ``<out>_<loss>.npz``, which load back with
   ``lmppl.tnt.load_params(path, lmppl.load(model))``.

Data format, one example per JSONL line (or CSV row, same column names):

* ``input``: the source text the model reads;
* ``output``: the model's output for it (ideally its own generation, as TNT assumes);
* the annotation, at most one of
  - ``corrected``: a corrected output; the tokens where the output departs from it are
    negative (``--mode diff``: a minimal token edit, ``first``: the first differing token,
    ``full``: every differing token; see ``lmppl.tnt.annotations``);
  - ``unwanted``: the unwanted spans of the output (a list of strings; in a CSV file a JSON
    list or one string); every token overlapping one of them is negative;
  - ``negative``: ``true`` marks the whole output unwanted;
  an example with none of them (or ``negative: false``) is clean: TNT keeps the model's law
  on it (it anchors the update).

The unwanted behaviour whose prevalence is measured is a regular expression on the decoded
output (``--unwanted-pattern``, repeatable); by default the ``unwanted`` spans of the data
and the text of the tokens the ``corrected`` outputs replace.

With internet (hub ids download once, then come from the Hugging Face cache):

    python inference/tnt_seq2seq.py --model google-t5/t5-base --data triples.jsonl --loss tnff \\
        --steps 200 --batch-size 16 --out inference/results/tnt_t5_base
    python inference/tnt_seq2seq.py --model google/flan-t5-base --data triples.csv \\
        --unwanted-pattern "(?i)\\bdamn\\b" --loss tnrr --alpha 10

Offline, ``--model`` is any local T5 folder ``lmppl.load`` reads (``config.json``,
safetensors, tokenizer); ``tests/recipes/test_seq2seq_recipes.py`` runs the script on a tiny
random T5 and a tiny JSONL file.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import lmppl
from lmppl import tnt

COLUMNS = (
    "model",
    "split",
    "inputs",
    "prevalence",
    "bleu_paired",
    "log_p_negative",
    "log_p_clean",
)
ANNOTATIONS = ("corrected", "unwanted", "negative")


# ----------------------------------------------------------------------------- data


def _flag(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "y"}
    return bool(value)


def _spans(value) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            return [value]
    return [str(v) for v in value if str(v)]


def normalise(record: dict, input_key: str, output_key: str, where: str) -> dict:
    """One triple ``{"input", "output", "kind", "annotation"}`` from a raw record."""
    if input_key not in record or output_key not in record:
        raise ValueError(f"{where}: needs {input_key!r} and {output_key!r} fields")
    present = [k for k in ANNOTATIONS if record.get(k) not in (None, "")]
    if len(present) > 1:
        raise ValueError(f"{where}: one annotation per example, got {present}")
    kind = present[0] if present else None
    annotation = record.get(kind) if kind else None
    if kind == "unwanted":
        annotation = _spans(annotation)
        kind = kind if annotation else None
    elif kind == "negative":
        kind = kind if _flag(annotation) else None
    return {
        "input": str(record[input_key]),
        "output": str(record[output_key]),
        "kind": kind,
        "annotation": annotation,
    }


def read_triples(data: str, input_key="input", output_key="output", split="train") -> list[dict]:
    """The triples of a JSONL / CSV file, or of a ``datasets`` dataset (if installed)."""
    path = pathlib.Path(data)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                records = list(csv.DictReader(handle))
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
    else:
        try:
            import datasets
        except ImportError:
            sys.exit(
                f"error: {data} is not a file, and the `datasets` package (needed for a "
                "dataset name) is not installed"
            )
        records = list(datasets.load_dataset(data, split=split))
    if not records:
        sys.exit(f"error: no examples in {data}")
    return [
        normalise(dict(r), input_key, output_key, f"{data} example {i}")
        for i, r in enumerate(records)
    ]


def encode_output(lm, text: str, max_tokens: int) -> list[int]:
    """The decoder ids of an output: the bare pieces, then EOS (cut to ``max_tokens``)."""
    ids = list(lm.tokenizer.encode(text, add_bos=False))[: max_tokens - 1]
    return [*ids, lm.eos_token_id]


def pad(rows: list[list[int]], width: int, fill: int) -> np.ndarray:
    out = np.full((len(rows), width), fill, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def span_mask(lm, ids: list[int], spans: list[str]) -> tuple[np.ndarray, str]:
    """``[len(ids)]`` bool: tokens whose decoded characters overlap an occurrence of a span.

    Each token's characters are found by decoding growing prefixes (any tokenizer), in the
    decoded output (the text the spans are searched in)."""
    ends = [len(lm.tokenizer.decode(ids[: t + 1])) for t in range(len(ids))]
    text = lm.tokenizer.decode(ids)
    mask = np.zeros(len(ids), bool)
    missing = []
    for span in spans:
        found = [m.span() for m in re.finditer(re.escape(span), text)]
        if not found:
            missing.append(span)
        for start, end in found:
            begin = 0
            for t, stop in enumerate(ends):
                if stop > begin and begin < end and stop > start:
                    mask[t] = True
                begin = max(begin, stop)
    return mask, ", ".join(map(repr, missing))


def annotate(lm, triples: list[dict], max_tokens: int, mode: str):
    """``(tokens [N, T], Annotations, replaced_texts)``: the outputs as EOS-padded ids and
    their token-level negatives; ``replaced_texts``: the decoded runs of negative tokens
    that corrections replace (the default unwanted pattern)."""
    eos = lm.eos_token_id
    rows = [encode_output(lm, t["output"], max_tokens) for t in triples]
    width = max(len(r) for r in rows)
    tokens = pad(rows, width, eos)
    valid = tnt.valid_mask(tokens, eos)
    mask = np.zeros(tokens.shape, bool)
    replaced: set[str] = set()
    for i, (triple, row) in enumerate(zip(triples, rows, strict=True)):
        if triple["kind"] == "corrected":
            fix = encode_output(lm, triple["annotation"], max_tokens)
            mask[i] = tnt.from_pairs(tokens[i : i + 1], [fix], mode, eos_token_id=eos).mask[0]
            positions = np.flatnonzero(mask[i])
            for run in np.split(positions, np.flatnonzero(np.diff(positions) > 1) + 1):
                piece = lm.tokenizer.decode(tokens[i, run]).strip() if len(run) else ""
                if piece:
                    replaced.add(piece)
        elif triple["kind"] == "unwanted":
            row_mask, missing = span_mask(lm, row, triple["annotation"])
            if missing:
                print(f"warning: example {i}: span(s) {missing} not in its output")
            mask[i, : len(row)] = row_mask
        elif triple["kind"] == "negative":
            mask[i] = valid[i]
    # from_detector applies the padding mask (nothing after the first EOS is negative)
    annotations = tnt.from_detector(tokens, lambda _: mask, eos_token_id=eos)
    return tokens, annotations, sorted(replaced)


def unwanted_regex(patterns, triples, replaced) -> re.Pattern | None:
    if patterns:
        return re.compile("|".join(f"(?:{p})" for p in patterns))
    pieces = {s for t in triples if t["kind"] == "unwanted" for s in t["annotation"]}
    pieces |= set(replaced)
    if not pieces:
        return None
    return re.compile("|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True)))


# ------------------------------------------------------------------------- evaluation


class Evaluator:
    """Samples ``k`` outputs per input (one compiled sampler for every parameter set)."""

    def __init__(self, lm, inputs, num_tokens, samples, key, pattern):
        self.lm, self.inputs, self.pattern, self.key = lm, inputs, pattern, key
        self.dist = lmppl.LM(lm, source=inputs, max_new_tokens=num_tokens)
        self.samples = samples
        self.old = self.sample(lm.params)

    def sample(self, params) -> np.ndarray:
        # [k, B, T] -> [B * k, T]; row b * k + j is sample j of input b
        drawn = np.asarray(self.dist.with_params(params).sample(self.key, (self.samples,)))
        return drawn.transpose(1, 0, 2).reshape(-1, drawn.shape[-1])

    def texts(self, tokens) -> list[str]:
        return [self.lm.tokenizer.decode(r) for r in tnt.metrics.trim(tokens, self.lm.eos_token_id)]

    def metrics(self, params) -> tuple[dict, np.ndarray]:
        tokens = self.sample(params)
        prevalence = math.nan
        if self.pattern is not None:
            prevalence = float(np.mean([bool(self.pattern.search(t)) for t in self.texts(tokens)]))
        bleu = tnt.bleu_to_old(tokens, self.old, eos_token_id=self.lm.eos_token_id)
        return {"prevalence": prevalence, "bleu_paired": bleu}, tokens


def mean_log_probs(lm, params, inputs, tokens, negative, num_tokens) -> tuple[float, float]:
    """Mean ``log p(output | input)`` over the negative and over the clean examples."""
    if not inputs:
        return math.nan, math.nan
    dist = lmppl.LM(lm, source=inputs, max_new_tokens=num_tokens, params=params)
    log_p = np.asarray(dist.log_prob(jnp.asarray(tokens)), np.float64)
    pick = lambda rows: float(log_p[rows].mean()) if rows.any() else math.nan
    return pick(negative), pick(~negative)


# ---------------------------------------------------------------------------- outputs


def fmt(value, digits=3) -> str:
    return "–" if isinstance(value, float) and math.isnan(value) else f"{value:.{digits}f}"


def write_outputs(out, rows, facts, examples, command, seconds):
    with out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in COLUMNS} for r in rows)
    lines = [
        f"# TNT ({facts['loss']}) on {facts['model']}",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min).",
        "",
        f"Data: `{facts['data']}`: {facts['train']} training examples ({facts['negatives']} "
        f"with negatives, {facts['annotated']} annotated tokens; {facts['kinds']}), "
        f"{facts['held_out']} held out. Outputs of at most {facts['tokens']} tokens. "
        f"Training: `lmppl.tnt.train(..., source=inputs)`, loss {facts['loss']}, "
        f"{facts['steps']} Adam steps, learning rate {facts['learning_rate']}, batch "
        f"{facts['batch_size']}, α = {facts['alpha']}. Unwanted behaviour (regex on the "
        f"decoded output): `{facts['pattern']}`.",
        "",
        "| model | inputs | # | prevalence | BLEU to old (paired) | log p(negatives) | "
        "log p(clean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['split']} | {r['inputs']} | {fmt(r['prevalence'])} | "
            f"{fmt(r['bleu_paired'], 1)} | {fmt(r['log_p_negative'], 2)} | "
            f"{fmt(r['log_p_clean'], 2)} |"
        )
    lines += [
        "",
        f"*prevalence*: fraction of the {facts['samples']} outputs sampled per input (T = "
        f"{facts['tokens']}) that match the pattern. *BLEU*: corpus BLEU-4 on token ids of "
        "each output against the old model's output drawn with the same key (100 = "
        "unchanged). *log p*: mean log-probability of the split's own outputs (those of the "
        "data) given their inputs, over the examples with negatives and over the clean "
        "ones (– when there are none).",
        "",
        "Held-out examples (old → new):",
        "",
    ]
    for input_text, old, new in examples:
        lines.append(f"- `{input_text[:80]}`: `{old[:80]}` → `{new[:80]}`")
    lines += [
        "",
        "Load the updated model:",
        "",
        "```python",
        f'lm = lmppl.tnt.load_params("{facts["params_path"]}", lmppl.load("{facts["model"]}"))',
        "```",
        "",
        f"![before / after]({out.name}.png)",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


def plot(out, rows, loss):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(r["split"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in (
        (axes[0], "prevalence", "prevalence of the unwanted behaviour"),
        (axes[1], "bleu_paired", "BLEU-4 to the old outputs (paired)"),
    ):
        for j, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
            values = [
                next((r[key] for r in rows if r["model"] == model and r["split"] == s), math.nan)
                for s in splits
            ]
            ax.bar(np.arange(len(splits)) + 0.4 * j, np.nan_to_num(values), 0.4, label=model)
        ax.set_xticks(np.arange(len(splits)) + 0.2, splits)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"TNT ({loss}) on a seq2seq model: before / after")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="google-t5/t5-base", help="HF folder or hub id (T5 family)"
    )
    parser.add_argument("--data", required=True, help="JSONL / CSV file, or a datasets name")
    parser.add_argument("--split", default="train", help="split of a datasets name")
    parser.add_argument("--input-key", default="input")
    parser.add_argument("--output-key", default="output")
    parser.add_argument("--out", default="inference/results/tnt_seq2seq")
    parser.add_argument("--loss", default="tnff", choices=sorted(tnt.LOSSES))
    parser.add_argument("--mode", default="diff", choices=("diff", "first", "full"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=10.0, help="weight of negative tokens")
    parser.add_argument("--max-output-tokens", type=int, default=64)
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction held out")
    parser.add_argument("--eval-inputs", type=int, default=64, help="inputs per split")
    parser.add_argument("--samples", type=int, default=4, help="outputs sampled per input")
    parser.add_argument("--unwanted-pattern", action="append", help="regex (repeatable)")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    started = time.time()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python inference/tnt_seq2seq.py " + " ".join(sys.argv[1:] if argv is None else argv)
    keys = jax.random.split(jax.random.key(args.seed), 3)

    lm = lmppl.load(args.model, dtype=args.dtype)
    if not getattr(lm, "is_encoder_decoder", False):
        sys.exit(f"error: {args.model} is decoder-only; this recipe fine-tunes a seq2seq model")
    triples = read_triples(args.data, args.input_key, args.output_key, args.split)
    order = np.random.default_rng(args.seed).permutation(len(triples))
    held = int(round(args.holdout * len(triples)))
    held_out = [triples[i] for i in order[:held]]
    train = [triples[i] for i in order[held:]]
    tokens, annotations, replaced = annotate(lm, train, args.max_output_tokens, args.mode)
    num_tokens = tokens.shape[1]
    inputs = [t["input"] for t in train]
    print(
        f"{len(train)} training examples ({int(annotations.negative_rows.sum())} with "
        f"negatives, {annotations.num_annotated} tokens), {len(held_out)} held out"
    )
    if annotations.num_annotated == 0:
        sys.exit("error: no negative tokens in the training examples")
    pattern = unwanted_regex(args.unwanted_pattern, train, replaced)

    # per split: the inputs, and the examples' own outputs and negative rows (for log p)
    splits = {"train": (train[: args.eval_inputs], tokens, annotations.negative_rows)}
    if held_out:
        held_tokens, held_annotations, _ = annotate(lm, held_out, args.max_output_tokens, args.mode)
        held_tokens = pad(
            [list(r) for r in held_tokens[:, :num_tokens]], num_tokens, lm.eos_token_id
        )
        splits["held-out"] = (
            held_out[: args.eval_inputs],
            held_tokens,
            held_annotations.negative_rows,
        )
    evaluators = {
        name: Evaluator(lm, [t["input"] for t in xs], num_tokens, args.samples, keys[0], pattern)
        for name, (xs, _, _) in splits.items()
    }

    def evaluate(label, params):
        results = {}
        for name, evaluator in evaluators.items():
            xs, outputs, negative = splits[name]
            count = len(xs)
            log_neg, log_clean = mean_log_probs(
                lm, params, evaluator.inputs, outputs[:count], negative[:count], num_tokens
            )
            metrics, sampled = evaluator.metrics(params)
            results[name] = sampled
            row = {"model": label, "split": name, "inputs": count, **metrics}
            row.update(log_p_negative=log_neg, log_p_clean=log_clean)
            rows.append(row)
            print(
                f"{label:>12} {name:>8}: prevalence {fmt(row['prevalence'])}, BLEU "
                f"{row['bleu_paired']:.1f}, log p(neg) {fmt(log_neg, 2)}, log p(clean) "
                f"{fmt(log_clean, 2)}"
            )
        return results

    rows: list[dict] = []
    evaluate("old", lm.params)
    lm_new, history = tnt.train(
        lm,
        None,
        tokens,
        annotations,
        args.loss,
        source=inputs,
        num_steps=args.steps,
        learning_rate=args.learning_rate,
        alpha=args.alpha,
        batch_size=min(args.batch_size, len(train)),
        rng_key=keys[1],
    )
    sampled = evaluate(f"tnt-{args.loss}", lm_new.params)
    params_path = out.parent / f"{out.name}_{args.loss}.npz"
    tnt.save_params(params_path, lm_new)

    examples = []
    if "held-out" in evaluators:
        evaluator = evaluators["held-out"]
        old_texts = evaluator.texts(evaluator.old[:: args.samples])
        new_texts = evaluator.texts(sampled["held-out"][:: args.samples])
        examples = list(zip(evaluator.inputs, old_texts, new_texts, strict=True))[:5]
    kinds = {k: sum(t["kind"] == k for t in train) for k in ANNOTATIONS}
    facts = {
        "model": args.model,
        "data": args.data,
        "loss": args.loss,
        "train": len(train),
        "held_out": len(held_out),
        "negatives": int(annotations.negative_rows.sum()),
        "annotated": annotations.num_annotated,
        "kinds": ", ".join(f"{v} {k}" for k, v in kinds.items()),
        "tokens": num_tokens,
        "steps": args.steps,
        "learning_rate": args.learning_rate,
        "batch_size": min(args.batch_size, len(train)),
        "alpha": args.alpha,
        "pattern": pattern.pattern if pattern is not None else "none (give --unwanted-pattern)",
        "samples": args.samples,
        "params_path": str(params_path),
        "final_loss": history["loss"][-1] if history["loss"] else math.nan,
    }
    seconds = time.time() - started
    write_outputs(out, rows, facts, examples, command.strip(), seconds)
    plot(out, rows, args.loss)
    print(f"wrote {out}.md/.csv/.png and {params_path} in {seconds / 60:.1f} min")
    return rows


if __name__ == "__main__":
    lmppl.enable_compilation_cache()
    main()
