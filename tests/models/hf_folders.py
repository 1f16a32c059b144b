"""Tiny random Hugging Face folders standing in for the paper's models (no download).

* :func:`save_tokenizer` — a byte-level BPE tokenizer trained here on a few sentences
  (the task prompts included), ``<pad>`` = 0, ``<s>`` = 1 (prepended), ``</s>`` = 2;
* :func:`save_causal_lm` — a 2-layer GPT-2 (``GPT2LMHeadModel``), the shape of the paper's
  ``gpt2-medium`` / TinyStories models, for ``model="<folder>"``;
* :func:`save_classifier` — a 2-layer ``GPT2ForSequenceClassification`` with 1 output (a
  reward-model score, like ``nicholasKluge/ToxicityModel``) or C classes (like
  ``LiYuan/amazon-review-sentiment-analysis``), for ``classifier="<folder>"``.

Weights are redrawn with a larger spread than Hugging Face's initialisation, so that
next-token laws and class probabilities differ visibly between inputs.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Once upon a time, there was a cat.",
    "I bought this and it was great.",
    "I bought this, it broke. I hate it!",
    "the dog sat on a mat and ran to the park",
    "she was happy and they played all day",
] * 4
VOCAB_SIZE = 96
SMALL = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)


def _randomise(model, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if name.endswith("weight") and parameter.ndim == 1:  # layer norms
                parameter.copy_(1.0 + 0.1 * noise)
            elif name.startswith("score"):  # the classifier head: spread-out class scores
                parameter.copy_(noise)
            else:
                parameter.copy_(0.2 * noise)
    return model.eval()


def _vocab_size(folder: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(folder))


def save_causal_lm(folder: Path, seed: int = 0) -> Path:
    """A random tiny GPT-2 language model with its tokenizer in ``folder``."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    config = transformers.GPT2Config(vocab_size=_vocab_size(folder), **SMALL)
    torch.manual_seed(seed)
    model = _randomise(transformers.GPT2LMHeadModel(config), seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def save_classifier(folder: Path, num_labels: int, seed: int = 0) -> Path:
    """A random tiny GPT-2 sequence classifier (``num_labels`` outputs) in ``folder``."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    config = transformers.GPT2Config(
        vocab_size=_vocab_size(folder), num_labels=num_labels, pad_token_id=0, **SMALL
    )
    torch.manual_seed(seed)
    model = _randomise(transformers.GPT2ForSequenceClassification(config), seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def torch_probabilities(folder: Path, texts: list[str]):
    """Class probabilities of each text, one unpadded forward pass per text (the reference):
    softmax of C > 1 logits, ``(1 − σ(s), σ(s))`` for a single score s."""
    import numpy as np
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    rows = []
    with torch.no_grad():
        for text in texts:
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0].double()
            if logits.shape[0] == 1:
                p = torch.sigmoid(logits[0])
                rows.append([1.0 - float(p), float(p)])
            else:
                rows.append(torch.softmax(logits, dim=-1).tolist())
    return np.asarray(rows)


def torch_scores(folder: Path, texts: list[str]):
    """The single raw output s of a 1-label classifier for each text (unpadded)."""
    import numpy as np
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return np.asarray(
            [float(model(**tokenizer(t, return_tensors="pt")).logits[0, 0]) for t in texts]
        )
