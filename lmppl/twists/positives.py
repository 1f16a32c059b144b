"""Exact positives for contrastive twist learning from a pool of exact samples of σ.

CTL's gradient is ``E_σ[∇ Σ_t log ψ_t] − Σ_t E_{π_t}[∇ log ψ_t]``. When its first term is
estimated from the twisted proposal's own batch, a mode of σ that the proposal misses is
never a positive and is never learned (the twist drops it and twisted SMC returns a log Ẑ
that is precise and wrong). Exact samples of σ (rejection from p0, enumeration, joint
sampling) make the first term unbiased whatever the twist has learned:

    ĝ_σ = (1/N) Σ_i ∇ Σ_t log ψ_t(s^i_1:t),   s^i ~ Uniform(pool),   pool ~ σ i.i.d.

A finite pool of M samples is the empirical measure σ_M; a large twist can overfit to it
(measure on held-out exact samples: ``fit(..., exact_samples=held_out, eval_every=...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pool_sampler"]


def pool_sampler(samples: Any) -> Callable[[jax.Array, int], jax.Array]:
    """``target_sampler`` for :func:`lmppl.twists.fit`: ``n`` draws with replacement from
    a pool of exact samples of σ.

    Args:
      samples: ``[M, T]`` token ids, or an :class:`~lmppl.evaluation.ExactSamples`
        (unconditional: one fixed target for every sample).

    Returns:
      ``f(rng_key, n) -> [n, T]`` int32, jittable.
    """
    conditions = getattr(samples, "conditions", None)
    if conditions is not None:
        raise ValueError(
            "pool_sampler needs exact samples of one target; these were drawn each with its "
            "own condition (joint sampling): give them to fit's args_sampler instead"
        )
    tokens = np.asarray(getattr(samples, "samples", samples))
    if tokens.ndim != 2 or tokens.shape[0] < 1:
        raise ValueError(f"pool_sampler needs [M, T] token ids with M ≥ 1, got {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"pool_sampler needs integer token ids, got dtype {tokens.dtype}")
    pool = jnp.asarray(tokens, jnp.int32)

    def sample(rng_key: jax.Array, n: int) -> jax.Array:
        return pool[jax.random.randint(rng_key, (n,), 0, pool.shape[0])]

    return sample
