"""The particle axis sharded over 4 (virtual CPU) devices gives the same results as one."""

import textwrap

from tests.devices import run_on_virtual_devices

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, numpyro
    import lmppl
    assert jax.device_count() == 4, jax.devices()
    lm = lmppl.table_lm(3, context_length=12, seed=1)

    def program(ending):
        s = numpyro.sample("s", lmppl.LM(lm, "a", 3, stop_at_eos=False))
        numpyro.sample("e", lmppl.LM(lm, lmppl.concat("a", s), 2, stop_at_eos=False), obs=ending)

    ending = jnp.array([4, 2], jnp.int32)
    mesh = jax.make_mesh((4,), ("particles",))
    single = lmppl.infer.SMC(program, 64, ess_threshold=1.0).run(jax.random.key(0), ending)
    sharded = lmppl.infer.SMC(program, 64, ess_threshold=1.0, mesh=mesh).run(jax.random.key(0), ending)
    np.testing.assert_array_equal(np.asarray(single.samples["s"]), np.asarray(sharded.samples["s"]))
    np.testing.assert_allclose(float(single.log_marginal), float(sharded.log_marginal), rtol=1e-5)
    assert len(sharded.log_weights.sharding.device_set) == 4, sharded.log_weights.sharding
    print("SHARDED_OK", float(sharded.log_marginal))
    """
)


def test_particle_sharding_matches_single_device():
    run_on_virtual_devices(SCRIPT, 4, "SHARDED_OK")
