"""Steering toward a chosen sentiment class (Zhao et al. 2024, Sec. 7.2).

``σ(s) ∝ p0(s) · p(class | s)``: p0 continues ``"I bought this"`` for a fixed number of
tokens and the classifier scores the decoded continuation (prompt included, as a review).
Offline, p0 is stories260K (or ``model="smollm2-135m"``) and the classifier is VADER read
as five ordered classes (:func:`lmppl.scorers.vader_sentiment`); class 0 is "strongly
negative" (the paper's 1-star target). The paper's configuration is ``model="gpt2-medium"``,
``classifier="LiYuan/amazon-review-sentiment-analysis"``. Exact samples come from rejection.
"""

from __future__ import annotations

import numpyro

import lmppl
from lmppl import potentials
from lmppl.task import Task, task_factory
from models.common import resolve_classifier, resolve_model

__all__ = ["PROMPT", "sentiment"]

PROMPT = "I bought this"


@task_factory
def sentiment(
    model="stories260k",
    num_tokens: int = 10,
    target_class: int = 0,
    classifier=None,
    prompt: str = PROMPT,
) -> Task:
    """``σ(s) ∝ p0(s) p(target_class | prompt + s)`` (default: strongly negative)."""
    lm = resolve_model(model)
    predict = resolve_classifier(classifier, lmppl.scorers.vader_sentiment)

    def review_probs(texts: list[str]):
        return predict([prompt + t for t in texts])

    review_probs.__name__ = "sentiment"
    in_class = potentials.text_classifier(review_probs, lm.tokenizer, target_class)

    def review():
        text = numpyro.sample(
            "review", lmppl.LM(lm, prompt=prompt, max_new_tokens=num_tokens, stop_at_eos=False)
        )
        numpyro.factor("sentiment", in_class(text))

    return Task(
        name="sentiment",
        program=review,
        lm=lm,
        site="review",
        exact="rejection",
        description=f"p0({lm.name}) x p(class {target_class} | s), T={num_tokens}",
    )
