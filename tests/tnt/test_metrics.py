"""Prevalence and BLEU (checked against NLTK's corpus BLEU when NLTK is installed)."""

import numpy as np
import pytest

from lmppl import tnt


def random_corpus(seed, rows=40, vocab=8, shortest=4):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, rng.integers(shortest, 15)).tolist() for _ in range(rows)]


def test_bleu_agrees_with_nltk():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    hypotheses = random_corpus(0)
    references = [[r, random_corpus(2 + i, rows=1)[0]] for i, r in enumerate(random_corpus(1))]
    ours = tnt.corpus_bleu(hypotheses, references)
    theirs = 100 * bleu_score.corpus_bleu(references, hypotheses)
    assert 1 < ours < 99
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    # NLTK counts max(1, ·) 4-grams for a hypothesis of fewer than 4 tokens; the
    # standard count (ours, sacreBLEU's) is 0, so BLEU differs slightly there
    short = random_corpus(0, shortest=2)
    assert tnt.corpus_bleu(short, references) != 100 * bleu_score.corpus_bleu(references, short)
    # one shared reference set (paired=False) is the same as repeating it per hypothesis
    shared = random_corpus(5, rows=6)
    np.testing.assert_allclose(
        tnt.corpus_bleu(hypotheses, [shared] * len(hypotheses)),
        100 * bleu_score.corpus_bleu([shared] * len(hypotheses), hypotheses),
        rtol=1e-10,
    )


def test_bleu_to_old_pairs_rows_and_strips_padding():
    old = np.array([[2, 3, 4, 5, 6, 2, 1], [4, 4, 5, 6, 7, 1, 1]])
    assert tnt.bleu_to_old(old, old, eos_token_id=1) == pytest.approx(100.0)
    changed = old.copy()
    changed[0, 3] = 7
    partly = tnt.bleu_to_old(changed, old, eos_token_id=1)
    assert 0 < partly < 100
    # padding after EOS does not count: other padding tokens give the same score
    padded = changed.copy()
    padded[1, 6] = 3
    assert tnt.bleu_to_old(padded, old, eos_token_id=1) == pytest.approx(partly)
    swapped = old[::-1]
    assert tnt.bleu_to_old(swapped, old, eos_token_id=1) < 100
    assert tnt.bleu_to_old(swapped, old, eos_token_id=1, paired=False) == pytest.approx(100.0)
    assert tnt.corpus_bleu([[2, 3]], [[[4, 5, 6]]]) == 0.0


def test_prevalence_counts_rows_with_an_unwanted_token_before_eos():
    tokens = np.array([[2, 3, 1, 1], [2, 2, 1, 3], [3, 3, 3, 3], [2, 2, 2, 2]])
    assert tnt.prevalence(tokens, {3}, eos_token_id=1) == 0.5
    assert tnt.prevalence(tokens, {3}) == 0.75
    assert tnt.contains_unwanted(tokens, lambda t: t == 2, eos_token_id=1).tolist() == [
        True,
        True,
        False,
        True,
    ]
