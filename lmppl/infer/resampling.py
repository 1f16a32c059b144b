"""Resampling schemes and the effective sample size.

Every resampler has the signature ``(rng_key, log_weights [N], num_samples) -> [num_samples]``
ancestor indices, and is unbiased: the expected number of offspring of particle ``i`` is
``num_samples · w_i`` with ``w = softmax(log_weights)``. Weights are taken in log space;
``-inf`` entries never get offspring; if every weight is ``-inf`` the indices are the
identity (there is nothing to resample and the caller reports a zero marginal).

Padded particle axes (:func:`resample_active`): a sweep compiled for ``N`` particles can run
with only the first ``K <= N`` active, ``K`` a traced integer (so one compilation serves
every ``K``). The built-in schemes then draw exactly the ``K`` points of their ``K``-sample
scheme (``K`` strata, ``K`` systematic offsets, ``floor(K w_i)`` residual copies) for the
first ``K`` slots and leave the others their own ancestors.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lmppl.types import Resampler

__all__ = [
    "RESAMPLERS",
    "Resampler",
    "effective_sample_size",
    "get_resampler",
    "multinomial",
    "normalized_weights",
    "padded_resampler",
    "resample_active",
    "residual",
    "stratified",
    "systematic",
]


def normalized_weights(log_weights: jax.Array) -> jax.Array:
    """``softmax(log_weights)``; uniform when every weight is ``-inf`` (no NaNs)."""
    log_weights = jnp.asarray(log_weights, jnp.float32)
    finite = jnp.any(jnp.isfinite(log_weights))
    weights = jax.nn.softmax(jnp.where(finite, log_weights, 0.0))
    return weights


def effective_sample_size(log_weights: jax.Array) -> jax.Array:
    """``ESS = 1 / Σ w_i²`` with normalised weights; 0 when every weight is zero."""
    weights = normalized_weights(log_weights)
    finite = jnp.any(jnp.isfinite(log_weights))
    return jnp.where(finite, 1.0 / jnp.sum(weights**2), 0.0)


def _identity_if_degenerate(indices, log_weights, num_samples):
    finite = jnp.any(jnp.isfinite(log_weights))
    size = log_weights.shape[0]
    identity = jnp.arange(num_samples) % size
    return jnp.where(finite, indices, identity).astype(jnp.int32)


def _search(weights: jax.Array, points: jax.Array) -> jax.Array:
    """Index of the cumulative-weight bin that contains each point in ``[0, 1)``."""
    cumulative = jnp.cumsum(weights)
    cumulative = cumulative / cumulative[-1]
    indices = jnp.searchsorted(cumulative, points, side="right")
    # Guard against float round-off pushing a point past the last bin, and never land
    # on a zero-weight particle at the edge.
    return jnp.clip(indices, 0, weights.shape[0] - 1)


def multinomial(rng_key: jax.Array, log_weights: jax.Array, num_samples: int) -> jax.Array:
    """Independent draws from ``Categorical(w)`` by inverse CDF (O(N log N), not O(N²))."""
    points = jax.random.uniform(rng_key, (num_samples,))
    indices = _search(normalized_weights(log_weights), points)
    return _identity_if_degenerate(indices, log_weights, num_samples)


def stratified(rng_key: jax.Array, log_weights: jax.Array, num_samples: int) -> jax.Array:
    """One uniform draw in each stratum ``[k/M, (k+1)/M)``."""
    points = (jnp.arange(num_samples) + jax.random.uniform(rng_key, (num_samples,))) / num_samples
    indices = _search(normalized_weights(log_weights), points)
    return _identity_if_degenerate(indices, log_weights, num_samples)


def systematic(rng_key: jax.Array, log_weights: jax.Array, num_samples: int) -> jax.Array:
    """One shared uniform offset for all strata ``(k + u) / M``."""
    points = (jnp.arange(num_samples) + jax.random.uniform(rng_key, ())) / num_samples
    indices = _search(normalized_weights(log_weights), points)
    return _identity_if_degenerate(indices, log_weights, num_samples)


def residual(rng_key: jax.Array, log_weights: jax.Array, num_samples: int) -> jax.Array:
    """``floor(M w_i)`` deterministic copies, the remainder drawn multinomially."""
    weights = normalized_weights(log_weights)
    indices = _residual_slots(rng_key, weights, num_samples, num_samples)
    return _identity_if_degenerate(indices, log_weights, num_samples)


def _residual_slots(
    rng_key: jax.Array, weights: jax.Array, count: jax.Array | int, num_slots: int
) -> jax.Array:
    """Residual resampling of ``count`` offspring laid out in ``num_slots >= count`` slots:
    ``floor(K w_i)`` copies of particle i (by cumulative count), then the
    ``K − Σ floor(K w_i)`` remaining slots drawn ∝ ``K w_i − floor(K w_i)``; slots past K
    hold further draws that the caller ignores."""
    size = weights.shape[0]
    copies = jnp.floor(count * weights).astype(jnp.int32)
    remainder = count - copies.sum()
    residual_weights = count * weights - copies
    slots = jnp.arange(num_slots)
    deterministic = jnp.clip(jnp.searchsorted(jnp.cumsum(copies), slots, side="right"), 0, size - 1)
    has_residual = residual_weights.sum() > 0
    logits = jnp.where(has_residual, jnp.log(jnp.maximum(residual_weights, 0.0)), 0.0)
    random = jax.random.categorical(rng_key, logits, shape=(num_slots,))
    return jnp.where(slots - (count - remainder) >= 0, random, deterministic)


def _first(indices: jax.Array, count: jax.Array) -> jax.Array:
    """``indices`` in the first ``count`` slots, each other slot its own index."""
    slots = jnp.arange(indices.shape[0])
    return jnp.where(slots < count, indices, slots)


def _multinomial_active(rng_key: jax.Array, log_weights: jax.Array, count: jax.Array) -> jax.Array:
    # K iid draws from Categorical(w): the first K of N iid uniforms.
    points = jax.random.uniform(rng_key, log_weights.shape)
    return _search(normalized_weights(log_weights), points)


def _stratified_active(rng_key: jax.Array, log_weights: jax.Array, count: jax.Array) -> jax.Array:
    # Slot k < K: one uniform in the stratum [k/K, (k+1)/K).
    size = log_weights.shape[0]
    points = (jnp.arange(size) + jax.random.uniform(rng_key, (size,))) / count
    return _search(normalized_weights(log_weights), points)


def _systematic_active(rng_key: jax.Array, log_weights: jax.Array, count: jax.Array) -> jax.Array:
    # Slot k < K: (k + u) / K with one shared u.
    size = log_weights.shape[0]
    points = (jnp.arange(size) + jax.random.uniform(rng_key, ())) / count
    return _search(normalized_weights(log_weights), points)


def _residual_active(rng_key: jax.Array, log_weights: jax.Array, count: jax.Array) -> jax.Array:
    # floor(K w_i) copies of particle i, then K − Σ floor(K w_i) draws ∝ K w_i − floor(K w_i).
    weights = normalized_weights(log_weights)
    return _residual_slots(rng_key, weights, count, weights.shape[0])


_ACTIVE: dict[Callable[..., jax.Array], Callable[..., jax.Array]] = {
    multinomial: _multinomial_active,
    stratified: _stratified_active,
    systematic: _systematic_active,
    residual: _residual_active,
}


def padded_resampler(name_or_fn: str | Resampler) -> Callable[..., jax.Array] | None:
    """The scheme's draw over a padded particle axis (see :func:`resample_active`), or None
    for a scheme that has none (a custom resampler: its caller compiles per ``K``)."""
    try:
        return _ACTIVE.get(get_resampler(name_or_fn))
    except ValueError:
        return None


def resample_active(
    name_or_fn: str | Resampler, rng_key: jax.Array, log_weights: jax.Array, count: jax.Array
) -> jax.Array:
    """``[N]`` ancestors of a padded particle axis whose first ``count = K`` particles are
    active (``count`` a traced int; the others have log-weight −inf).

    Slot ``k < K`` gets the k-th of the ``K`` ancestors the scheme draws for ``K`` samples
    from ``w = softmax(log_weights)`` (which is zero beyond ``K``, so no inactive particle
    is ever an ancestor): the same law as the unpadded scheme with ``K`` particles (the same
    draws for multinomial, stratified and systematic when ``jax_threefry_partitionable``
    makes the first K of N uniforms the K uniforms; residual's categorical draw differs).
    Slots ``k >= K`` are their own ancestors; every weight −inf
    gives the identity. Only the built-in schemes (:func:`padded_resampler`) are accepted.
    """
    draw = padded_resampler(name_or_fn)
    if draw is None:
        raise ValueError(f"resampling scheme {name_or_fn!r} has no padded (active-count) form")
    indices = draw(rng_key, log_weights, count)
    indices = _identity_if_degenerate(indices, log_weights, log_weights.shape[0])
    return _first(indices, count).astype(jnp.int32)


RESAMPLERS: dict[str, Callable[..., jax.Array]] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def get_resampler(name_or_fn: str | Resampler) -> Resampler:
    """Look a resampler up by name, or pass a callable through."""
    if callable(name_or_fn):
        return name_or_fn
    try:
        return RESAMPLERS[name_or_fn]
    except KeyError:
        raise ValueError(
            f"unknown resampling scheme {name_or_fn!r}; choose one of {sorted(RESAMPLERS)}"
        ) from None
