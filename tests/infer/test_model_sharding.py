"""A model split tensor-parallel over a "model" mesh axis (``lmppl.lm.shard``) gives the
same SMC results as on one device, with its parameters and KV cache really split.

One subprocess with 8 virtual CPU devices runs a tiny random Llama on a (2 particles,
4 model) mesh and a tiny random GPT-2 on a (1, 8) model-only mesh, each against the same
unsharded model on one device, checks that parameters and KV caches (also a scanned
stack's) are split, and the one-line error for heads that do not divide.
"""

import textwrap

import jax
import pytest

import lmppl
from tests.devices import run_on_virtual_devices

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, numpyro
    import lmppl
    assert jax.device_count() == 8, jax.devices()
    lmppl.enable_compilation_cache()  # as the test session does (tests/conftest.py)

    def check(lm, mesh_shape, q_name):
        mesh = jax.make_mesh(mesh_shape, ("particles", "model"))
        sharded = lmppl.lm.shard(lm, mesh)

        def program(lm):
            def model(ending):
                s = numpyro.sample("s", lmppl.LM(lm, "ab", 3, stop_at_eos=False))
                numpyro.factor("f", jnp.sum(jnp.where(s == ending, 1.5, 0.0)))
            return model

        ending = jnp.array([4, 2, 5], jnp.int32)
        one = lmppl.infer.SMC(program(lm), 16, ess_threshold=1.0).run(jax.random.key(0), ending)
        split = lmppl.infer.SMC(program(sharded), 16, ess_threshold=1.0, mesh=mesh).run(
            jax.random.key(0), ending
        )
        np.testing.assert_array_equal(np.asarray(one.samples["s"]), np.asarray(split.samples["s"]))
        # Row-split products (o_proj, down_proj, GPT-2's c_attn / c_proj) may add their
        # partial sums in another order than one device: in general the two agree to float32
        # rounding (for these tiny models log Z came out identical). Same rtol as the
        # particle-sharding test.
        np.testing.assert_allclose(float(one.log_marginal), float(split.log_marginal), rtol=1e-5)

        # The parameters are split: a query projection's columns (its heads) over "model".
        n = mesh.shape["model"]
        kernel = q_name(sharded.params)
        assert "model" in tuple(kernel.sharding.spec), kernel.sharding.spec
        assert len(kernel.sharding.device_set) == 8, kernel.sharding
        full = kernel.shape
        local = kernel.addressable_shards[0].data.shape
        assert local[-1] * n == full[-1] and local[:-1] == full[:-1], (local, full)
        # And so is the cache after a step: keys [B, L, H_kv, D] over their heads.
        cache = sharded.init_cache(2, 8)
        step = jax.jit(lambda p, c: sharded.apply(p, jnp.zeros((2, 1), jnp.int32), c).cache)
        keys = step(sharded.params, cache).keys[0]
        assert keys.addressable_shards[0].data.shape[2] * n == keys.shape[2], keys.sharding
        return float(split.log_marginal)

    llama = lmppl.random_lm(
        "llama", symbols=6, hidden_size=32, num_layers=1, num_heads=8, num_kv_heads=4,
        context_length=8, scale=2.0, seed=1,
    )
    gpt2 = lmppl.random_lm(
        "gpt2", symbols=6, hidden_size=32, num_layers=1, num_heads=8, context_length=8,
        scale=2.0, seed=2,
    )
    a = check(llama, (2, 4), lambda p: p["layers"][0]["self_attn"]["q_proj"]["kernel"][...])
    b = check(gpt2, (1, 8), lambda p: p["h"][0]["mlp"]["c_fc"]["kernel"][...])

    # A scanned stack: one cache buffer [B, layers, L, H_kv, D], split over H_kv.
    mesh = jax.make_mesh((2, 4), ("particles", "model"))
    scanned = lmppl.lm.shard(lmppl.lm.scanned(llama), mesh)
    step = jax.jit(lambda p, c: scanned.apply(p, jnp.zeros((2, 1), jnp.int32), c).cache)
    keys = step(scanned.params, scanned.init_cache(2, 8)).keys
    assert keys.ndim == 5 and keys.addressable_shards[0].data.shape[3] * 4 == keys.shape[3]

    try:
        lmppl.lm.shard(llama, jax.make_mesh((1, 8), ("particles", "model")))
    except ValueError as error:
        assert str(error) == (
            "num_kv_heads=4 is not divisible by mesh axis 'model' of size 8"
        ), error
    else:
        raise AssertionError("no error for 4 key/value heads over 8 devices")
    print("MODEL_SHARDED_OK", a, b)
    """
)


def test_model_sharding_matches_single_device():
    run_on_virtual_devices(SCRIPT, 8, "MODEL_SHARDED_OK")


def test_shard_refuses_what_it_cannot_split():
    mesh = jax.make_mesh((1,), ("model",))
    with pytest.raises(ValueError, match="model sharding supports the llama, gemma"):
        lmppl.lm.shard(lmppl.table_lm(3, seed=1), mesh)
    with pytest.raises(ValueError, match="the mesh has no axis 'tensor'"):
        lmppl.lm.shard(lmppl.random_lm("llama"), mesh, model_axis="tensor")


def test_scanned_stacks_keep_their_layer_axis_whole():
    """A scanned stack's parameters ``[layers, ...]`` are split like one layer's, the layer
    axis never (its cache is checked on 8 devices in the script above)."""
    lm = lmppl.lm.scanned(lmppl.random_lm("llama"))
    mesh = lmppl.lm.sharding.auto_mesh(jax.make_mesh((1,), ("model",)))
    layout = lmppl.lm.ModelSharding(mesh, "model")
    specs = {
        jax.tree_util.keystr(path, simple=True, separator="/"): spec.spec
        for path, spec in jax.tree_util.tree_flatten_with_path(
            layout.parameter_shardings(lm.params)
        )[0]
    }
    P = jax.sharding.PartitionSpec
    assert specs["layers/block/self_attn/q_proj/kernel/value"] == P(None, None, "model")
    assert specs["layers/block/self_attn/o_proj/kernel/value"] == P(None, "model", None)
    assert specs["layers/block/mlp/up_proj/kernel/value"] == P(None, None, "model")
    assert specs["layers/block/mlp/down_proj/kernel/value"] == P(None, "model", None)
    assert specs["layers/block/input_layernorm/weight/value"] == P()
    assert specs["embed_tokens/table/value"] == P()
