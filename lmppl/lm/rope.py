"""Rotary position embeddings: inverse frequencies for every supported ``rope_type``.

Plain RoPE rotates the pair ``(x_k, x_{k+d/2})`` of a head by the angle ``p f_k`` at position
``p``, with ``f_k = theta^(-2k/d)`` for ``k < d/2`` and ``d`` the rotated width
(``partial_rotary_factor * head_dim``; the rest of the head passes unrotated). The scaled
kinds change the ``f_k`` and may multiply cos and sin by an attention factor ``a``:

* ``linear``: ``f_k / factor``.
* ``dynamic`` (NTK): ``transformers`` only changes ``theta`` once a sequence outgrows
  ``max_position_embeddings``, which is lmppl's context length, so within it this is plain
  RoPE -- exactly, for cached decoding too.
* ``llama3``: wavelengths ``2 pi / f_k`` above ``original / low_freq_factor`` are divided by
  ``factor``, those below ``original / high_freq_factor`` kept, the band between smoothly
  interpolated.
* ``yarn``: ``f_k`` interpolated between ``f_k / factor`` and ``f_k`` by a linear ramp over
  dimensions (bounds from ``beta_fast``, ``beta_slow``); ``a = 0.1 ln(factor) + 1``
  (or the mscale ratio, or the given ``attention_factor``).
* ``longrope`` (Phi-3's ``su``): ``f_k / short_factor_k``, and
  ``a = sqrt(1 + ln(factor) / ln(original))``. ``transformers`` switches to ``long_factor``
  for sequences longer than the original context (and then rotates the keys already cached
  with the short factors differently from a fresh forward pass), so lmppl caps such models'
  context at the original length, where the short factors are exact.
* ``rope_freqs``: ``f_k / r_k`` with the divisors ``r`` a GGUF file stores as
  ``rope_freqs.weight`` (llama.cpp's converter writes llama3 scaling that way).

Every computation follows ``transformers``' ``modeling_rope_utils.py`` step by step in float32,
so the frequencies agree to the last bit or two.
"""

from __future__ import annotations

import math

import numpy as np

from lmppl.lm.config import SUPPORTED_ROPE_SCALING, RopeScaling

__all__ = ["rope_frequencies"]


def _plain(theta: float, dim: int) -> np.ndarray:
    """``1 / theta^(2k/d)`` in float32, ``k < d/2``."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def _llama3(inverse: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    factor = scaling.factor
    original = scaling.original_context_length
    low_wavelength = original / scaling.low_freq_factor
    high_wavelength = original / scaling.high_freq_factor
    wavelength = np.float32(2 * math.pi) / inverse
    scaled = np.where(wavelength > low_wavelength, inverse / np.float32(factor), inverse)
    smooth = (np.float32(original) / wavelength - np.float32(scaling.low_freq_factor)) / np.float32(
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelength < high_wavelength) & ~(wavelength > low_wavelength)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_attention_factor(scaling: RopeScaling) -> float:
    def mscale(scale: float, multiplier: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * multiplier * math.log(scale) + 1.0

    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.mscale and scaling.mscale_all_dim:
        return float(
            mscale(scaling.factor, scaling.mscale) / mscale(scaling.factor, scaling.mscale_all_dim)
        )
    return mscale(scaling.factor)


def _yarn(theta: float, dim: int, scaling: RopeScaling) -> np.ndarray:
    factor = scaling.factor
    original = scaling.original_context_length

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    positions = np.float32(theta) ** exponents
    extrapolation = np.float32(1.0) / positions
    interpolation = np.float32(1.0) / (np.float32(factor) * positions)
    inverse = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inverse.astype(np.float32)


def rope_frequencies(
    head_dim: int,
    theta: float,
    scaling: RopeScaling | None = None,
    partial_rotary_factor: float = 1.0,
) -> tuple[np.ndarray, float]:
    """The inverse frequencies ``f`` ``[d/2]`` (float32) and the cos/sin factor ``a``.

    Args:
      head_dim: width of one attention head.
      theta: the RoPE base.
      scaling: the checkpoint's RoPE scaling, or ``None`` for plain RoPE.
      partial_rotary_factor: the rotated fraction of the head (``d = int(head_dim * it)``).

    Raises:
      ValueError: a scaling kind that is not supported (one line, listing those that are).
    """
    dim = int(head_dim * partial_rotary_factor)
    if scaling is None or scaling.kind == "dynamic":
        return _plain(theta, dim), 1.0
    if scaling.kind == "linear":
        return (_plain(theta, dim) / np.float32(scaling.factor)).astype(np.float32), 1.0
    if scaling.kind == "llama3":
        return _llama3(_plain(theta, dim), scaling), 1.0
    if scaling.kind == "yarn":
        return _yarn(theta, dim, scaling), _yarn_attention_factor(scaling)
    if scaling.kind in ("longrope", "rope_freqs"):
        factors = np.asarray(scaling.frequency_factors, np.float32)
        if factors.shape != (dim // 2,):
            raise ValueError(
                f"{scaling.kind} has {factors.size} frequency factors for a rotary width of "
                f"{dim} (needs {dim // 2})"
            )
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inverse = np.float32(1.0) / (factors * np.float32(theta) ** exponents)
        if scaling.kind == "rope_freqs":
            return inverse.astype(np.float32), 1.0
        if scaling.attention_factor is not None:
            attention_factor = float(scaling.attention_factor)
        elif scaling.factor <= 1.0:
            attention_factor = 1.0
        else:
            attention_factor = math.sqrt(
                1 + math.log(scaling.factor) / math.log(scaling.original_context_length)
            )
        return inverse.astype(np.float32), attention_factor
    raise ValueError(
        f"RoPE scaling {scaling.kind!r} is not supported; supported: "
        + ", ".join(SUPPORTED_ROPE_SCALING)
    )
