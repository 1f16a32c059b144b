"""A latent site sampled before the LM site, read by a per-step potential.

Program: ``z ~ Bernoulli(0.5)``, then ``s ~ LM``, with the per-step factor
``m_t(s_<t, v) = exp(z · a[v])``. Each particle carries its own z, so each particle's
step potential must see that particle's z. By enumeration over s for each value of z,

    Z = ½ Z_0 + ½ Z_1,     P(z = 1 | ·) = Z_1 / (Z_0 + Z_1),

with ``Z_z`` the normaliser of the program with z fixed. SMC's unnormalised estimate
``Ẑ · Σ_i W_i 1[z_i = 1]`` is unbiased for ``Z · P(z = 1 | ·)``: its mean over runs
divided by Z is compared with the exact posterior within 4 standard errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import lmppl
from lmppl import potentials
from tests.fixtures import small_lm
from tests.statistical import assert_within_standard_errors

A = jnp.array([0.0, 0.0, -1.5, 0.5, 2.0], jnp.float32)
LM_SMALL = small_lm()
RUNS = 400


def latent_program():
    z = numpyro.sample("z", dist.Bernoulli(0.5))
    s = numpyro.sample("s", lmppl.LM(LM_SMALL, "a", 3, stop_at_eos=False))
    potentials.step_factor("z_weighted", s, lambda prefix, t: z * A)


def fixed(z_value):
    def program():
        s = numpyro.sample("s", lmppl.LM(LM_SMALL, "a", 3, stop_at_eos=False))
        potentials.step_factor("z_weighted", s, lambda prefix, t: z_value * A)

    return float(lmppl.infer.Exact(program).run(None).log_marginal)


@pytest.mark.parametrize("ess_threshold", [1.0, None])
def test_step_potential_reads_each_particles_prefix_latent(ess_threshold):
    log_z0, log_z1 = fixed(0.0), fixed(1.0)
    log_z = float(np.logaddexp(log_z0, log_z1) + np.log(0.5))
    posterior = float(np.exp(log_z1 - np.logaddexp(log_z0, log_z1)))
    sampler = lmppl.infer.SMC(latent_program, 64, ess_threshold=ess_threshold)
    structure, sweep, arrays, twist_params = sampler.compile()
    model_params = structure.model_params()
    keys = jax.random.split(jax.random.key(3), RUNS)
    outputs = jax.vmap(sweep, in_axes=(0, None, None, None, None))(
        keys, model_params, twist_params, arrays, None
    )
    weights = jax.nn.softmax(outputs.log_weights, axis=-1)
    estimates = np.asarray(jnp.sum(weights * outputs.latent_values["z"], axis=-1), np.float64)
    ratios = np.exp(np.asarray(outputs.log_marginal, np.float64) - log_z)
    unnormalised = ratios * estimates  # unbiased for P(z = 1 | ·)
    assert unnormalised.shape == ratios.shape == (RUNS,)
    assert_within_standard_errors(
        unnormalised, posterior, k=4, context=f"self-normalised mean {estimates.mean()}"
    )
    assert_within_standard_errors(ratios, 1.0, k=4)
