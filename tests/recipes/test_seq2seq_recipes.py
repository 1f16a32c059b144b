"""Offline smoke runs of the paper-setting recipes on tiny random checkpoints.

* ``inference/tnt_seq2seq.py``: a tiny random T5 folder (``tests.lm.t5_models``, characters
  ``a b c``) and a JSONL file of (input, output, annotation) triples whose outputs are the
  model's own generations and whose annotations mark every ``c`` (as unwanted spans, as
  corrected outputs, or as a whole-output flag). Checked: the table parses with finite
  numbers, the saved parameters load back and generate, and TNT lowers the prevalence of
  ``c`` in outputs sampled on the training inputs.
* ``inference/realign_chat.py``: two tiny random Qwen2 folders sharing one byte-level BPE
  vocabulary; the "base" one ends sequences with ``</s>`` and has no chat template, the
  "instruct" one ends its turns with ``<|im_end|>`` and has a ChatML template (as Qwen2.5
  base / instruct do). Checked: ``LanguageModel.with_tokenizer`` lets ``lmppl.realign``
  accept the pair, and the recipe's table has log p_λ = log p_ref at λ = 0 and
  log p_λ = log p_aligned at λ = 1 (on the same coupled replies), BLEU 100 against the
  reference's replies at λ = 0.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

import lmppl
from inference import realign_chat, tnt_seq2seq
from tests.fixtures import randomise_
from tests.lm.t5_models import t5_folder

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_CORPUS = [
    "user\nsay hi\nassistant\nhi there, how are you?",
    "the cat sat on a mat. the dog ran to the park.",
    "write a story about a cat\nsure: once upon a time a cat sat.",
] * 4


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------ TNT


def write_triples(path: Path, folder: Path, count: int = 24) -> None:
    """The tiny T5's own outputs for random inputs; every ``c`` annotated, three ways."""
    lm = lmppl.load(str(folder))
    rng = np.random.default_rng(0)
    sources = ["".join(rng.choice(list("abc"), size=int(rng.integers(2, 6)))) for _ in range(count)]
    # one output per source, all in one batched draw
    drawn = lmppl.LM(lm, source=sources, max_new_tokens=6).sample(jax.random.key(0))
    lines = []
    for i, (source, row) in enumerate(
        zip(sources, lmppl.tnt.metrics.trim(drawn, lm.eos_token_id), strict=True)
    ):
        output = lm.tokenizer.decode(row)
        record = {"input": source, "output": output}
        if "c" in output:
            kind = i % 3
            if kind == 0:
                record["unwanted"] = ["c"]
            elif kind == 1:
                record["corrected"] = output.replace("c", "a")
            else:
                record["negative"] = True
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


def test_read_triples_from_csv_and_annotation_kinds(tmp_path):
    path = tmp_path / "triples.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["input", "output", "corrected", "unwanted", "negative"])
        writer.writeheader()
        writer.writerow({"input": "ab", "output": "abc", "corrected": "aba"})
        writer.writerow({"input": "b", "output": "cc", "unwanted": '["c", "cc"]'})
        writer.writerow({"input": "c", "output": "bb", "unwanted": "b"})
        writer.writerow({"input": "a", "output": "ab", "negative": "true"})
        writer.writerow({"input": "a", "output": "ab", "negative": "false"})
    triples = tnt_seq2seq.read_triples(str(path))
    assert [t["kind"] for t in triples] == ["corrected", "unwanted", "unwanted", "negative", None]
    assert triples[1]["annotation"] == ["c", "cc"] and triples[2]["annotation"] == ["b"]
    folder, _ = t5_folder("gated", 0)
    lm = lmppl.load(str(folder))
    tokens, annotations, replaced = tnt_seq2seq.annotate(lm, triples, 8, "diff")
    # "abc</s>" -> "aba</s>": the c; "cc</s>": both c; "bb": both b; flagged: a, b and EOS
    expected = [[0, 0, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(annotations.mask.astype(int), expected)
    assert replaced == ["c"]
    pattern = tnt_seq2seq.unwanted_regex(None, triples, replaced)
    assert pattern.search("abc") and not pattern.search("aaa")


def test_tnt_seq2seq_recipe_lowers_the_prevalence(tmp_path):
    folder, _ = t5_folder("gated", 0)
    data = tmp_path / "triples.jsonl"
    write_triples(data, folder)
    out = tmp_path / "tnt"
    # The tiny T5's decoder has 12 positions: outputs of at most 7 tokens (EOS included).
    tnt_seq2seq.main(
        [
            "--model",
            str(folder),
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "40",
            "--batch-size",
            "16",
            "--learning-rate",
            "1e-2",
            "--alpha",
            "100",
            "--max-output-tokens",
            "7",
            "--holdout",
            "0.25",
            "--samples",
            "8",
        ]
    )
    rows = {(r["model"], r["split"]): r for r in read_csv(out.with_suffix(".csv"))}
    assert set(rows) == {(m, s) for m in ("old", "tnt-tnff") for s in ("train", "held-out")}
    for row in rows.values():
        for key in ("prevalence", "bleu_paired", "log_p_negative", "log_p_clean"):
            assert math.isfinite(float(row[key])), (row, key)
    assert float(rows[("old", "train")]["bleu_paired"]) == pytest.approx(100.0)
    before = float(rows[("old", "train")]["prevalence"])
    after = float(rows[("tnt-tnff", "train")]["prevalence"])
    print(f"prevalence of c on the training inputs: {before:.3f} -> {after:.3f}")
    assert before > 0.2 and after < 0.5 * before
    # the annotated outputs lose probability
    assert float(rows[("tnt-tnff", "train")]["log_p_negative"]) < float(
        rows[("old", "train")]["log_p_negative"]
    )
    report = out.with_suffix(".md").read_text()
    assert "python inference/tnt_seq2seq.py --model" in report and "| tnt-tnff |" in report
    assert out.with_suffix(".png").stat().st_size > 0
    lm = lmppl.tnt.load_params(tmp_path / "tnt_tnff.npz", lmppl.load(str(folder)))
    generated = lmppl.generate(
        lm, source="abc", num_samples=2, max_new_tokens=4, rng_key=jax.random.key(0)
    )
    assert np.asarray(generated.tokens).shape == (2, 4)


# --------------------------------------------------------------------------------- DeRa


def save_chat_pair(root: Path) -> tuple[Path, Path]:
    """Two tiny random Qwen2 folders, one BPE vocabulary: ``base`` (EOS ``</s>``, no chat
    template) and ``instruct`` (EOS ``<|im_end|>``, a ChatML template)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes
        show_progress=False,
    )
    tokenizer.train_from_iterator(CHAT_CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    folders = []
    for seed, (name, eos, template) in enumerate(
        (("base", "</s>", None), ("instruct", "<|im_end|>", CHATML))
    ):
        folder = root / name
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token="<s>", eos_token=eos, pad_token="<pad>"
        )
        if template is not None:
            fast.chat_template = template
        fast.save_pretrained(folder)
        config = transformers.Qwen2Config(
            vocab_size=320,  # padded beyond the tokenizer, as Qwen configs are
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=fast.eos_token_id,
        )
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(config)
        randomise_(model, seed, spread=0.3).eval().save_pretrained(folder, safe_serialization=True)
        folders.append(folder)
    return folders[0], folders[1]


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    return save_chat_pair(tmp_path_factory.mktemp("chat_pair"))


def test_with_tokenizer_lets_a_base_model_stop_at_the_instruct_eos(chat_pair):
    base, instruct = (lmppl.load(str(f)) for f in chat_pair)
    assert base.eos_token_id == 2 and instruct.eos_token_id == 4
    with pytest.raises(ValueError, match="EOS id 2 .ref. vs 4 .aligned."):
        lmppl.realign(base, instruct, 0.5)
    shared = base.with_tokenizer(instruct.tokenizer, name="base+instruct tokenizer")
    assert shared.eos_token_id == 4 and shared.params is base.params
    assert shared.name == "base+instruct tokenizer" and base.eos_token_id == 2
    assert lmppl.realign(shared, instruct, 0.5).eos_token_id == 4
    ids, templated = realign_chat.format_prompt(instruct.tokenizer, "say hi")
    assert templated and instruct.tokenizer.decode(ids, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n"
    )
    ids, templated = realign_chat.format_prompt(base.tokenizer, "say hi")  # no template
    assert not templated and base.tokenizer.decode(ids).endswith("User: say hi\nAssistant:")

    class Big:
        vocab_size = base.vocab_size + 1
        bos_token_id = eos_token_id = 0

    with pytest.raises(ValueError, match="tokenizer of .* tokens"):
        base.with_tokenizer(Big())


def test_realign_chat_recipe_endpoints_are_the_two_models(chat_pair, tmp_path):
    base, instruct = chat_pair
    prompts = tmp_path / "prompts.txt"
    # two prompts of one length (15 tokens): the second reuses the compiled sampler
    prompts.write_text("say hi\nsay ho\n")
    out = tmp_path / "dera"
    realign_chat.main(
        [
            "--reference",
            str(base),
            "--aligned",
            str(instruct),
            "--prompts",
            str(prompts),
            "--lambdas",
            "0",
            "0.5",
            "1",
            "1.5",
            "--samples",
            "4",
            "--tokens",
            "8",
            "--out",
            str(out),
        ]
    )
    rows = read_csv(out.with_suffix(".csv"))
    assert [float(r["lam"]) for r in rows] == [0.0, 0.5, 1.0, 1.5]
    for row in rows:
        for key in realign_chat.COLUMNS:
            assert math.isfinite(float(row[key])), (row, key)
    first, half, one = rows[0], rows[1], rows[2]
    assert float(first["log_p_realigned"]) == pytest.approx(float(first["log_p_ref"]), abs=1e-3)
    assert float(one["log_p_realigned"]) == pytest.approx(float(one["log_p_aligned"]), abs=1e-3)
    assert float(first["bleu_vs_ref"]) == pytest.approx(100.0)
    assert abs(float(first["log_p_ref"]) - float(first["log_p_aligned"])) > 0.1  # distinct models
    assert float(half["log_p_realigned"]) != pytest.approx(float(half["log_p_ref"]), abs=1e-3)
    samples = read_csv(tmp_path / "dera_samples.csv")
    assert len(samples) == 4 * 2 * 4
    report = out.with_suffix(".md").read_text()
    assert "DeRa λ sweep" in report and "chat template" in report and "## Prompt 1" in report
    assert out.with_suffix(".png").stat().st_size > 0
