"""Scanned blocks (``lmppl.lm.scanned``) compile one block body and agree with the unrolled ones.

``scanned(lm)`` applies the blocks with ``jax.lax.scan`` over parameters stacked ``[L, ...]``
(:class:`lmppl.lm.layers.LayerStack`), so the lowered program of a 2-layer and an 8-layer
model have the same operations (only the stacked shapes differ), where the unrolled loop
has about four times as many. Heterogeneous stacks (Gemma's and GPT-Neo's alternating
local/global layers, Gemma 3's local RoPE base) scan a per-layer flag and must stay
depth-independent and exact. Agreement with the unrolled model is float32 round-off: the
same operations, compiled in a loop body instead of straight-line code.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmppl.lm import scanned, truncated
from lmppl.lm.base import broadcast_cache, reorder_cache
from lmppl.lm.layers import LayerStack, local_layer_flags
from lmppl.lm.llama import LlamaBlock
from lmppl.lm.random_init import FAMILIES, random_lm

ROUND_OFF = 1e-5  # same computation, different XLA program: float32 round-off only
OPERATION = re.compile(r"=\s*\"?(stablehlo|chlo)\.[a-z_]+")
ARCHITECTURES = ["llama", "gpt2", "gpt_neo", *FAMILIES]


def operation_count(lm, steps: int) -> int:
    """Operations in the lowered StableHLO of one call on ``steps`` tokens."""
    tokens = jnp.ones((2, steps), jnp.int32)
    text = jax.jit(lm.apply).lower(lm.params, tokens, lm.init_cache(2, 8)).as_text()
    return sum(1 for line in text.splitlines() if OPERATION.search(line))


@pytest.mark.parametrize("architecture", ["llama", "gemma3", "gpt_neo"])
@pytest.mark.parametrize("steps", [1, 3])
def test_scanned_program_size_does_not_grow_with_depth(architecture, steps):
    shallow = operation_count(scanned(random_lm(architecture, num_layers=2)), steps)
    deep = operation_count(scanned(random_lm(architecture, num_layers=8)), steps)
    assert shallow > 20  # the pattern does count operations
    assert deep == shallow, f"{architecture}: {shallow} ops at 2 layers, {deep} at 8"
    unrolled = operation_count(random_lm(architecture, num_layers=8), steps)
    assert unrolled > 2 * deep  # what the scan saves


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_scanned_logits_equal_unrolled_logits(architecture):
    """Right-padded prefill of rows of different lengths, then three decoding steps."""
    lm = random_lm(architecture, num_layers=4, context_length=16, seed=1)
    stacked = scanned(lm)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, lm.vocab_size, (3, 6)), jnp.int32)
    counts = jnp.asarray([6, 2, 4], jnp.int32)
    steps = jnp.asarray(rng.integers(0, lm.vocab_size, (3, 3)), jnp.int32)
    outputs = []
    for model in (lm, stacked):
        apply = jax.jit(model.apply)
        output = apply(model.params, prompt, model.init_cache(3, 12), counts)
        logits, cache = [output.logits[row, : int(n)] for row, n in enumerate(counts)], output.cache
        for step in range(steps.shape[1]):
            output = apply(model.params, steps[:, step : step + 1], cache)
            logits.append(output.logits[:, 0])
            cache = output.cache
        outputs.append(np.concatenate([np.asarray(x).reshape(-1) for x in logits]))
    scale = np.abs(outputs[0]).max()
    assert scale > 0.1
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=0, atol=ROUND_OFF * max(scale, 1.0))


def test_scanned_parameters_and_cache_are_stacked():
    lm = scanned(random_lm("llama", num_layers=3))
    stack = lm.network().layers
    assert isinstance(stack, LayerStack) and stack.num_layers == 3
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(lm.params["layers"]))
    cache = lm.init_cache(5, 8)
    assert cache.keys.shape == (5, 3, 8, lm.config.num_kv_heads, lm.config.head_dim)
    assert all(leaf.shape[0] == 5 for leaf in jax.tree.leaves(cache))
    assert scanned(lm) is lm


def test_scanned_cache_reorders_and_broadcasts():
    """The stacked cache keeps the particle axis leading: resampling and broadcasting it
    continue the chosen rows exactly as for the unrolled model."""
    lm = random_lm("gemma2", num_layers=4, seed=2)
    stacked = scanned(lm)
    prompt = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    ancestors = jnp.asarray([0, 0, 0], jnp.int32)
    continuation = jnp.asarray([[2], [3], [4]], jnp.int32)
    results = []
    for model in (lm, stacked):
        cache = model.apply(model.params, prompt, model.init_cache(1, 8)).cache
        cache = reorder_cache(broadcast_cache(cache, 3), ancestors)
        results.append(np.asarray(model.apply(model.params, continuation, cache).logits))
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=ROUND_OFF)


def test_layer_flags_are_static_for_uniform_stacks():
    assert local_layer_flags(random_lm("llama", num_layers=4).config) is False
    flags = local_layer_flags(random_lm("gemma2", num_layers=4).config)
    np.testing.assert_array_equal(flags, [True, False, True, False])


def test_truncated_scanned_stack_equals_its_first_layers():
    """Layer l of the stack is the l-th block: truncating a scanned model to k layers gives
    the same logits as the scanned model built with k layers from the same named tensors."""
    deep = scanned(random_lm("gemma3", num_layers=4, seed=3))
    shallow = scanned(random_lm("gemma3", num_layers=2, seed=3))  # same tensors by name
    tokens = jnp.asarray([[1, 2, 3, 4], [2, 3, 4, 5]], jnp.int32)
    cut = truncated(deep, 2)
    expected = shallow.apply(shallow.params, tokens, shallow.init_cache(2, 8)).logits
    actual = cut.apply(cut.params, tokens, cut.init_cache(2, 8)).logits
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


def test_gradients_flow_through_the_scan():
    """TNT and twist training differentiate the log-likelihood through the blocks."""
    lm = random_lm("llama", num_layers=3, seed=4)
    stacked = scanned(lm)
    tokens = jnp.asarray([[1, 2, 3, 4, 5]], jnp.int32)

    def log_likelihood(params, model):
        logits = model.apply(params, tokens[:, :-1], model.init_cache(1, 8)).logits
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).sum()

    unrolled = jax.grad(log_likelihood)(lm.params, lm)
    stacked_grad = jax.grad(log_likelihood)(stacked.params, stacked)
    first = unrolled["layers"][1]["mlp"]["down_proj"]["kernel"][...]
    second = stacked_grad["layers"]["block"]["mlp"]["down_proj"]["kernel"][...][1]
    assert np.abs(np.asarray(first)).max() > 1e-3
    np.testing.assert_allclose(np.asarray(second), np.asarray(first), rtol=0, atol=ROUND_OFF)


def test_blocks_of_different_structure_are_refused():
    one = random_lm("llama", num_layers=1).config
    other = one.replace(qk_norm=True)

    def source(name, shape):
        return jnp.ones(shape, jnp.float32)

    with pytest.raises(ValueError, match="block 1 differs"):
        LayerStack.from_blocks(
            [LlamaBlock(one, source, "model.layers.0"), LlamaBlock(other, source, "model.layers.1")]
        )


def test_smc_on_a_scanned_model_matches_the_unrolled_model():
    """An SMC sweep resamples (reorders) the stacked cache at every step: same key, same
    program, same log Ẑ as with the unrolled model's per-layer cache."""
    import numpyro

    import lmppl

    lm = random_lm("gemma2", num_layers=4, context_length=16, seed=5)

    def program(model):
        story = numpyro.sample(
            "story", lmppl.LM(model, prompt="ab", max_new_tokens=5, stop_at_eos=False)
        )
        numpyro.factor("penalty", -0.5 * jnp.sum(story == 3))

    smc = lmppl.infer.SMC(program, num_particles=16, ess_threshold=1.0)
    unrolled = smc.run(jax.random.key(0), lm)
    stacked = smc.run(jax.random.key(0), scanned(lm))
    assert float(unrolled.log_marginal) < -0.01  # the factor bites
    np.testing.assert_allclose(
        float(stacked.log_marginal), float(unrolled.log_marginal), rtol=0, atol=ROUND_OFF
    )
