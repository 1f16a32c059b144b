"""Word-level steps: resampling only the particles whose next token starts a new word.

The table LM's vocabulary ``<s> </s> a " a" b " b"`` has word-start tokens (``" a"``,
``" b"``, and EOS) and continuations (``a``, ``b``), with about a third of p0's mass on
word starts, so most steps have particles on both sides.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import lmppl
from lmppl import potentials
from lmppl.infer.boundaries import boundary_tokens
from tests.fixtures import table_lm
from tests.statistical import assert_within_standard_errors, mean_and_standard_error

LM = table_lm(("a", " a", "b", " b"), context_length=12, seed=0, scale=1.0)
A, SPACE_A, B, SPACE_B = 2, 3, 4, 5
WORD_STARTS = np.asarray([False, True, False, True, False, True])  # EOS, " a", " b"
STEPS = 4
NUM_RUNS = 400
AUTOMATON = potentials.regex("[ab]( ?[ab])*b", LM)  # words of a/b, the text ends with b


def soft_program():
    s = numpyro.sample("s", lmppl.LM(LM, "a", STEPS))
    numpyro.factor("likes_space_b", 1.0 * jnp.sum(s == SPACE_B) - 0.7 * jnp.sum(s == A))


def constrained_program():
    s = numpyro.sample("s", lmppl.LM(LM, "a", STEPS))
    potentials.constrain("words", s, AUTOMATON)
    numpyro.factor("likes_space_b", 0.8 * jnp.sum(s == SPACE_B))


def random_twist(scale):
    """A fixed twist that reads the prefix: log ψ = table[t, v] + 0.3 · #(" a") so far."""
    table = jnp.asarray(scale * np.random.default_rng(1).normal(size=(STEPS, LM.vocab_size)))

    def twist(inputs):
        count = jnp.sum(inputs.tokens == SPACE_A, axis=1).astype(jnp.float32)
        return (table[inputs.step][None, :] + 0.3 * count[:, None]).astype(jnp.float32)

    return twist


CASES = {
    "smc": (soft_program, lambda p: lmppl.infer.SMC(p, 4, ess_threshold=1.0, resample_at="word")),
    "twisted_adaptive": (
        soft_program,
        lambda p: lmppl.infer.TwistedSMC(
            p, 4, twists={"s": random_twist(0.5)}, ess_threshold=0.9, resample_at="word"
        ),
    ),
    "smc_systematic_constraint": (
        constrained_program,
        lambda p: lmppl.infer.SMC(
            p, 4, resampling="systematic", ess_threshold=1.0, resample_at="word"
        ),
    ),
    # Weights that vary a lot across particles (a strong twist and a constraint): giving
    # the resampled particles any weight but their own group's mean is caught here.
    "twisted_constraint": (
        constrained_program,
        lambda p: lmppl.infer.TwistedSMC(p, 4, twists={"s": random_twist(2.0)}, resample_at="word"),
    ),
}


def test_word_starts_are_read_from_the_pieces():
    mask = boundary_tokens("word", LM.tokenizer, LM.vocab_size, LM.eos_token_id)
    np.testing.assert_array_equal(mask, WORD_STARTS)
    by_predicate = boundary_tokens(
        lambda text: text.startswith(" "), LM.tokenizer, LM.vocab_size, LM.eos_token_id
    )
    np.testing.assert_array_equal(by_predicate, WORD_STARTS)
    only_b = boundary_tokens(lambda text: "b" in text, LM.tokenizer, 8, LM.eos_token_id)
    np.testing.assert_array_equal(only_b, [False, True, False, False, True, True, False, False])


STORIES = Path(__file__).resolve().parents[3] / "shared" / "assets" / "stories260K"


@pytest.mark.skipif(not (STORIES / "tok512.bin").is_file(), reason="no stories260K tokenizer")
def test_word_starts_of_a_sentencepiece_vocabulary():
    """stories260K (llama2.c pieces): " the" starts a word, "ed" and "ing" do not."""
    from lmppl.lm.tokenizers import load_llama2c_tokenizer

    tokenizer = load_llama2c_tokenizer(STORIES / "tok512.bin")
    mask = boundary_tokens("word", tokenizer, tokenizer.vocab_size, tokenizer.eos_token_id)
    pieces = {piece: i for i, piece in enumerate(tokenizer.pieces)}
    assert mask[pieces[b" the"]] and mask[tokenizer.eos_token_id]
    assert not mask[pieces[b"ed"]] and not mask[pieces[b"ing"]]
    assert not mask[tokenizer.bos_token_id]
    assert 0.2 < mask.mean() < 0.8


def test_only_particles_at_a_word_start_are_resampled():
    """Tracing each final particle's lineage: wherever its slot took another particle's
    place at step t, the token it drew at t starts a word; and resampling steps also
    leave particles in the middle of a word alone (the rule is per particle)."""
    sampler = lmppl.infer.SMC(soft_program, 16, ess_threshold=1.0, resample_at="word")
    replaced_at_start = kept_mid_word = 0
    for seed in range(3):
        result = sampler.run(jax.random.key(seed))
        tokens = np.asarray(result.samples["s"])
        ancestors = np.asarray(result.ancestors)
        resampled = np.asarray(result.resampled)
        assert not resampled[0]
        for j in range(tokens.shape[0]):
            slot = j
            for t in reversed(range(STEPS)):
                start = WORD_STARTS[tokens[j, t]]
                if ancestors[t, slot] != slot:
                    assert start, (seed, j, t, tokens[j])
                    replaced_at_start += 1
                if resampled[t] and not start:
                    kept_mid_word += 1
                slot = ancestors[t, slot]
    assert replaced_at_start > 0 and kept_mid_word > 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_word_level_smc_is_unbiased(case):
    """E[Ẑ] = Z: the mean of Ẑ/Z over many 4-particle runs is 1."""
    program, make = CASES[case]
    log_z = float(lmppl.infer.Exact(program).run(None).log_marginal)
    sampler = make(program)
    assert any(np.asarray(sampler.run(jax.random.key(k)).resampled).any() for k in range(5))
    estimates = sampler.log_marginals(jax.random.key(9), NUM_RUNS)
    ratios = np.exp(np.asarray(estimates, np.float64) - log_z)
    assert mean_and_standard_error(ratios)[1] > 0
    assert_within_standard_errors(ratios, 1.0, k=4)


def test_word_level_conditional_smc_upper_bound():
    """With exact references (drawn from Exact's σ), E[Z / Ẑ_cond] = 1."""
    exact = lmppl.infer.Exact(soft_program).run(None)
    log_z = float(exact.log_marginal)
    sequences = np.asarray(exact.samples["s"])
    weights = np.asarray(exact.weights, np.float64)
    rows = np.random.default_rng(2).choice(len(sequences), 300, p=weights / weights.sum())
    sampler = lmppl.infer.SMC(soft_program, 4, ess_threshold=1.0, resample_at="word")
    estimates = sampler.conditional_log_marginals(jax.random.key(4), sequences[rows])
    ratios = np.exp(log_z - np.asarray(estimates, np.float64))
    assert mean_and_standard_error(ratios)[1] > 0
    assert_within_standard_errors(ratios, 1.0, k=4)


@pytest.mark.parametrize("value", ["words", 3, True])
def test_resample_at_is_word_a_predicate_or_none(value):
    with pytest.raises(ValueError, match="resample_at must be None") as error:
        lmppl.infer.SMC(soft_program, 4, resample_at=value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("case", ["smc", "twisted_adaptive", "twisted_constraint"])
def test_unclamped_conditional_runs_are_the_plain_runs(case):
    """``log_marginals`` runs the conditional sweep with references of −1 (nothing clamped):
    run by run, the same numbers as the plain sweep ``run`` with the same keys."""
    program, make = CASES[case]
    sampler = make(program)
    key = jax.random.key(11)
    batched = np.asarray(sampler.log_marginals(key, 5))
    single = [float(sampler.run(k).log_marginal) for k in jax.random.split(key, 5)]
    np.testing.assert_allclose(batched, single, rtol=1e-6, atol=1e-6)
