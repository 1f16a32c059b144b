"""The KV cache of the transformer networks under SMC's two cache moves.

``broadcast_cache`` (prefill a prompt once, copy it to N particles) and ``reorder_cache``
(resampling) must leave every row's later logits exactly as if that row's history had been
fed directly. Equality is exact up to float32 summation order, so the bound is the same
round-off bound as the parity tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmppl.lm.base import KVCache, broadcast_cache, reorder_cache

ROUND_OFF = 1e-5  # same computation, possibly different XLA fusion: float32 round-off only
CACHE_LENGTH = 12
CASES = ["llama_gqa_untied", "gpt_neo"]


def random_tokens(seed: int, shape: tuple[int, ...], vocab: int) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@pytest.mark.parametrize("case", CASES)
def test_init_cache_layout(get_twin, case):
    lm = get_twin(case).lm
    config = lm.config
    cache = lm.init_cache(3, CACHE_LENGTH)
    assert isinstance(cache, KVCache)
    assert len(cache.keys) == len(cache.values) == config.num_layers
    expected = (3, CACHE_LENGTH, config.num_kv_heads, config.head_dim)
    assert all(leaf.shape == expected for leaf in (*cache.keys, *cache.values))
    assert cache.length.shape == (3,) and cache.length.dtype == jnp.int32
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(cache))


@pytest.mark.parametrize("case", CASES)
def test_broadcast_prefill_equals_prefilling_every_row(get_twin, case):
    lm = get_twin(case).lm
    apply = jax.jit(lm.apply)
    num_particles = 4
    prompt = random_tokens(0, (1, 5), lm.vocab_size)
    continuations = random_tokens(1, (num_particles, 4), lm.vocab_size)

    one_row = apply(lm.params, prompt, lm.init_cache(1, CACHE_LENGTH)).cache
    broadcast = broadcast_cache(one_row, num_particles)
    every_row = apply(
        lm.params, jnp.tile(prompt, (num_particles, 1)), lm.init_cache(num_particles, CACHE_LENGTH)
    ).cache
    for step in range(continuations.shape[1]):
        tokens = continuations[:, step : step + 1]
        from_broadcast = apply(lm.params, tokens, broadcast)
        from_every_row = apply(lm.params, tokens, every_row)
        difference = np.abs(np.asarray(from_broadcast.logits - from_every_row.logits)).max()
        assert difference <= ROUND_OFF, f"{case} step {step}: {difference:.2e}"
        broadcast, every_row = from_broadcast.cache, from_every_row.cache
    np.testing.assert_array_equal(broadcast.length, [5 + continuations.shape[1]] * num_particles)


@pytest.mark.parametrize("case", CASES)
def test_reordered_cache_continues_the_chosen_histories(get_twin, case):
    """Rows with different histories and lengths, resampled, then decoded one more token."""
    lm = get_twin(case).lm
    apply = jax.jit(lm.apply)
    histories = random_tokens(2, (3, 7), lm.vocab_size)
    lengths = jnp.asarray([7, 4, 6], jnp.int32)
    cache = apply(lm.params, histories, lm.init_cache(3, CACHE_LENGTH), lengths).cache
    ancestors = jnp.asarray([2, 0, 2, 1], jnp.int32)
    resampled = reorder_cache(cache, ancestors)
    np.testing.assert_array_equal(resampled.length, lengths[ancestors])

    next_tokens = random_tokens(3, (4, 1), lm.vocab_size)
    after_resampling = apply(lm.params, next_tokens, resampled).logits
    direct = apply(
        lm.params, histories[ancestors], lm.init_cache(4, CACHE_LENGTH), lengths[ancestors]
    ).cache
    direct_logits = apply(lm.params, next_tokens, direct).logits
    difference = np.abs(np.asarray(after_resampling - direct_logits)).max()
    assert difference <= ROUND_OFF, f"{case}: {difference:.2e}"


def test_decode_step_is_one_compiled_function_over_a_scan(get_twin):
    """A ``lax.scan`` of single-token steps equals one prefill of the same tokens."""
    twin = get_twin("gpt_neo")
    lm = twin.lm
    tokens = random_tokens(4, (2, 9), lm.vocab_size)

    @jax.jit
    def decode(params, tokens):
        def step(cache, column):
            output = lm.apply(params, column[:, None], cache)
            return output.cache, output.logits[:, 0]

        cache, logits = jax.lax.scan(step, lm.init_cache(2, CACHE_LENGTH), tokens.T)
        return cache, jnp.swapaxes(logits, 0, 1)

    cache, scanned = decode(lm.params, tokens)
    prefilled = jax.jit(lm.apply)(lm.params, tokens, lm.init_cache(2, CACHE_LENGTH)).logits
    assert np.abs(np.asarray(scanned - prefilled)).max() <= ROUND_OFF
    np.testing.assert_array_equal(cache.length, [9, 9])
