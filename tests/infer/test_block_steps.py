"""Block-level steps: resampling only every k tokens keeps SMC exact (unbiased Ẑ)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmppl
from tests.fixtures import TARGETS
from tests.infer.test_automaton_potentials import PROGRAM
from tests.statistical import assert_within_standard_errors, mean_and_standard_error

NUM_RUNS = 400


def c_twist(inputs):
    """A fixed twist favouring "c" (id 4): log ψ = 0.4 · #c in the prefix + 0.5 · 1[v = c]."""
    count = jnp.sum(inputs.tokens == 4, axis=1).astype(jnp.float32)
    bonus = jnp.where(jnp.arange(5) == 4, 0.5, 0.0)
    return (0.4 * count[:, None] + bonus[None, :]).astype(jnp.float32)


CASES = {
    # A constraint (its automaton state carried across blocks) under SMC, and a soft final
    # factor under twisted SMC.
    "regex_smc": (PROGRAM, lambda p: lmppl.infer.SMC(p, 4, ess_threshold=1.0, resample_every=2)),
    "soft_factor_twisted": (
        TARGETS["soft_factor"][0],
        lambda p: lmppl.infer.TwistedSMC(p, 4, twists={"s": c_twist}, resample_every=2),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_level_smc_is_unbiased(case):
    """E[Ẑ] = Z with resampling only at t = 2 (T = 3 or 4)."""
    program, make = CASES[case]
    log_z = float(lmppl.infer.Exact(program).run(None).log_marginal)
    sampler = make(program)
    result = sampler.run(jax.random.key(0))
    steps = np.asarray(result.resampled).shape[0]
    expected = [t > 0 and t % 2 == 0 for t in range(steps)]
    np.testing.assert_array_equal(np.asarray(result.resampled), expected)
    estimates = sampler.log_marginals(jax.random.key(9), NUM_RUNS)
    ratios = np.exp(np.asarray(estimates, np.float64) - log_z)
    assert mean_and_standard_error(ratios)[1] > 0
    assert_within_standard_errors(ratios, 1.0, k=4)


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_block_size_must_be_a_positive_integer(every):
    with pytest.raises(ValueError, match="resample_every must be a positive integer"):
        lmppl.infer.SMC(PROGRAM, 4, resample_every=every)
