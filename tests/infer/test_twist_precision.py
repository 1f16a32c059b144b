"""Twisted SMC is invariant to a per-step constant shift of log ψ, up to float32 (issue #15).

In exact arithmetic adding ``c_t`` to every ``log ψ_t`` changes neither the proposal nor
Ẑ. In float32 the weights can only be as exact as the twist's values are resolved
(``|log ψ| · 2⁻²⁴``): below that scale log Ẑ must not move (same key, same samples), and
above it the result must say so (a warning), never a silently wrong number; NaN / +inf
twist values are refused.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import lmppl
from lmppl.infer.backends import twist_rounding_error

STEPS, PARTICLES, RUNS = 10, 32, 8


@pytest.fixture(scope="module")
def setting():
    lm = lmppl.load("stories260k")

    def program():
        story = numpyro.sample(
            "story", lmppl.LM(lm, "Once upon a time", max_new_tokens=STEPS, stop_at_eos=False)
        )
        numpyro.factor("sevens", -2.0 * jnp.sum(story % 7 == 0))

    weights = 0.05 * jax.random.normal(jax.random.key(3), (lm.hidden_size, lm.vocab_size))

    def log_z(shift: float):
        def twist(inputs):
            level = shift * (inputs.step + 1).astype(jnp.float32)
            return inputs.hidden.astype(jnp.float32) @ weights + level

        sampler = lmppl.infer.TwistedSMC(program, PARTICLES, twists={"story": twist})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = np.asarray(sampler.log_marginals(jax.random.key(0), RUNS), np.float64)
        messages = [str(w.message) for w in caught if "float32 resolves" in str(w.message)]
        return values, messages

    return program, log_z


@pytest.mark.slow
def test_log_z_is_unchanged_by_shifts_float32_resolves(setting):
    _, log_z = setting
    base, quiet = log_z(0.0)
    assert not quiet
    for shift in (1e2, 1e3):  # |log ψ| up to 1e3 and 1e4 over T = 10 steps
        shifted, messages = log_z(shift)
        difference = np.abs(shifted - base)
        # Same key, same samples: only rounding separates the runs. (A run may take
        # another path when rounding flips one token draw; the median ignores such runs.)
        assert np.median(difference) < 0.01, (shift, difference)
        assert twist_rounding_error(10 * shift, STEPS) < 0.01
        assert not messages, messages


@pytest.mark.slow
def test_a_shift_float32_cannot_resolve_is_flagged(setting):
    _, log_z = setting
    _, messages = log_z(1e5)  # |log ψ| up to 1e6: float32 resolves it to ±0.06
    assert messages and "may be off by" in messages[0]


@pytest.mark.slow
def test_non_finite_twist_values_are_refused(setting):
    program, _ = setting

    def broken(inputs):
        values = jnp.zeros((inputs.hidden.shape[0], 512), jnp.float32)
        return jnp.where(inputs.step == 3, jnp.inf, values)

    sampler = lmppl.infer.TwistedSMC(program, 4, twists={"story": broken})
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        sampler.run(jax.random.key(0))
