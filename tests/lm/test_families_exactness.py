"""Exactness through a new family's KV-cached network (a random tiny Gemma 2).

Gemma 2 is the family furthest from Llama (sandwich norms, soft-capped scores and logits,
sliding windows of 2 on alternate layers), so resampling must gather its cache rows and
prefill-then-broadcast must keep the windows right. The properties are those of
``tests/infer/test_transformer_targets.py``: SMC's Ẑ is unbiased (within 4 Monte Carlo
standard errors of the exact marginal), and SMC with the exact optimal twist returns
log Z in every run. Each takes ~30 s on 2 CPU cores (as the Llama ones do), so they are
marked ``slow``: ``make test-fast`` skips them, CI runs them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import lmppl
from lmppl.lm.random_init import random_lm
from tests.statistical import assert_within_standard_errors

NUM_RUNS = 300


def infilling_program(lm):
    def program(ending):
        s = numpyro.sample("s", lmppl.LM(lm, "ab", 3))
        numpyro.sample(
            "ending", lmppl.LM(lm, lmppl.concat("ab", s), 2, stop_at_eos=False), obs=ending
        )
        numpyro.factor("prefer_c", 0.8 * jnp.sum(s == 4))

    return program


@pytest.mark.slow
def test_smc_is_unbiased_on_gemma2():
    lm = random_lm("gemma2", seed=3)
    program = infilling_program(lm)
    ending = jnp.array([3, 5], jnp.int32)
    exact = lmppl.infer.Exact(program).run(None, ending)
    sampler = lmppl.infer.SMC(program, 8, ess_threshold=1.0)
    estimates = np.asarray(sampler.log_marginals(jax.random.key(0), NUM_RUNS, ending), np.float64)
    ratios = np.exp(estimates - float(exact.log_marginal))
    assert ratios.size == NUM_RUNS
    assert_within_standard_errors(ratios, 1.0, k=4)


@pytest.mark.slow
def test_optimal_twist_is_exact_on_gemma2():
    lm = random_lm("gemma2", seed=4)
    program = infilling_program(lm)
    ending = jnp.array([2, 4], jnp.int32)
    exact = lmppl.infer.Exact(program)
    log_z = float(exact.run(None, ending).log_marginal)
    twist = exact.optimal_twist(ending)
    sampler = lmppl.infer.TwistedSMC(program, 4, twists={"s": twist})
    np.testing.assert_allclose(
        np.asarray(sampler.log_marginals(jax.random.key(1), 8, ending)), log_z, atol=5e-5
    )
