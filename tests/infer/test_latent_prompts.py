"""A prompt that depends on a latent site sampled before the LM site (issue #13, item 2).

Program: a persona ``z ~ Categorical(π)`` picks one of three prompts of different lengths
(``lmppl.concat`` of a fixed part and a z-dependent part cut at EOS), then ``s ~ LM`` after
that prompt, then a factor on ``(z, s)``. Each particle prefills its own prompt. Checked
against brute force: ``Exact`` (which enumerates z jointly with s) equals the sum over z
of the programs with z fixed, and SMC's Ẑ and its estimate of P(z | ·) are unbiased.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import lmppl
from tests.fixtures import eos_lm, tnt_lm
from tests.statistical import assert_within_standard_errors

PERSONA_PROBS = jnp.array([0.2, 0.5, 0.3])
# Right parts of the three prompts, EOS (1) marks their ends: lengths 1, 3 and 2.
PERSONAS = jnp.array([[2, 1, 1], [3, 5, 4], [5, 2, 1]], jnp.int32)
BONUS = jnp.array([0.0, 1.0, -0.5, 0.7, 0.2, -1.0], jnp.float32)
RUNS = 300


def persona_program(model, steps):
    def program():
        z = numpyro.sample("z", dist.Categorical(probs=PERSONA_PROBS))
        prompt = lmppl.concat([0], PERSONAS[z])
        s = numpyro.sample("s", lmppl.LM(model, prompt, steps))
        numpyro.factor("liking", jnp.sum(BONUS[s]) * (z - 1.0))

    return program


def fixed_persona(model, steps, z):
    def program():
        s = numpyro.sample("s", lmppl.LM(model, lmppl.concat([0], PERSONAS[z]), steps))
        numpyro.factor("liking", jnp.sum(BONUS[s]) * (z - 1.0))

    return program


def brute_force(model, steps):
    """``log Z`` and ``P(z | ·)`` from one Exact run per persona."""
    per_z = np.array(
        [
            float(lmppl.infer.Exact(fixed_persona(model, steps, z)).run(None).log_marginal)
            for z in range(3)
        ]
    )
    joint = per_z + np.log(np.asarray(PERSONA_PROBS))
    log_z = float(np.logaddexp.reduce(joint))
    return log_z, np.exp(joint - log_z)


@pytest.mark.parametrize("model", [eos_lm(), tnt_lm()], ids=["table", "llama"])
def test_exact_enumerates_the_persona_with_the_sequence(model):
    log_z, posterior = brute_force(model, 3)
    result = lmppl.infer.Exact(persona_program(model, 3)).run(None)
    assert float(result.log_marginal) == pytest.approx(log_z, abs=1e-5)
    weights = np.exp(np.asarray(result.log_weights) - float(result.log_marginal))
    z = np.asarray(result.samples["z"])
    exact_posterior = np.array([weights[z == k].sum() for k in range(3)])
    np.testing.assert_allclose(exact_posterior, posterior, atol=1e-5)


@pytest.mark.parametrize("model", [eos_lm(), tnt_lm()], ids=["table", "llama"])
def test_smc_with_per_particle_prompts_is_unbiased(model):
    log_z, posterior = brute_force(model, 3)
    sampler = lmppl.infer.SMC(persona_program(model, 3), 32, ess_threshold=1.0)
    structure, sweep, arrays, twist_params = sampler.compile()
    keys = jax.random.split(jax.random.key(11), RUNS)
    outputs = jax.vmap(sweep, in_axes=(0, None, None, None, None))(
        keys, structure.model_params(), twist_params, arrays, None
    )
    assert outputs.prompt_tokens.shape[-2:] == (32, 4)  # one prompt per particle
    ratios = np.exp(np.asarray(outputs.log_marginal, np.float64) - log_z)
    assert_within_standard_errors(ratios, 1.0, k=4)
    weights = np.asarray(jax.nn.softmax(outputs.log_weights, axis=-1), np.float64)
    for k in range(3):
        share = np.sum(weights * (np.asarray(outputs.latent_values["z"]) == k), axis=-1)
        assert_within_standard_errors(ratios * share, posterior[k], k=4, context=f"z={k}")


def test_resampling_keeps_each_particles_prompt_with_its_persona():
    """After resampling, particle i's prompt is still the one its z chose."""
    result = lmppl.infer.SMC(persona_program(eos_lm(), 3), 16, ess_threshold=1.0).run(
        jax.random.key(0)
    )
    z = np.asarray(result.samples["z"])
    assert result.resampled is not None and bool(np.any(np.asarray(result.resampled)))
    assert len(set(z.tolist())) > 1


def test_twist_training_refuses_per_particle_prompts():
    twist = lmppl.twists.LinearTwist(eos_lm())
    with pytest.raises(ValueError, match="depends on a latent site"):
        lmppl.twists.fit(
            persona_program(eos_lm(), 3),
            twist,
            num_steps=1,
            num_particles=4,
            rng_key=jax.random.key(0),
            progress=False,
        )


def test_python_branch_on_a_latent_is_one_line():
    """A prompt chosen by Python control flow on a latent cannot be batched over particles."""

    def program():
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        prompt = "ab" if z > 0 else "c"
        numpyro.sample("s", lmppl.LM(eos_lm(), prompt, 3))

    with pytest.raises(ValueError, match="Python control flow") as error:
        lmppl.infer.SMC(program, 4).run(jax.random.key(0))
    assert "\n" not in str(error.value)
