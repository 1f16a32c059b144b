"""Exactness through real KV-cached transformers (random tiny Llama / GPT-2 / GPT-Neo).

The table LM's cache is only a length; here resampling must gather real key/value rows,
prompts are prefilled once and broadcast, and the observed continuation is scored against
a prompt that contains the sampled sequence.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import lmppl
from lmppl.lm.random_init import random_lm
from tests.statistical import assert_within_standard_errors

ARCHITECTURES = ["llama", "gpt2", "gpt_neo"]
NUM_RUNS = 300


def infilling_program(lm):
    def program(ending):
        s = numpyro.sample("s", lmppl.LM(lm, "ab", 3))
        numpyro.sample(
            "ending", lmppl.LM(lm, lmppl.concat("ab", s), 2, stop_at_eos=False), obs=ending
        )
        numpyro.factor("prefer_c", 0.8 * jnp.sum(s == 4))

    return program


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_smc_is_unbiased_on_a_transformer(architecture):
    lm = random_lm(architecture, seed=3)
    program = infilling_program(lm)
    ending = jnp.array([3, 5], jnp.int32)
    exact = lmppl.infer.Exact(program).run(None, ending)
    sampler = lmppl.infer.SMC(program, 8, ess_threshold=1.0)
    estimates = np.asarray(sampler.log_marginals(jax.random.key(0), NUM_RUNS, ending), np.float64)
    ratios = np.exp(estimates - float(exact.log_marginal))
    assert ratios.size == NUM_RUNS
    assert_within_standard_errors(ratios, 1.0, k=4)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_optimal_twist_is_exact_on_a_transformer(architecture):
    lm = random_lm(architecture, seed=4)
    program = infilling_program(lm)
    ending = jnp.array([2, 4], jnp.int32)
    exact = lmppl.infer.Exact(program)
    log_z = float(exact.run(None, ending).log_marginal)
    twist = exact.optimal_twist(ending)
    sampler = lmppl.infer.TwistedSMC(program, 4, twists={"s": twist})
    np.testing.assert_allclose(
        np.asarray(sampler.log_marginals(jax.random.key(1), 8, ending)), log_z, atol=5e-5
    )


def test_resampled_particles_match_sigma_on_a_transformer():
    """Frequencies of resampled SMC draws match σ within Monte Carlo error."""
    lm = random_lm("llama", seed=5)
    program = infilling_program(lm)
    ending = jnp.array([3, 5], jnp.int32)
    exact = lmppl.infer.Exact(program).run(None, ending)
    target = {
        tuple(s): float(w)
        for s, w in zip(
            np.asarray(exact.samples["s"]).tolist(), np.asarray(exact.weights), strict=True
        )
    }
    result = lmppl.infer.SMC(program, 4096, ess_threshold=1.0).run(jax.random.key(2), ending)
    draws = result.resample(jax.random.key(3))["s"]
    counts: dict = {}
    for row in np.asarray(draws).tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    top = sorted(target, key=target.get, reverse=True)[:5]
    n = draws.shape[0]
    for seq in top:
        p = target[seq]
        # SMC draws are correlated through resampling: allow 6 binomial standard errors.
        assert_within_standard_errors(
            counts.get(seq, 0) / n,
            p,
            k=6,
            standard_error=np.sqrt(p * (1 - p) / n),
            atol=2e-3,
            context=f"frequency of {seq}",
        )
