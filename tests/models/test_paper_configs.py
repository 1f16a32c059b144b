"""The paper-configuration paths of ``models/`` with tiny random Hugging Face folders.

The paper's tasks take ``model="gpt2-medium"`` / ``"roneneldan/TinyStories-33M"`` and
``classifier="nicholasKluge/ToxicityModel"`` / ``"LiYuan/amazon-review-sentiment-analysis"``.
Offline, the same code paths run on local folders of the same architectures: a causal
GPT-2 loaded by ``lmppl.load(folder)`` and GPT-2 sequence classifiers run by
transformers through ``lmppl.scorers.hf_text_classifier(folder)``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import lmppl
from models import sentiment, toxicity
from tests.fixtures import save_causal_lm, save_classifier, torch_probabilities, torch_scores

TEXTS = ["once upon a time", "a cat", "the dog sat on a mat and ran to the park", "", "I hate it!"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "lm": save_causal_lm(root / "gpt2"),
        "two": save_classifier(root / "classifier2", num_labels=2, seed=1),
        "one": save_classifier(root / "classifier1", num_labels=1, seed=2),
        "five": save_classifier(root / "classifier5", num_labels=5, seed=3),
    }


def decoded(result, tokenizer) -> list[str]:
    """The texts a host potential sees: each row up to its first EOS, decoded."""
    texts = []
    for row in np.asarray(result.samples[result.site]).tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row))
    return texts


@pytest.mark.parametrize("labels", ["two", "one", "five"])
def test_hf_text_classifier_matches_torch(folders, labels):
    """Batched (padded) probabilities equal one unpadded torch pass per text."""
    predict = lmppl.scorers.hf_text_classifier(str(folders[labels]), batch_size=3)
    probs = predict(TEXTS)
    reference = torch_probabilities(folders[labels], TEXTS)
    assert probs.shape == (len(TEXTS), 5 if labels == "five" else 2)
    np.testing.assert_allclose(probs, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert np.ptp(probs[:, -1]) > 0.05  # the random classifier tells the texts apart
    assert predict([]).shape[0] == 0


def test_hf_causal_lm_folder_loads_as_the_base_model(folders):
    task = toxicity.classifier(model=str(folders["lm"]), classifier=str(folders["two"]))
    assert task.lm.config.architecture == "gpt2"
    from transformers import AutoTokenizer

    assert task.lm.vocab_size == len(AutoTokenizer.from_pretrained(folders["lm"]))
    ids = task.lm.tokenizer.encode(toxicity.PROMPT)
    assert ids[0] == task.lm.tokenizer.bos_token_id == 1
    assert task.lm.tokenizer.decode(ids) == toxicity.PROMPT


def test_toxicity_classifier_with_hf_folders(folders):
    """φ(s) = p(toxic | s) from the HF classifier, the model an HF GPT-2 folder."""
    task = toxicity.classifier(
        model=str(folders["lm"]), classifier=str(folders["two"]), num_tokens=4, toxic_class=1
    )
    result = lmppl.infer.SMC(task.program, 8).run(jax.random.key(0))
    assert np.isfinite(float(result.log_marginal))
    texts = decoded(result, task.lm.tokenizer)
    expected = np.log(torch_probabilities(folders["two"], texts)[:, 1])
    np.testing.assert_allclose(
        np.asarray(result.site_log_probs["toxic"]), expected, rtol=1e-4, atol=1e-5
    )


def test_toxicity_threshold_with_a_single_score_classifier(folders):
    """The ToxicityModel configuration: one output s (high = harmless), toxic_class=0, so the
    toxicity score log p(clean) − log p(toxic) is s itself and φ = 1[s < limit] + floor."""
    limit, floor = 0.0, 1e-3
    task = toxicity.threshold(
        model=str(folders["lm"]),
        classifier=str(folders["one"]),
        num_tokens=4,
        toxic_class=0,
        limit=limit,
        floor=floor,
    )
    result = lmppl.infer.SMC(task.program, 8).run(jax.random.key(1))
    assert np.isfinite(float(result.log_marginal))
    scores = torch_scores(folders["one"], decoded(result, task.lm.tokenizer))
    expected = np.log(np.where(scores < limit, 1.0, 0.0) + floor)
    np.testing.assert_allclose(np.asarray(result.site_log_probs["toxic"]), expected, rtol=1e-5)


def test_sentiment_with_a_five_class_classifier(folders):
    """The review classifier scores the prompt followed by the continuation."""
    task = sentiment.sentiment(
        model=str(folders["lm"]), classifier=str(folders["five"]), num_tokens=3, target_class=0
    )
    result = lmppl.infer.SMC(task.program, 8).run(jax.random.key(2))
    assert np.isfinite(float(result.log_marginal))
    reviews = [sentiment.PROMPT + text for text in decoded(result, task.lm.tokenizer)]
    expected = np.log(torch_probabilities(folders["five"], reviews)[:, 0])
    np.testing.assert_allclose(
        np.asarray(result.site_log_probs["sentiment"]), expected, rtol=1e-4, atol=1e-5
    )


def test_missing_classifier_folder_is_one_line(tmp_path):
    with pytest.raises(OSError, match="could not load the text classifier") as error:
        lmppl.scorers.hf_text_classifier(str(tmp_path / "nothing"))
    assert "\n" not in str(error.value)


def test_hub_classifier_offline_is_one_line_without_retries(monkeypatch):
    """Issue #15 (smaller): a hub id asked for offline spent ~28 s in download retries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not in the Hugging Face cache, and the hub is") as error:
        lmppl.scorers.hf_text_classifier("lmppl-tests/no-such-classifier")
    assert "\n" not in str(error.value)
