"""Host text scorers for potentials: ``texts -> class probabilities``.

Each function returns a ``predict_proba``-style callable ``list[str] -> [n, C]`` array,
ready for :func:`lmppl.potentials.text_classifier` (one host call per sweep):

* :func:`offensive_language` — alt-profanity-check's linear SVM (calibrated), classes
  ``(clean, offensive)``; ships its weights on PyPI.
* :func:`vader_sentiment` — VADER's compound score c ∈ [−1, 1] read as ``C`` ordered
  sentiment classes (default 5, "1 star" … "5 stars") by a Gaussian kernel around the
  class centres ``c_k = −1 + 2k/(C−1)``: ``p(k | text) ∝ exp(−(c − c_k)² / (2 w²))``.
  A smooth, monotone reading of a lexicon score, not a trained review classifier.
* :func:`hf_text_classifier` — any Hugging Face sequence classifier (e.g.
  ``nicholasKluge/ToxicityModel``, ``LiYuan/amazon-review-sentiment-analysis``) run by
  transformers' PyTorch on the host, from a hub id (needs the hub), a local folder, or a
  ``(model, tokenizer)`` pair.

The optional packages are imported when a scorer is built, with a one-line error naming
the package to install.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["hf_text_classifier", "offensive_language", "vader_sentiment"]

Scorer = Callable[[list[str]], np.ndarray]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds
    (False under ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ) not in ("", "0"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urllib.parse.urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _require(module: str, package: str):
    import importlib

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"this scorer needs the '{package}' package: pip install {package}"
        ) from error


def offensive_language() -> Scorer:
    """``texts -> [n, 2]`` probabilities of (clean, offensive) from alt-profanity-check."""
    predict_prob = _require("profanity_check", "alt-profanity-check").predict_prob

    def offensive_language_probs(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 2))
        offensive = np.asarray(predict_prob(list(texts)), dtype=np.float64)
        return np.stack([1.0 - offensive, offensive], axis=-1)

    return offensive_language_probs


def vader_sentiment(num_classes: int = 5, width: float = 0.25) -> Scorer:
    """``texts -> [n, num_classes]`` ordered sentiment class probabilities from VADER.

    Args:
      num_classes: C ≥ 2 classes from most negative (0) to most positive (C − 1).
      width: the kernel width w on the compound-score scale.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width!r}")
    analyzer = _require(
        "vaderSentiment.vaderSentiment", "vaderSentiment"
    ).SentimentIntensityAnalyzer()
    centres = np.linspace(-1.0, 1.0, num_classes)

    def vader_sentiment_probs(texts: list[str]) -> np.ndarray:
        compound = np.array([analyzer.polarity_scores(t)["compound"] for t in texts])
        logits = -((compound[:, None] - centres[None]) ** 2) / (2 * width**2)
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=-1, keepdims=True)

    return vader_sentiment_probs


def hf_text_classifier(
    model: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 64,
    max_length: int = 512,
    device: str = "cpu",
) -> Scorer:
    """``texts -> [n, C]`` softmax class probabilities of a transformers classifier.

    A classifier with a single output s (a reward-model style score, e.g.
    ``nicholasKluge/ToxicityModel``, where s > 0 means harmless) is read as two classes
    with ``p(class 1) = sigmoid(s)``, so ``log p1 − log p0 = s``.

    Args:
      model: a hub id or local folder (loaded with ``AutoModelForSequenceClassification``)
        or a loaded PyTorch model.
      tokenizer: its tokenizer (default: loaded from ``model`` when that is a name).
      batch_size: texts per forward pass.
      max_length: truncation length in tokens.
      device: the torch device.
    """
    torch = _require("torch", "torch")
    transformers = _require("transformers", "transformers")
    if isinstance(model, str):
        name = model
        # A hub id: the local cache first, and the hub only when it answers (offline,
        # from_pretrained would spend ~30 s in retries before failing).
        local = os.path.isdir(name) or not _hub_reachable()
        try:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                name, local_files_only=local
            )
            if tokenizer is None:
                tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=local)
        except OSError as error:
            where = (
                "not a classifier folder"
                if os.path.isdir(name)
                else "not a local folder, not in the Hugging Face cache, and the hub is "
                "unreachable (offline)"
                if local
                else "offline, or not a classifier"
            )
            raise OSError(
                f"could not load the text classifier {name!r} ({where}): "
                f"{str(error).splitlines()[0]}"
            ) from None
    if tokenizer is None:
        raise ValueError("hf_text_classifier needs the classifier's tokenizer")
    if getattr(tokenizer, "pad_token", "") is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device).eval()

    def hf_classifier_probs(texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            with torch.no_grad():
                logits = model(**batch).logits.float()
            if logits.shape[-1] == 1:  # a single score (reward-model style): p(class 1) = σ(s)
                logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
            out.append(torch.softmax(logits, dim=-1).cpu().numpy().astype(np.float64))
        num_classes = max(int(model.config.num_labels), 2)
        return np.concatenate(out) if out else np.zeros((0, num_classes))

    return hf_classifier_probs
