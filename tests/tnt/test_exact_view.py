"""The exact view: the minimal targeted update p_o(s) 1[no unwanted] / Z as a program."""

import jax
import jax.numpy as jnp
import numpy as np

import lmppl
from lmppl import tnt
from tests.fixtures import all_sequences
from tests.tnt.tnt_common import LM, PROMPT, UNWANTED

STEPS = 4


def brute_force():
    """Every sequence, its log p_o (−inf off the support) and whether it is clean."""
    sequences = all_sequences(LM.vocab_size, STEPS)
    log_p = np.asarray(lmppl.LM(LM, PROMPT, STEPS).log_prob(jnp.asarray(sequences)), np.float64)
    clean = ~tnt.contains_unwanted(sequences, {UNWANTED}, eos_token_id=1)
    return sequences, log_p, clean


def test_exact_enumeration_is_the_conditioned_old_model():
    sequences, log_p, clean = brute_force()
    p = np.exp(log_p)
    assert abs(p.sum() - 1) < 1e-5
    z = p[clean].sum()
    assert 0.2 < z < 0.95  # the behaviour is neither rare nor certain on this model
    for unwanted in ({UNWANTED}, lambda s: jnp.any((s == UNWANTED) & (jnp.cumsum(s == 1) == 0))):
        program = tnt.minimal_update_program(LM, PROMPT, STEPS, unwanted)
        exact = lmppl.infer.Exact(program).run(None)
        np.testing.assert_allclose(float(exact.log_marginal), np.log(z), rtol=1e-5)
        got = {
            tuple(s): w
            for s, w in zip(
                np.asarray(exact.samples["story"]).tolist(),
                np.asarray(exact.weights, np.float64),
                strict=True,
            )
        }
        for s, lp, ok in zip(sequences.tolist(), log_p, clean, strict=True):
            expected = np.exp(lp) / z if ok else 0.0
            assert abs(got.get(tuple(s), 0.0) - expected) < 1e-6


def test_smc_estimates_log_z_and_prevalence_within_monte_carlo_error():
    _, log_p, clean = brute_force()
    z = np.exp(log_p)[clean].sum()
    estimate = tnt.estimate_minimal_update(
        LM, PROMPT, STEPS, {UNWANTED}, num_particles=32, num_runs=64, rng_key=jax.random.key(3)
    )
    print("exact prevalence", 1 - z, "SMC", estimate.prevalence, "±", estimate.prevalence_se)
    assert estimate.prevalence_se > 0
    assert abs(estimate.prevalence - (1 - z)) < 4 * estimate.prevalence_se
    assert abs(estimate.log_z - np.log(z)) < 4 * estimate.prevalence_se / z
    # SMC's samples of σ never show the behaviour
    assert tnt.prevalence(estimate.samples, {UNWANTED}, eos_token_id=1) == 0.0
