"""The layer loop compiles one block body: program size does not grow with depth.

Every network applies its blocks with ``jax.lax.scan`` over parameters stacked ``[L, ...]``
(:class:`lmppl.lm.layers.LayerStack`), so the lowered program of a 2-layer and an 8-layer
model have the same operations (only the stacked shapes differ). An unrolled loop would
have about four times as many. Heterogeneous stacks (Gemma's and GPT-Neo's alternating
local/global layers) scan a per-layer flag and must stay depth-independent too.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmppl.lm import truncated
from lmppl.lm.layers import LayerStack, local_layer_flags
from lmppl.lm.llama import LlamaBlock
from lmppl.lm.random_init import random_lm

OPERATION = re.compile(r"=\s*\"?(stablehlo|chlo)\.[a-z_]+")


def operation_count(architecture: str, num_layers: int, steps: int) -> int:
    """Operations in the lowered StableHLO of one call on ``steps`` tokens."""
    lm = random_lm(architecture, num_layers=num_layers)
    tokens = jnp.ones((2, steps), jnp.int32)
    text = jax.jit(lm.apply).lower(lm.params, tokens, lm.init_cache(2, 8)).as_text()
    return sum(1 for line in text.splitlines() if OPERATION.search(line))


@pytest.mark.parametrize("architecture", ["llama", "gemma2", "gpt_neo"])
@pytest.mark.parametrize("steps", [1, 3])
def test_program_size_does_not_grow_with_depth(architecture, steps):
    shallow = operation_count(architecture, 2, steps)
    deep = operation_count(architecture, 8, steps)
    assert shallow > 20  # the pattern does count operations
    assert deep == shallow, f"{architecture}: {shallow} ops at 2 layers, {deep} at 8"


def test_parameters_and_cache_are_stacked():
    lm = random_lm("llama", num_layers=3)
    stack = lm.network().layers
    assert isinstance(stack, LayerStack) and stack.num_layers == 3
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(lm.params["layers"]))
    cache = lm.init_cache(5, 8)
    assert cache.keys.shape == (5, 3, 8, lm.config.num_kv_heads, lm.config.head_dim)


def test_layer_flags_are_static_for_uniform_stacks():
    assert local_layer_flags(random_lm("llama", num_layers=4).config) is False
    flags = local_layer_flags(random_lm("gemma2", num_layers=4).config)
    np.testing.assert_array_equal(flags, [True, False, True, False])


def test_truncated_stack_equals_its_first_layers():
    """Layer l of the stack is the l-th block: truncating to k layers gives the same logits
    as a model built with k layers from the same named tensors."""
    deep = random_lm("gemma3", num_layers=4, seed=3)
    shallow = random_lm("gemma3", num_layers=2, seed=3)  # same tensors by name
    tokens = jnp.asarray([[1, 2, 3, 4], [2, 3, 4, 5]], jnp.int32)
    cut = truncated(deep, 2)
    expected = shallow.apply(shallow.params, tokens, shallow.init_cache(2, 8)).logits
    actual = cut.apply(cut.params, tokens, cut.init_cache(2, 8)).logits
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


def test_blocks_of_different_structure_are_refused():
    one = random_lm("llama", num_layers=1).config
    other = one.replace(qk_norm=True)

    def source(name, shape):
        return jnp.ones(shape, jnp.float32)

    with pytest.raises(ValueError, match="block 1 differs"):
        LayerStack.from_blocks(
            [LlamaBlock(one, source, "model.layers.0"), LlamaBlock(other, source, "model.layers.1")]
        )
