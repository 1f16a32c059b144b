"""Drawing one token per row from ``[N, V]`` log-probabilities in O(N·V) cheap arithmetic.

``jax.random.categorical`` (Gumbel-max) draws N·V random variates and takes two logarithms
of each: on a CPU that is a third of a small model's decoding step. :func:`sample_categorical`
draws two uniforms per row and inverts the CDF in two levels:

    p_v = exp(log q_v − max_u log q_u)                 (unnormalised, the largest is 1)
    blocks of B ≈ √V tokens, masses m_b = Σ_{v ∈ b} p_v
    b ~ m_b / Σ m          (inverse CDF over the ⌈V/B⌉ block masses)
    v ~ p_v / m_b, v ∈ b    (inverse CDF inside the chosen block)

which is the law ``q`` exactly in real arithmetic (``P(v) = m_b/Σm · p_v/m_b``). Both
inversions pick the first index of positive mass whose cumulative sum exceeds ``u · total``
(in exact arithmetic an index of mass zero is never the first to exceed; the test is explicit
because a float32 prefix sum need not be exactly monotone), or, when rounding puts the point
at the total, the last index of positive mass: a token of probability zero is never drawn. In float32 each cumulative sum is exact to a few ulps of
its running total, so the sampled law differs from ``q`` by a total variation of about
``(V/B + B) · 2⁻²⁴ ≈ 2√V · 6·10⁻⁸`` (3·10⁻⁵ for a 49k vocabulary, about 100× less than one
cumulative sum over the whole vocabulary would give); Gumbel-max in float32 has an error of
the same kind (it cannot draw a token less likely than about ``e⁻¹⁷`` times the mode).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["block_size", "sample_categorical"]


def block_size(vocab_size: int) -> int:
    """The block width B: the power of two nearest ``√V`` (at least 8)."""
    return max(8, 2 ** round(math.log2(max(vocab_size, 1)) / 2))


def _invert(masses: jax.Array, uniforms: jax.Array) -> jax.Array:
    """Per row, the first index whose cumulative mass exceeds ``u · total``, never a zero.

    Args:
      masses: ``[N, K]`` non-negative, each row with at least one positive entry.
      uniforms: ``[N]`` in ``[0, 1)``.
    """
    cumulative = jnp.cumsum(masses, axis=-1)
    point = uniforms * cumulative[:, -1]
    positive = masses > 0
    # The first positive index past the point (a parallel prefix sum need not be exactly
    # monotone in float32, so the zero-mass test is explicit rather than implied).
    hit = (cumulative > point[:, None]) & positive
    last_positive = masses.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    index = jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), last_positive)
    return index.astype(jnp.int32)


def sample_categorical(rng_key: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One draw per row of ``Categorical(softmax(log_probs))``, ``[N, V]`` → ``[N]`` int32.

    The rows need not be normalised. ``-inf`` entries are never drawn; a row that is
    ``-inf`` everywhere (no valid token) returns index 0, as ``jax.random.categorical`` does.
    """
    if log_probs.ndim != 2:
        raise ValueError(
            f"sample_categorical needs [N, V] log-probabilities, got {log_probs.shape}"
        )
    rows, vocab = log_probs.shape
    width = block_size(vocab)
    blocks = -(-vocab // width)
    log_probs = jnp.pad(
        log_probs.astype(jnp.float32),
        ((0, 0), (0, blocks * width - vocab)),
        constant_values=-jnp.inf,
    ).reshape(rows, blocks, width)
    top = jnp.max(log_probs, axis=(1, 2))
    valid = jnp.isfinite(top)
    # A row with no valid token draws index 0: give it mass there alone.
    log_probs = log_probs.at[:, 0, 0].set(jnp.where(valid, log_probs[:, 0, 0], 0.0))
    top = jnp.where(valid, top, 0.0)[:, None]

    block_key, token_key = jax.random.split(rng_key)
    block_masses = jnp.exp(log_probs - top[:, :, None]).sum(axis=-1)
    block = _invert(block_masses, jax.random.uniform(block_key, (rows,)))
    # Gather the chosen block's log-probabilities, not their exponentials: XLA would fuse
    # the row maximum into the gather and recompute it for every element.
    inside = jnp.take_along_axis(log_probs, block[:, None, None], axis=1)[:, 0]
    offset = _invert(jnp.exp(inside - top), jax.random.uniform(token_key, (rows,)))
    return block * width + offset
