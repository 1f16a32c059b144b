"""NaN potentials and all-zero weights are reported by every entry point of a backend."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import lmppl
from lmppl import potentials
from tests.fixtures import table_lm

LM = table_lm(3, context_length=8, seed=0)


def nan_program():
    s = numpyro.sample("s", lmppl.LM(LM, "a", 2, stop_at_eos=False))
    numpyro.factor("broken", jnp.where(s[0] == 2, jnp.nan, 0.0))


def impossible_program():
    s = numpyro.sample("s", lmppl.LM(LM, "a", 2, stop_at_eos=False))
    numpyro.factor("impossible", potentials.log_indicator(s[0] > 100))


def test_log_marginals_reports_nan_site():
    with pytest.raises(ValueError, match="site 'broken' returned NaN"):
        lmppl.infer.SMC(nan_program, 64).log_marginals(jax.random.key(0), 4)


def test_conditional_log_marginals_reports_nan_site():
    references = jnp.array([[3, 3], [4, 3]], jnp.int32)
    with pytest.raises(ValueError, match="site 'broken' returned NaN"):
        lmppl.infer.SMC(nan_program, 64).conditional_log_marginals(jax.random.key(0), references)


def test_log_marginals_warns_when_every_weight_is_zero():
    with pytest.warns(RuntimeWarning, match="every particle has weight zero"):
        values = lmppl.infer.SMC(impossible_program, 8).log_marginals(jax.random.key(0), 3)
    assert np.isneginf(np.asarray(values)).all()


def test_conditional_reference_outside_the_support_is_an_error():
    """A reference of weight zero cannot be a sample of σ: the upper bound would be void."""
    references = jnp.array([[3, 3]], jnp.int32)
    with pytest.raises(ValueError, match="reference"):
        lmppl.infer.SMC(impossible_program, 4).conditional_log_marginals(
            jax.random.key(0), references
        )


def infinite_program():
    s = numpyro.sample("s", lmppl.LM(LM, "a", 2, stop_at_eos=False))
    numpyro.factor("unbounded", jnp.where(s[0] == 2, jnp.inf, 0.0))


@pytest.mark.parametrize("backend", ["run", "log_marginals"])
def test_a_plus_inf_potential_is_an_error_naming_the_site(backend):
    """+inf would give log Ẑ = inf under a misleading message (issue #15, item 6)."""
    sampler = lmppl.infer.SMC(infinite_program, 64)
    with pytest.raises(ValueError, match="site 'unbounded' returned \\+inf"):
        if backend == "run":
            sampler.run(jax.random.key(0))
        else:
            sampler.log_marginals(jax.random.key(0), 4)
