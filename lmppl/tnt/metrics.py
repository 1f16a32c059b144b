"""Evaluation of a TNT update: prevalence of the behaviour and similarity to the old model.

* prevalence: the fraction of generations with at least one unwanted token (before the
  first EOS), :func:`prevalence`;
* similarity: corpus BLEU-4 (Papineni et al. 2002) of the new generations against the
  old model's, computed on token ids (the model's own tokenisation, no text
  normalisation), in [0, 100]. :func:`corpus_bleu` is the standard definition: modified
  n-gram precisions p_n (n = 1..4, each hypothesis n-gram count clipped by its largest
  count in any of that hypothesis' references, summed over the corpus), their geometric
  mean, and the brevity penalty ``min(1, exp(1 − r / c))`` with c the total hypothesis
  length and r the sum of the reference lengths closest to each hypothesis' length (ties:
  the shorter). No smoothing: a corpus with no matching n-gram of some order scores 0.
  It agrees with ``nltk.translate.bleu_score.corpus_bleu`` (checked in the tests) except
  that NLTK counts ``max(1, ·)`` n-grams for a hypothesis shorter than n (here, as in
  sacreBLEU, such a hypothesis has 0 n-grams of that order); it is written here so that
  lmppl needs no NLP dependency.

:func:`bleu_to_old` offers two pairings of new and old generations:

* ``paired=True``: generation i of the new model against generation i of the old one.
  With the same random key both are decoded from the same Gumbel noise, so an unchanged
  model scores 100 and the score measures how much the update changed each story;
* ``paired=False``: every new generation against the whole set of old generations as
  references (a distributional similarity; usable for samplers that cannot share the
  noise, such as SMC).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from lmppl.decoding import trim_at_eos
from lmppl.tnt.annotations import from_detector

__all__ = ["bleu_to_old", "contains_unwanted", "corpus_bleu", "prevalence", "trim"]


def contains_unwanted(
    tokens: Any,
    unwanted: Collection[int] | Callable[[np.ndarray], Any],
    *,
    eos_token_id: int | None = None,
) -> np.ndarray:
    """``[B]`` bool: rows with an unwanted token before (or at) their first EOS.

    ``unwanted``: token ids, or a token-level detector ``tokens [B, T] -> bool [B, T]``.
    """
    return from_detector(tokens, unwanted, eos_token_id=eos_token_id).mask.any(axis=1)


def prevalence(
    tokens: Any,
    unwanted: Collection[int] | Callable[[np.ndarray], Any],
    *,
    eos_token_id: int | None = None,
) -> float:
    """Fraction of generations ``[B, T]`` that show the unwanted behaviour."""
    return float(contains_unwanted(tokens, unwanted, eos_token_id=eos_token_id).mean())


def trim(tokens: Any, eos_token_id: int | None) -> list[list[int]]:
    """Rows of ``[B, T]`` as lists, cut before their first EOS."""
    return [trim_at_eos(row, eos_token_id) for row in np.asarray(tokens).tolist()]


def _ngrams(sequence: Sequence[int], order: int) -> Counter:
    return Counter(tuple(sequence[i : i + order]) for i in range(len(sequence) - order + 1))


class _References:
    """Max n-gram counts over a set of references, and their lengths."""

    def __init__(self, references: Sequence[Sequence[int]], max_order: int):
        if not references:
            raise ValueError("every hypothesis needs at least one reference")
        self.lengths = np.asarray([len(r) for r in references])
        self.max_counts: list[Counter] = []
        for order in range(1, max_order + 1):
            table: Counter = Counter()
            for reference in references:
                for gram, count in _ngrams(list(reference), order).items():
                    if count > table[gram]:
                        table[gram] = count
            self.max_counts.append(table)

    def closest_length(self, length: int) -> int:
        distance = np.abs(self.lengths - length)
        return int(self.lengths[distance == distance.min()].min())


def _bleu(hypotheses: Sequence[Sequence[int]], tables: Sequence[_References], max_order: int):
    matches = np.zeros(max_order)
    totals = np.zeros(max_order)
    hyp_length = ref_length = 0
    for hypothesis, table in zip(hypotheses, tables, strict=True):
        hypothesis = list(hypothesis)
        hyp_length += len(hypothesis)
        ref_length += table.closest_length(len(hypothesis))
        for n in range(1, max_order + 1):
            counts = _ngrams(hypothesis, n)
            clip = table.max_counts[n - 1]
            matches[n - 1] += sum(min(c, clip[g]) for g, c in counts.items())
            totals[n - 1] += max(len(hypothesis) - n + 1, 0)
    if hyp_length == 0 or np.any(matches == 0):
        return 0.0
    log_precision = np.mean(np.log(matches / totals))
    brevity = 1.0 if hyp_length > ref_length else math.exp(1.0 - ref_length / hyp_length)
    return 100.0 * brevity * math.exp(log_precision)


def corpus_bleu(
    hypotheses: Sequence[Sequence[int]],
    references: Sequence[Sequence[Sequence[int]]],
    *,
    max_order: int = 4,
) -> float:
    """Corpus BLEU in [0, 100]; ``references[i]`` is the list of references of hypothesis i."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    tables = [_References(refs, max_order) for refs in references]
    return _bleu(hypotheses, tables, max_order)


def bleu_to_old(
    new_tokens: Any,
    old_tokens: Any,
    *,
    eos_token_id: int | None = None,
    paired: bool = True,
    max_order: int = 4,
) -> float:
    """BLEU of new generations ``[B, T]`` against the old model's ``[B', T']``.

    ``paired=True`` (B = B'): row i against old row i; ``paired=False``: each row against
    all old rows as references.
    """
    new = trim(new_tokens, eos_token_id)
    old = trim(old_tokens, eos_token_id)
    if paired:
        if len(new) != len(old):
            raise ValueError(f"paired BLEU needs as many new ({len(new)}) as old ({len(old)}) rows")
        return corpus_bleu(new, [[o] for o in old], max_order=max_order)
    shared = _References(old, max_order)
    return _bleu(new, [shared] * len(new), max_order)
