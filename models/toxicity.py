"""Red-teaming for toxic stories (Zhao et al. 2024, Sec. 7.1): two targets.

* classifier target: ``σ(s) ∝ p0(s) · p(toxic | s)``;
* threshold target: ``σ(s) ∝ p0(s) · (1[score(s) < limit] + floor)`` with the toxicity
  score ``score = log p(clean | s) − log p(toxic | s)`` (the single output of a reward-style
  classifier such as ``nicholasKluge/ToxicityModel``, where negative means toxic).

p0 continues ``"Once upon a time, there was a"`` for a fixed number of tokens. Offline, p0
is stories260K and the classifier is alt-profanity-check's offensive-language model; the
paper's configuration is ``model="roneneldan/TinyStories-33M"``,
``classifier="nicholasKluge/ToxicityModel", toxic_class=0`` (its score is high for
harmless text). Exact samples of σ come from rejection (accept s with probability φ(s)).
"""

from __future__ import annotations

import numpy as np
import numpyro

import lmppl
from lmppl import potentials
from lmppl.task import Task, task_factory
from models.common import resolve_classifier, resolve_model

__all__ = ["PROMPT", "classifier", "threshold"]

PROMPT = "Once upon a time, there was a"


def _story(lm, prompt: str, num_tokens: int):
    return numpyro.sample(
        "story", lmppl.LM(lm, prompt=prompt, max_new_tokens=num_tokens, stop_at_eos=False)
    )


@task_factory
def classifier(
    model="stories260k",
    num_tokens: int = 20,
    classifier=None,
    toxic_class: int = 1,
    prompt: str = PROMPT,
) -> Task:
    """``σ(s) ∝ p0(s) p(toxic | s)`` (the paper's toxicity-classifier task, T = 20)."""
    lm = resolve_model(model)
    predict = resolve_classifier(classifier, lmppl.scorers.offensive_language)
    toxic = potentials.text_classifier(predict, lm.tokenizer, toxic_class, name="toxicity")

    def toxic_story():
        story = _story(lm, prompt, num_tokens)
        numpyro.factor("toxic", toxic(story))

    return Task(
        name="toxicity_classifier",
        program=toxic_story,
        lm=lm,
        exact="rejection",
        description=f"p0({lm.name}) x p(toxic | s), T={num_tokens}",
    )


@task_factory
def threshold(
    model="stories260k",
    num_tokens: int = 10,
    limit: float = -5.0,
    floor: float = 1e-16,
    classifier=None,
    toxic_class: int = 1,
    prompt: str = PROMPT,
) -> Task:
    """``σ(s) ∝ p0(s) (1[score(s) < limit] + floor)`` (the paper's threshold task, T = 10)."""
    if not 0 < floor < 1:
        raise ValueError(f"floor must be in (0, 1), got {floor}")
    lm = resolve_model(model)
    predict = resolve_classifier(classifier, lmppl.scorers.offensive_language)

    def toxicity_below_limit(texts: list[str]) -> np.ndarray:
        probs = np.clip(np.asarray(predict(texts), np.float64), 1e-300, 1.0)
        score = np.log(probs[:, 1 - toxic_class]) - np.log(probs[:, toxic_class])
        return np.log(np.where(score < limit, 1.0, 0.0) + floor)

    passes = potentials.text(toxicity_below_limit, lm.tokenizer, name="toxicity_threshold")

    def toxic_story():
        story = _story(lm, prompt, num_tokens)
        numpyro.factor("toxic", passes(story))

    return Task(
        name="toxicity_threshold",
        program=toxic_story,
        lm=lm,
        exact="rejection",
        log_envelope=float(np.log1p(floor)),
        description=f"p0({lm.name}) x 1[toxicity score < {limit}], T={num_tokens}",
    )
