"""A second language model as the proposal (issue #13, item 4).

``SMC(program, N, proposal=draft)``: the draft proposes ``q_t ∝ p_draft · Π m_t · ψ_t``
and every token's ``p0 / p_draft`` joins its weight, so the target σ and Ẑ are those of
the program. Checked by enumeration: Ẑ is unbiased for IS, SMC, twisted SMC and with a
step potential, the conditional-SMC identity ``E[Z / Ẑ] = 1`` holds with exact
references, and a draft equal to p0 reproduces the plain sweep bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import lmppl
from lmppl import potentials
from tests.fixtures import eos_lm, small_lm, table_lm, tnt_lm
from tests.statistical import assert_within_standard_errors

TARGET = eos_lm()
DRAFT = table_lm(4, context_length=12, seed=7, scale=1.5)  # same vocabulary, other tables
STEPS = 3
RUNS = 300
LIKING = jnp.array([0.0, 0.5, -1.0, 1.2, 0.3, -0.4], jnp.float32)


def program():
    s = numpyro.sample("s", lmppl.LM(TARGET, "a", STEPS))
    numpyro.factor("liking", jnp.sum(LIKING[s]))


def banned_program():
    s = numpyro.sample("s", lmppl.LM(TARGET, "a", STEPS))
    potentials.banned_tokens("no_c", s, [4], TARGET.vocab_size, eos_token_id=TARGET.eos_token_id)
    numpyro.factor("liking", jnp.sum(LIKING[s]))


def exact_log_z(target=program):
    return float(lmppl.infer.Exact(target).run(None).log_marginal)


def ratios(sampler, log_z):
    estimates = np.asarray(sampler.log_marginals(jax.random.key(9), RUNS), np.float64)
    return np.exp(estimates - log_z)


@pytest.mark.parametrize("draft", [DRAFT, tnt_lm()], ids=["table", "llama"])
@pytest.mark.parametrize("backend", ["is", "smc", "twisted"])
def test_log_z_is_unbiased_with_a_draft_proposal(backend, draft):
    if backend == "is":
        sampler = lmppl.infer.ImportanceSampling(program, 16, proposal=draft)
    elif backend == "smc":
        sampler = lmppl.infer.SMC(program, 16, ess_threshold=0.5, proposal=draft)
    else:
        tilt = jnp.linspace(-0.5, 0.5, TARGET.vocab_size)
        twist = lambda inputs: jnp.broadcast_to(tilt, (inputs.tokens.shape[0], tilt.shape[0]))
        sampler = lmppl.infer.TwistedSMC(program, 16, twists={"s": twist}, proposal=draft)
    assert_within_standard_errors(ratios(sampler, exact_log_z()), 1.0, k=4)


def test_draft_with_a_step_potential_is_unbiased():
    sampler = lmppl.infer.SMC(banned_program, 16, proposal=DRAFT)
    assert_within_standard_errors(ratios(sampler, exact_log_z(banned_program)), 1.0, k=4)


def test_conditional_smc_with_a_draft_keeps_the_upper_bound_identity():
    """With exact references, ``E[Z / Ẑ] = 1`` for conditional SMC (any proposal)."""
    exact = lmppl.infer.Exact(program).run(None)
    log_z = float(exact.log_marginal)
    picks = jax.random.choice(
        jax.random.key(1), exact.log_weights.shape[0], (RUNS,), p=exact.weights
    )
    references = exact.samples["s"][picks]
    sampler = lmppl.infer.SMC(program, 4, ess_threshold=1.0, proposal=DRAFT)
    upper = np.asarray(sampler.conditional_log_marginals(jax.random.key(2), references))
    assert_within_standard_errors(np.exp(log_z - upper.astype(np.float64)), 1.0, k=4)


def test_the_target_itself_as_draft_reproduces_the_plain_sweep():
    plain = lmppl.infer.SMC(program, 16).run(jax.random.key(4))
    drafted = lmppl.infer.SMC(program, 16, proposal=TARGET).run(jax.random.key(4))
    np.testing.assert_array_equal(plain.samples["s"], drafted.samples["s"])
    np.testing.assert_allclose(drafted.log_marginal, plain.log_marginal, atol=1e-6)


def test_a_draft_with_another_vocabulary_is_refused():
    with pytest.raises(ValueError, match="must share the target's vocabulary"):
        lmppl.infer.SMC(program, 4, proposal=small_lm()).run(jax.random.key(0))


def test_an_unnormalised_draft_is_refused():
    first, second = eos_lm(), DRAFT
    realigned = lmppl.realign(first, second, 0.5, mode="global")
    with pytest.raises(ValueError, match="unnormalised logits"):
        lmppl.infer.SMC(program, 4, proposal=realigned).run(jax.random.key(0))


def test_word_level_steps_with_a_draft_are_refused():
    with pytest.raises(ValueError, match="word-level steps"):
        lmppl.infer.SMC(program, 4, resample_at="word", proposal=DRAFT).run(jax.random.key(0))


def test_a_draft_that_is_not_a_model_is_refused():
    with pytest.raises(TypeError, match="proposal must be a loaded language model"):
        lmppl.infer.SMC(program, 4, proposal="tiny")
