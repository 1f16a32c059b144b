"""Token-level annotations of the old model's own generations.

TNT (Zhang et al. 2024) learns from generations ``x = x_1:T ~ p_o(· | c)`` of the old
model in which some tokens are marked as *negative*: the positions where the unwanted
behaviour shows. An annotation is a boolean mask ``m`` ``[B, T]`` (``m_t = 1``: token
``x_t`` is negative) together with the padding mask ``valid`` ``[B, T]`` (the tokens up
to and including the first EOS; EOS padding after it is not part of the sequence).

Two sources:

* (negative, corrected) pairs, :func:`from_pairs`, with modes

  - ``"first"``: the first token where the negative departs from its correction
    (index = length of their common prefix);
  - ``"diff"``: every token of the negative that a minimal token-level edit script
    (Levenshtein alignment: substitutions, deletions and insertions of unit cost) to the
    correction substitutes or deletes; an insertion in the correction marks nothing, so
    a correction that inserts a word does not mark the rest of the sequence;
  - ``"full"``: every (valid) token of a negative that differs from its correction.

  A pair with ``negative == corrected`` (after padding is stripped) has no annotation.

* a token-level detector, :func:`from_detector`: a callable ``tokens [B, T] -> bool
  [B, T]`` (e.g. a regex over decoded pieces) or a collection of unwanted token ids
  (``m_t = 1[x_t ∈ unwanted]``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from lmppl import decoding
from lmppl.decoding import trim_at_eos

__all__ = ["MODES", "Annotations", "from_detector", "from_pairs", "valid_mask"]

MODES = ("first", "diff", "full")


class Annotations(NamedTuple):
    """Negative-token annotations of ``B`` generations of ``T`` tokens.

    Fields:
      mask: ``[B, T]`` bool, ``True`` at annotated (negative) tokens; always ``⊆ valid``.
      valid: ``[B, T]`` bool, ``True`` at real tokens (through the first EOS).
    """

    mask: np.ndarray
    valid: np.ndarray

    @property
    def num_annotated(self) -> int:
        """Total number of annotated tokens."""
        return int(self.mask.sum())

    @property
    def negative_rows(self) -> np.ndarray:
        """``[B]`` bool: generations with at least one annotated token."""
        return self.mask.any(axis=1)


def valid_mask(tokens: Any, eos_token_id: int | None) -> np.ndarray:
    """``[B, T]`` NumPy bool: the tokens up to and including each row's first EOS.

    ``eos_token_id=None`` (fixed-length generation) marks every token valid. The host
    view of :func:`lmppl.decoding.valid_mask` (the one EOS rule).
    """
    return np.asarray(decoding.valid_mask(jnp.asarray(np.asarray(tokens)), eos_token_id))


def _diff_positions(negative: list[int], corrected: list[int], mode: str) -> list[int]:
    if negative == corrected:
        return []
    if mode == "full":
        return list(range(len(negative)))
    if mode == "first":
        common = 0
        for a, b in zip(negative, corrected, strict=False):
            if a != b:
                break
            common += 1
        # the negative may be a strict prefix of its correction: nothing of it is wrong
        return [common] if common < len(negative) else []
    return _edited_positions(negative, corrected)


def _edited_positions(a: list[int], b: list[int]) -> list[int]:
    """Positions of ``a`` substituted or deleted by a minimal edit script to ``b``."""
    n, m = len(a), len(b)
    cost = np.zeros((n + 1, m + 1), np.int64)
    cost[:, 0] = np.arange(n + 1)
    cost[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i, j] = min(
                cost[i - 1, j - 1] + (a[i - 1] != b[j - 1]), cost[i - 1, j] + 1, cost[i, j - 1] + 1
            )
    marked = []
    i, j = n, m
    while i > 0:  # backtrace: match, then substitution, deletion, insertion
        if j > 0 and cost[i, j] == cost[i - 1, j - 1] + (a[i - 1] != b[j - 1]):
            if a[i - 1] != b[j - 1]:
                marked.append(i - 1)
            i, j = i - 1, j - 1
        elif cost[i, j] == cost[i - 1, j] + 1:
            marked.append(i - 1)
            i -= 1
        else:
            j -= 1
    return sorted(marked)


def from_pairs(
    negatives: Any,
    corrected: Sequence[Sequence[int]] | Any,
    mode: str = "first",
    *,
    eos_token_id: int | None = None,
) -> Annotations:
    """Annotate ``negatives`` ``[B, T]`` against their corrections.

    Args:
      negatives: the old model's generations ``[B, T]`` (EOS padding after a row stops).
      corrected: one corrected token sequence per row (any lengths; a list of lists or an
        array, EOS padding is stripped the same way).
      mode: ``"first"``, ``"diff"`` or ``"full"`` (see the module docstring).
      eos_token_id: the EOS of the generations (``None``: fixed length, no padding).
    """
    if mode not in MODES:
        raise ValueError(f"annotation mode must be one of {MODES}, got {mode!r}")
    negatives = np.asarray(negatives)
    if negatives.ndim != 2:
        raise ValueError(f"negatives must be [B, T] token ids, got shape {negatives.shape}")
    corrected = [np.asarray(row).tolist() for row in corrected]
    if len(corrected) != negatives.shape[0]:
        raise ValueError(
            f"{len(corrected)} corrections for {negatives.shape[0]} negatives: one per row"
        )
    valid = valid_mask(negatives, eos_token_id)
    mask = np.zeros(negatives.shape, bool)
    for b, (row, fix) in enumerate(zip(negatives, corrected, strict=True)):
        negative = trim_at_eos(row, eos_token_id, keep_eos=True)
        positions = _diff_positions(negative, trim_at_eos(fix, eos_token_id, keep_eos=True), mode)
        mask[b, positions] = True
    return Annotations(mask & valid, valid)


def from_detector(
    tokens: Any,
    detector: Callable[[np.ndarray], Any] | Collection[int],
    *,
    eos_token_id: int | None = None,
) -> Annotations:
    """Annotate the tokens a detector flags.

    Args:
      tokens: generations ``[B, T]``.
      detector: ``tokens [B, T] -> bool [B, T]`` (NumPy or JAX), or a collection of
        unwanted token ids (``m_t = 1[x_t ∈ detector]``).
      eos_token_id: the EOS of the generations (padding after it is never annotated).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T] token ids, got shape {tokens.shape}")
    if callable(detector):
        flagged = np.asarray(detector(tokens)).astype(bool)
        if flagged.shape != tokens.shape:
            raise ValueError(
                f"the detector returned a mask of shape {flagged.shape} for tokens "
                f"{tokens.shape}; it must flag every token"
            )
    else:
        flagged = np.isin(tokens, np.asarray(list(detector), np.int64))
    valid = valid_mask(tokens, eos_token_id)
    return Annotations(flagged & valid, valid)
