"""Inference over a source-conditioned T5 decoder (tiny random checkpoint, vocabulary 6, T = 3).

The target is ``σ(s | x) ∝ p0(s | x) φ(s)`` with ``p0`` the T5 decoder given the source x
and ``log φ = 0.8·#c − 0.5·#a``. ``Exact`` equals brute-force enumeration of transformers'
teacher-forced log-probabilities (the EOS rule applied); SMC's and a fixed-twist
TwistedSMC's ``Ẑ`` are unbiased (mean of ``Ẑ/Z`` over 300 vmapped runs within 4 standard
errors of 1); the optimal twist gives ``Ẑ = Z`` to float32 round-off. The source is a
constant text in one program and a program argument (traced ids) in another; a sequence
sampled in the program is the (per-particle) source of an observed T5 site in a third.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from jax.scipy.special import logsumexp

import lmppl
from tests.fixtures import all_sequences
from tests.lm.t5_models import random_t5, t5_folder, torch_log_probs
from tests.lm.test_t5_lm import expected_log_probs
from tests.statistical import assert_within_standard_errors

STEPS = 3
EOS = 1
NUM_RUNS = 300
SEQUENCES = all_sequences(6, STEPS)
SOURCE_IDS = [5, 3, 4, 4, EOS]  # "cabb</s>"
FOLDER, TORCH_MODEL = t5_folder("gated")
T5 = lmppl.load(str(FOLDER))


def log_phi(s):
    return 0.8 * jnp.sum(s == 5, axis=-1) - 0.5 * jnp.sum(s == 3, axis=-1)


def text_program():
    s = numpyro.sample("s", lmppl.LM(T5, source="cabb", max_new_tokens=STEPS))
    numpyro.factor("phi", log_phi(s))


def ids_program(source):
    s = numpyro.sample("s", lmppl.LM(T5, source=source, max_new_tokens=STEPS))
    numpyro.factor("phi", log_phi(s))


SOURCE = jnp.asarray(SOURCE_IDS, jnp.int32)
PROGRAMS = {"text": (text_program, ()), "ids": (ids_program, (SOURCE,))}


def brute_force_log_z() -> float:
    per_token = torch_log_probs(TORCH_MODEL, SOURCE_IDS, SEQUENCES)
    log_p0 = expected_log_probs(per_token, SEQUENCES, EOS)
    return float(logsumexp(log_p0 + np.asarray(log_phi(SEQUENCES), np.float64)))


LOG_Z = brute_force_log_z()


@pytest.mark.parametrize("form", sorted(PROGRAMS))
def test_exact_equals_enumeration_of_transformers_log_probs(form):
    program, args = PROGRAMS[form]
    result = lmppl.infer.Exact(program).run(None, *args)
    print(f"{form}: log Z {float(result.log_marginal):.6f} vs {LOG_Z:.6f}")
    assert abs(float(result.log_marginal) - LOG_Z) < 1e-4


@pytest.mark.parametrize("form", sorted(PROGRAMS))
def test_smc_is_unbiased(form):
    program, args = PROGRAMS[form]
    sampler = lmppl.infer.SMC(program, 8, ess_threshold=1.0)
    estimates = np.asarray(sampler.log_marginals(jax.random.key(0), NUM_RUNS, *args), np.float64)
    ratios = np.exp(estimates - LOG_Z)
    print(f"{form}: mean Ẑ/Z {ratios.mean():.4f} ± {ratios.std(ddof=1) / np.sqrt(NUM_RUNS):.4f}")
    assert ratios.size == NUM_RUNS
    assert_within_standard_errors(ratios, 1.0, k=4)


def test_twisted_smc_with_a_fixed_twist_is_unbiased():
    """A twist that is not the optimal one (log ψ = 0.5·[next token is c]) still gives an
    unbiased Ẑ; its hidden-state input comes from the T5 decoder."""

    def twist(inputs):
        assert inputs.hidden.shape[-1] == T5.hidden_size
        return jnp.broadcast_to(0.5 * (jnp.arange(6) == 5), (inputs.tokens.shape[0], 6))

    sampler = lmppl.infer.TwistedSMC(text_program, 8, twists={"s": twist})
    estimates = np.asarray(sampler.log_marginals(jax.random.key(1), NUM_RUNS), np.float64)
    ratios = np.exp(estimates - LOG_Z)
    print(f"twisted: mean Ẑ/Z {ratios.mean():.4f} ± {ratios.std(ddof=1) / np.sqrt(NUM_RUNS):.4f}")
    assert_within_standard_errors(ratios, 1.0, k=4)


def test_optimal_twist_is_exact():
    exact = lmppl.infer.Exact(text_program)
    twist = exact.optimal_twist()
    sampler = lmppl.infer.TwistedSMC(text_program, 4, twists={"s": twist})
    estimates = np.asarray(sampler.log_marginals(jax.random.key(2), 8), np.float64)
    print(f"optimal twist: max |log Ẑ − log Z| {np.abs(estimates - LOG_Z).max():.2e}")
    np.testing.assert_allclose(estimates, LOG_Z, atol=1e-4)


def test_a_sampled_sequence_as_the_source_of_an_observed_t5_site():
    """Per-particle sources: ``x ~ p0(· | "ab")`` then ``y`` observed from the T5 decoder
    given the source x (each particle's own packed prompt). Exact equals enumeration of
    ``p(x) p(y | x)`` through ``LM.log_prob`` with the 36 sources as one batch; SMC is
    unbiased for it."""
    t5 = random_t5(2)  # vocabulary 6: <s> </s> a b c d
    observed = jnp.array([5, 3], jnp.int32)

    def program(y):
        x = numpyro.sample("x", lmppl.LM(t5, source="ab", max_new_tokens=2, stop_at_eos=False))
        numpyro.sample("y", lmppl.LM(t5, source=x, max_new_tokens=2, stop_at_eos=False), obs=y)

    sources = jnp.asarray(all_sequences(6, 2))
    log_x = lmppl.LM(t5, source="ab", max_new_tokens=2, stop_at_eos=False).log_prob(sources)
    log_y = lmppl.LM(t5, source=sources, max_new_tokens=2, stop_at_eos=False).log_prob(observed)
    log_z = float(logsumexp(np.asarray(log_x, np.float64) + np.asarray(log_y, np.float64)))
    exact = float(lmppl.infer.Exact(program).run(None, observed).log_marginal)
    print(f"sampled source: Exact log Z {exact:.6f} vs enumeration {log_z:.6f}")
    assert abs(exact - log_z) < 1e-4
    sampler = lmppl.infer.SMC(program, 8, ess_threshold=1.0)
    estimates = sampler.log_marginals(jax.random.key(3), NUM_RUNS, observed)
    ratios = np.exp(np.asarray(estimates, np.float64) - log_z)
    print(
        f"sampled source: mean Ẑ/Z {ratios.mean():.4f} ± {ratios.std(ddof=1) / np.sqrt(NUM_RUNS):.4f}"
    )
    assert_within_standard_errors(ratios, 1.0, k=4)


def test_transformer_twist_refuses_an_encoder_decoder_model():
    """Its body would read the packed source prompt as decoder tokens: refused in one line."""
    with pytest.raises(ValueError, match="encoder-decoder") as error:
        lmppl.twists.TransformerTwist(random_t5(0))
    assert "\n" not in str(error.value)
