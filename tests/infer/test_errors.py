"""Bad input gives one clear error (or a warning), never a deep JAX traceback or NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import lmppl
from lmppl import potentials
from tests.fixtures import table_lm

LM = table_lm(3, context_length=8, seed=0)


def test_program_without_lm_site():
    def program():
        numpyro.sample("x", dist.Normal(0, 1))

    with pytest.raises(ValueError, match="no latent lmppl.LM site"):
        lmppl.infer.SMC(program, 4).run(jax.random.key(0))


def test_nan_potential_names_the_site():
    def program():
        s = numpyro.sample("s", lmppl.LM(LM, "a", 2))
        numpyro.factor("broken", jnp.where(s[0] == 2, jnp.nan, 0.0))

    with pytest.raises(ValueError, match="site 'broken' returned NaN"):
        lmppl.infer.SMC(program, 64).run(jax.random.key(0))


def test_nan_from_host_scorer_names_the_site():
    def program():
        s = numpyro.sample("s", lmppl.LM(LM, "a", 2))
        numpyro.factor(
            "scored", potentials.text(lambda texts: [float("nan")] * len(texts), LM.tokenizer)(s)
        )

    with pytest.raises(ValueError, match="site 'scored' returned NaN"):
        lmppl.infer.ImportanceSampling(program, 8).run(jax.random.key(0))


def test_all_weights_zero_warns_and_returns_minus_infinity():
    def program():
        s = numpyro.sample("s", lmppl.LM(LM, "a", 2))
        numpyro.factor("impossible", potentials.log_indicator(s[0] > 100))

    with pytest.warns(RuntimeWarning, match="every particle has weight zero"):
        result = lmppl.infer.SMC(program, 8, ess_threshold=1.0).run(jax.random.key(0))
    assert np.isneginf(float(result.log_marginal))
    assert not np.isnan(np.asarray(result.log_weights)).any()


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"])
def test_num_particles_must_be_positive_integer(bad):
    with pytest.raises(ValueError, match="num_particles"):
        lmppl.infer.SMC(lambda: None, bad)


def test_host_scorer_with_wrong_number_of_scores():
    def program():
        s = numpyro.sample("s", lmppl.LM(LM, "a", 2))
        numpyro.factor(
            "short", potentials.text(lambda texts: [0.0], LM.tokenizer, name="short_scorer")(s)
        )

    with pytest.raises(Exception, match="short_scorer returned 1 scores for 8 texts"):
        lmppl.infer.ImportanceSampling(program, 8).run(jax.random.key(0))


def test_prompt_longer_than_context():
    with pytest.raises(ValueError, match="exceeds the context length 8"):
        lmppl.LM(LM, "abcabc", 4)


def test_prompt_ids_outside_vocabulary():
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        lmppl.LM(LM, [0, 9], 2)


def test_text_prompt_needs_known_characters():
    with pytest.raises(ValueError, match="not in this tokenizer"):
        lmppl.LM(LM, "xyz", 2)


def test_missing_twist_for_site():
    def program():
        numpyro.sample("s", lmppl.LM(LM, "a", 2))

    with pytest.raises(ValueError, match="no twist for the LM site 's'"):
        lmppl.infer.TwistedSMC(program, 4, twists={"other": lambda i: 0}).run(jax.random.key(0))


def test_particle_gibbs_refuses_a_second_latent_lm_site():
    """Several LM sites run in one sweep (tests/infer/test_several_lm_sites.py); particle
    Gibbs still clamps one site, and says so in one line."""

    def program():
        a = numpyro.sample("a", lmppl.LM(LM, "a", 2))
        numpyro.sample("b", lmppl.LM(LM, lmppl.concat("a", a), 2))

    gibbs = lmppl.infer.ParticleGibbs(
        lmppl.infer.SMC(program, 4), num_iterations=2, num_chains=1, progress=False
    )
    with pytest.raises(ValueError, match="ParticleGibbs supports programs with one latent LM"):
        gibbs.run(jax.random.key(0))


def test_unknown_resampler():
    def program():
        numpyro.sample("s", lmppl.LM(LM, "a", 2))

    with pytest.raises(ValueError, match="unknown resampling scheme 'bogus'"):
        lmppl.infer.SMC(program, 4, resampling="bogus").run(jax.random.key(0))


def test_run_needs_a_key():
    with pytest.raises(TypeError, match="JAX random key"):
        lmppl.infer.SMC(lambda: None, 4).run(0)


@pytest.mark.parametrize("method", ["run", "log_marginals"])
def test_out_of_memory_names_particles_and_runs(method, monkeypatch):
    """XLA's RESOURCE_EXHAUSTED becomes one line naming N and the runs, and what to change."""
    lm = table_lm(("a", "b"), context_length=8, seed=0)

    def program():
        numpyro.sample("s", lmppl.LM(lm, "a", 2))

    sampler = lmppl.infer.SMC(program, 8)
    compiled = sampler.compile()

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes."
        )

    monkeypatch.setattr(compiled.sweep, "advance", exhausted)
    monkeypatch.setattr(lmppl.infer.backends._JittedSweep, "vmapped", lambda self, **kw: exhausted)
    with pytest.raises(MemoryError, match=r"8 particles x (1|3) run\(s\).*LMPPL_MEMORY_BUDGET"):
        if method == "run":
            sampler.run(jax.random.key(0))
        else:
            sampler.log_marginals(jax.random.key(0), 3)


def test_other_runtime_errors_pass_through_unchanged(monkeypatch):
    lm = table_lm(("a", "b"), context_length=8, seed=0)

    def program():
        numpyro.sample("s", lmppl.LM(lm, "a", 2))

    sampler = lmppl.infer.SMC(program, 8)
    compiled = sampler.compile()

    def broken(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(compiled.sweep, "advance", broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        sampler.run(jax.random.key(0))
