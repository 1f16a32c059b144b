"""Tiny T5 checkpoints for the source-conditioned tests, each built once.

* :func:`t5_folder`: a random ``transformers.T5ForConditionalGeneration`` saved as a Hugging
  Face folder (safetensors, ``config.json``) with a character-level tokenizer over
  ``<pad> </s> <unk> a b c`` that appends ``</s>`` like T5's, and the PyTorch model itself
  (the reference). ``"gated"``: T5 v1.1 / Flan-T5 (gated GELU, untied output); ``"relu"``:
  original T5 (ReLU, output tied to the embedding and scaled by ``d_model^-1/2``).
* :func:`torch_log_probs`: teacher-forced ``log p(s_t | x, d_0, s_<t)`` ``[M, T, V]`` from
  the PyTorch model.
* :func:`random_t5`: ``lmppl.random_lm("t5")`` pairs sharing the character vocabulary.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import lmppl

__all__ = ["T5_PIECES", "random_t5", "t5_folder", "torch_log_probs"]

T5_PIECES = ["<pad>", "</s>", "<unk>", "a", "b", "c"]
SPREAD = {"gated": 0.35, "relu": 0.5}
_FOLDERS = tempfile.TemporaryDirectory(prefix="lmppl-t5-")


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: i for i, piece in enumerate(T5_PIECES)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


@functools.cache
def t5_folder(kind: str, seed: int = 0) -> tuple[Path, Any]:
    """``(folder, torch_model)`` of one tiny random T5 (see the module docstring)."""
    import torch
    import transformers

    from tests.fixtures import randomise_

    options = {
        "gated": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        "relu": dict(feed_forward_proj="relu"),
    }
    config = transformers.T5Config(
        vocab_size=len(T5_PIECES),
        d_model=16,
        d_kv=4,
        d_ff=24,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=8,
        n_positions=12,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **options[kind],
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config)
    model = randomise_(model, seed, spread=SPREAD[kind]).eval()
    folder = Path(_FOLDERS.name) / f"{kind}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(folder)
    return folder, model


def torch_log_probs(model: Any, source: list[int], sequences: np.ndarray) -> np.ndarray:
    """``[M, T, V]`` float64 teacher-forced log-probabilities of ``sequences`` ``[M, T]``
    given ``source`` (decoder input ``[d_0, s_1..s_{T-1}]``)."""
    import torch

    rows, steps = sequences.shape
    decoder = np.concatenate([np.zeros((rows, 1), np.int64), sequences[:, : steps - 1]], axis=1)
    with torch.no_grad():
        logits = model(
            input_ids=torch.as_tensor([source] * rows, dtype=torch.long),
            decoder_input_ids=torch.as_tensor(decoder, dtype=torch.long),
        ).logits.double()
    return torch.log_softmax(logits, dim=-1).numpy()


@functools.cache
def random_t5(seed: int, scale: float = 1.0) -> lmppl.LanguageModel:
    """A random Flan-T5-style model over ``<s> </s> a b c d`` (one object per seed)."""
    return lmppl.random_lm("t5", symbols=4, scale=scale, seed=seed)
