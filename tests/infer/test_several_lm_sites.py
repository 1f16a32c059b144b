"""Several latent LM sites in one program (issue #13, item 1): a title, then a story on it.

Program: ``title ~ LM(lm, [0], 2)``; a latent ``z ~ Categorical`` between the sites; then
``story ~ LM(lm, concat([0], PREFIXES[z], title), 2)`` (its prompt depends on the title and
on z: one prompt per particle) and a factor on (title, z, story). One sweep runs the two
sites' steps in sequence (the second continues the first's particles). Checked against
NumPyro's own ``log_density`` summed over every (title, z, story): ``Exact`` equals it, and
SMC, importance sampling, TwistedSMC with a twist per site and conditional SMC (exact
references) are unbiased for Z (``E[Ẑ/Z] = 1``, resp. ``E[Z/Ẑ] = 1``) and for
``Z · P(title_1 = v)``.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import logsumexp
from numpyro.infer.util import log_density

import lmppl
from lmppl import potentials
from tests.fixtures import eos_lm, tnt_lm
from tests.statistical import assert_within_standard_errors

LM_TABLE = eos_lm()  # vocabulary 6, EOS = 1
Z_PROBS = jnp.array([0.3, 0.7])
PREFIXES = jnp.array([[2, 1], [4, 5]], jnp.int32)  # lengths 1 and 2 (EOS cuts the first)
BONUS = jnp.array([0.0, 0.8, -0.6, 0.9, 0.3, -1.1], jnp.float32)
RUNS = 300
PARTICLES = 32


def title_story(model, banned: bool = False):
    def program():
        title = numpyro.sample("title", lmppl.LM(model, [0], 2))
        if banned:
            potentials.banned_tokens("no_3_in_title", title, [3], model.vocab_size, eos_token_id=1)
        z = numpyro.sample("z", dist.Categorical(probs=Z_PROBS))
        story = numpyro.sample("story", lmppl.LM(model, lmppl.concat([0], PREFIXES[z], title), 2))
        if banned:
            potentials.banned_tokens("no_4_in_story", story, [4], model.vocab_size, eos_token_id=1)
        numpyro.factor("like", jnp.sum(BONUS[title]) - 0.7 * jnp.sum(BONUS[story]) * (z - 0.5))

    return program


def brute_force(program, vocab: int):
    """``(log Z, P(title_1 = v) [V])`` from ``log_density`` over every (title, z, story)
    (vmapped over the ``V² · 2 · V²`` joint values)."""
    pairs = np.asarray(list(itertools.product(range(vocab), repeat=2)), np.int32)
    grid = np.meshgrid(np.arange(len(pairs)), np.arange(2), np.arange(len(pairs)), indexing="ij")
    title, z, story = pairs[grid[0].ravel()], grid[1].ravel(), pairs[grid[2].ravel()]

    def one(title, z, story):
        data = {"title": title, "z": z, "story": story}
        return log_density(program, (), {}, data)[0]

    log_joint = np.asarray(jax.jit(jax.vmap(one))(title, jnp.asarray(z), story), np.float64)
    log_z = float(logsumexp(log_joint))
    first = title[:, 0]
    marginal = np.array([np.exp(log_joint[first == v] - log_z).sum() for v in range(vocab)])
    return log_z, marginal


@functools.cache
def target(banned: bool = False):
    """``(program, log Z, P(title_1 = v))`` of the table-model program, computed once."""
    program = title_story(LM_TABLE, banned)
    return program, *brute_force(program, LM_TABLE.vocab_size)


@pytest.fixture(scope="module")
def reference():
    return target()


def vmapped_runs(sampler, runs=RUNS, seed=0):
    structure, sweep, arrays, twist_params = sampler.compile()
    keys = jax.random.split(jax.random.key(seed), runs)
    return jax.vmap(sweep, in_axes=(0, None, None, None, None))(
        keys, structure.model_params(), twist_params, arrays, None
    )


def check_unbiased(outputs, log_z, marginal, context):
    ratios = np.exp(np.asarray(outputs.log_marginal, np.float64) - log_z)
    assert_within_standard_errors(ratios, 1.0, k=4, context=context)
    weights = np.asarray(jax.nn.softmax(outputs.log_weights, axis=-1), np.float64)
    first = np.asarray(outputs.latent_values["title"])[..., 0]
    for v in (0, 2, 3):
        share = np.sum(weights * (first == v), axis=-1)
        if marginal[v] == 0.0:  # a banned token: never sampled
            assert not share.any(), context
            continue
        assert_within_standard_errors(ratios * share, marginal[v], k=4, context=f"{context} v={v}")


def test_discover_describes_one_phase_per_site():
    structure = lmppl.infer.discover(title_story(LM_TABLE), (), {})
    assert [s.name for s in structure.lm_sites] == ["title", "story"]
    assert structure.total_steps == 4
    story = structure.continuations[0]
    assert story.prefix_sites == ("title", "z") and story.earlier_lm_sites == ("title",)
    assert story.lm_site.prompt_width == 5  # [0] + 2 + 2


@pytest.mark.parametrize("banned", [False, True], ids=["factor", "step-potentials"])
def test_exact_equals_brute_force(banned):
    program, log_z, marginal = target(banned)
    result = lmppl.infer.Exact(program).run(None)
    assert float(result.log_marginal) == pytest.approx(log_z, abs=1e-5)
    weights = np.exp(np.asarray(result.log_weights) - float(result.log_marginal))
    first = np.asarray(result.samples["title"])[:, 0]
    exact_marginal = np.array([weights[first == v].sum() for v in range(LM_TABLE.vocab_size)])
    np.testing.assert_allclose(exact_marginal, marginal, atol=1e-5)
    assert set(result.samples) == {"title", "z", "story"}


def test_smc_and_importance_sampling_are_unbiased(reference):
    program, log_z, marginal = reference
    smc = vmapped_runs(lmppl.infer.SMC(program, PARTICLES, ess_threshold=1.0))
    # Resampled at every step, the boundary between the sites included (step 2 of 4).
    assert np.asarray(smc.resampled).shape == (RUNS, 4)
    assert np.asarray(smc.resampled)[:, 1:].all() and not np.asarray(smc.resampled)[:, 0].any()
    check_unbiased(smc, log_z, marginal, "SMC")
    importance = vmapped_runs(lmppl.infer.ImportanceSampling(program, PARTICLES), seed=1)
    check_unbiased(importance, log_z, marginal, "IS")


def test_step_potentials_on_both_sites_stay_exact():
    program, log_z, marginal = target(banned=True)
    outputs = vmapped_runs(lmppl.infer.SMC(program, PARTICLES, ess_threshold=1.0), seed=2)
    check_unbiased(outputs, log_z, marginal, "banned")
    titles = np.asarray(outputs.latent_values["title"])
    assert not (titles == 3).any() and not (np.asarray(outputs.tokens) == 4).any()


def twist_for(sign):
    """A fixed, informative twist: log ψ_t(s_<t, v) depends on the prefix and on v."""

    def twist(inputs):
        total = jnp.sum(inputs.tokens, axis=1, keepdims=True).astype(jnp.float32)
        vocab = jnp.arange(LM_TABLE.vocab_size, dtype=jnp.float32)[None, :]
        return jnp.tanh(sign * 0.3 * total + 0.25 * vocab - 0.1 * inputs.step)

    return twist


def test_twisted_smc_with_a_twist_per_site_is_unbiased(reference):
    program, log_z, marginal = reference
    both = lmppl.infer.TwistedSMC(
        program, PARTICLES, {"title": twist_for(1.0), "story": twist_for(-1.0)}
    )
    check_unbiased(vmapped_runs(both, seed=3), log_z, marginal, "twists on both sites")
    story_only = lmppl.infer.TwistedSMC(program, PARTICLES, {"story": twist_for(1.0)})
    check_unbiased(vmapped_runs(story_only, seed=4), log_z, marginal, "twist on the story")


def test_conditional_smc_with_exact_references_is_an_upper_bound(reference):
    program, log_z, _ = reference
    exact = lmppl.infer.Exact(program).run(None)
    weights = np.asarray(jax.nn.softmax(exact.log_weights), np.float64)
    rows = np.random.default_rng(0).choice(len(weights), size=RUNS, p=weights / weights.sum())
    # Several sites: a reference is their tokens concatenated (title, then story).
    references = np.concatenate(
        [np.asarray(exact.samples["title"])[rows], np.asarray(exact.samples["story"])[rows]], 1
    )
    # The latent z between the sites is not clamped: conditional SMC refuses it.
    sampler = lmppl.infer.SMC(program, PARTICLES, ess_threshold=1.0)
    with pytest.raises(ValueError, match=r"samples latent sites before it \('story'\): z"):
        sampler.conditional_log_marginals(jax.random.key(5), references)

    def no_z():
        title = numpyro.sample("title", lmppl.LM(LM_TABLE, [0], 2))
        story = numpyro.sample("story", lmppl.LM(LM_TABLE, lmppl.concat([0, 4], title), 2))
        numpyro.factor("like", jnp.sum(BONUS[title]) - 0.7 * jnp.sum(BONUS[story]))

    exact = lmppl.infer.Exact(no_z).run(None)
    weights = np.asarray(jax.nn.softmax(exact.log_weights), np.float64)
    rows = np.random.default_rng(1).choice(len(weights), size=RUNS, p=weights / weights.sum())
    references = np.concatenate(
        [np.asarray(exact.samples["title"])[rows], np.asarray(exact.samples["story"])[rows]], 1
    )
    sampler = lmppl.infer.SMC(no_z, 8, ess_threshold=1.0)
    upper = np.asarray(sampler.conditional_log_marginals(jax.random.key(6), references))
    inverse = np.exp(float(exact.log_marginal) - upper.astype(np.float64))
    assert_within_standard_errors(inverse, 1.0, k=4, context="E[Z / Ẑ] with clamped references")
    assert upper.mean() > float(exact.log_marginal) - 0.05
    lower = np.asarray(sampler.log_marginals(jax.random.key(7), RUNS))
    ratios = np.exp(lower.astype(np.float64) - float(exact.log_marginal))
    assert_within_standard_errors(ratios, 1.0, k=4, context="E[Ẑ / Z] of the shared compilation")


def test_an_observed_lm_over_the_second_site_is_scored_per_step():
    """Prompt intersection on the story: exact, and its log-probability is reported."""

    def program():
        title = numpyro.sample("title", lmppl.LM(LM_TABLE, [0], 2))
        story = numpyro.sample("story", lmppl.LM(LM_TABLE, lmppl.concat([0], title), 2))
        numpyro.sample("also", lmppl.LM(LM_TABLE, [0, 5], 2), obs=story)
        numpyro.factor("like", jnp.sum(BONUS[title]))

    log_z = float(lmppl.infer.Exact(program).run(None).log_marginal)
    outputs = vmapped_runs(lmppl.infer.SMC(program, PARTICLES, ess_threshold=1.0), seed=8)
    ratios = np.exp(np.asarray(outputs.log_marginal, np.float64) - log_z)
    assert_within_standard_errors(ratios, 1.0, k=4, context="per-step observer")
    forced = lmppl.LM(LM_TABLE, [0, 5], 2).log_prob(outputs.tokens.reshape(-1, 2))
    np.testing.assert_allclose(
        np.asarray(outputs.site_log_probs["also"]).reshape(-1), np.asarray(forced), atol=2e-5
    )


def test_a_transformer_runs_both_sites_unbiased():
    model = tnt_lm()
    program = title_story(model)
    log_z = float(lmppl.infer.Exact(program).run(None).log_marginal)
    outputs = vmapped_runs(lmppl.infer.SMC(program, 16, ess_threshold=1.0), runs=200, seed=9)
    ratios = np.exp(np.asarray(outputs.log_marginal, np.float64) - log_z)
    assert_within_standard_errors(ratios, 1.0, k=4, context="llama")


def test_what_one_site_only_supports_is_refused_in_one_line():
    program = title_story(LM_TABLE)
    cases = [
        (lambda: lmppl.infer.SMC(program, 4, proposal=LM_TABLE).run(jax.random.key(0)), "proposal"),
        (
            lambda: lmppl.infer.SMC(program, 4, resample_at="word").run(jax.random.key(0)),
            "word-level",
        ),
        (
            lambda: lmppl.infer.TwistedSMC(program, 4, {"titel": twist_for(1.0)}).run(
                jax.random.key(0)
            ),
            "not latent LM sites",
        ),
        (
            lambda: lmppl.twists.fit(
                program,
                lmppl.twists.LinearTwist(LM_TABLE),
                num_steps=1,
                num_particles=4,
                rng_key=jax.random.key(0),
                progress=False,
            ),
            "twist training supports programs with one latent LM site",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
