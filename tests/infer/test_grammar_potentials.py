"""Context-free grammars (Lark, via llguidance) as per-step potentials, against brute force.

Language: ``{aⁿ bⁿ : n ≥ 1}`` — not regular. The table LM's vocabulary has a two-character
token (``<s> </s> a b ab``), so a text has several tokenizations. The brute force never
uses lmppl's grammar code: it decodes every sequence and checks the text with Python.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import lmppl
from lmppl import potentials
from lmppl.decoding import trim_at_eos
from tests.fixtures import brute_force, table_lm
from tests.statistical import assert_within_standard_errors

LM = table_lm(("a", "b", "ab"), context_length=12, seed=4, scale=1.2)  # <s> </s> a b ab
GRAMMAR = potentials.grammar('start: "a" start "b" | "ab"', LM)
STEPS = 4
RUNS = 300


def in_language(text: str) -> bool:
    n = len(text) // 2
    return n >= 1 and text == "a" * n + "b" * n


def programs(stop_at_eos: bool, steps: int):
    eos = LM.eos_token_id if stop_at_eos else None

    def program():
        s = numpyro.sample("s", lmppl.LM(LM, "a", steps, stop_at_eos=stop_at_eos))
        potentials.constrain("anbn", s, GRAMMAR, eos_token_id=eos)

    def free():
        numpyro.sample("s", lmppl.LM(LM, "a", steps, stop_at_eos=stop_at_eos))

    return program, free


def text(row, stop_at_eos):
    tokens = trim_at_eos(row, LM.eos_token_id) if stop_at_eos else list(row)
    return LM.tokenizer.decode(tokens, skip_special_tokens=False)


def brute_force_log_z(stop_at_eos: bool, steps: int) -> float:
    _, free = programs(stop_at_eos, steps)
    sequences, log_p0 = brute_force(free, (), LM.vocab_size, steps)
    inside = np.asarray([in_language(text(row, stop_at_eos)) for row in sequences.tolist()])
    assert inside.any()
    return float(np.logaddexp.reduce(log_p0[inside]))


@pytest.mark.parametrize("stop_at_eos", [True, False], ids=["eos", "no-eos"])
def test_exact_equals_brute_force(stop_at_eos):
    steps = STEPS if stop_at_eos else 3
    program, _ = programs(stop_at_eos, steps)
    result = lmppl.infer.Exact(program).run(None)
    assert float(result.log_marginal) == pytest.approx(
        brute_force_log_z(stop_at_eos, steps), abs=1e-5
    )
    weights = np.asarray(result.weights)
    for row, w in zip(np.asarray(result.samples["s"]).tolist(), weights, strict=True):
        assert (w > 0) == in_language(text(row, stop_at_eos))


@pytest.fixture(scope="module")
def log_z():
    return brute_force_log_z(True, STEPS)


SAMPLERS = {
    "IS": lambda p: lmppl.infer.ImportanceSampling(p, 8),
    "SMC": lambda p: lmppl.infer.SMC(p, 8, ess_threshold=1.0),
    "SMC blocks of 2": lambda p: lmppl.infer.SMC(p, 8, ess_threshold=1.0, resample_every=2),
    "SMC at tokens starting with a": lambda p: lmppl.infer.SMC(
        p, 8, ess_threshold=1.0, resample_at=lambda text: text.startswith("a")
    ),
    "TwistedSMC": lambda p: lmppl.infer.TwistedSMC(
        p, 8, {"s": lambda i: jnp.tanh(0.4 * jnp.arange(LM.vocab_size) - 0.2 * i.step)[None]}
    ),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_marginal_likelihood_is_unbiased(name, log_z):
    program, _ = programs(True, STEPS)
    with warnings.catch_warnings():
        # A grammar cannot say how many tokens acceptance still needs, so in some runs
        # every particle reaches the last step unable to finish: Ẑ = 0 there, part of the
        # unbiased estimator (lmppl warns about such runs).
        warnings.filterwarnings("ignore", ".*: in .* every particle has weight zero")
        estimates = SAMPLERS[name](program).log_marginals(jax.random.key(1), RUNS)
    ratios = np.exp(np.asarray(estimates, np.float64) - log_z)
    assert_within_standard_errors(ratios, 1.0, k=4, context=name)


def test_every_smc_sample_is_in_the_language():
    program, _ = programs(True, STEPS)
    result = lmppl.infer.SMC(program, 32, ess_threshold=1.0).run(jax.random.key(2))
    alive = np.isfinite(np.asarray(result.log_weights))
    rows = np.asarray(result.samples["s"]).tolist()
    for row, positive in zip(rows, alive, strict=True):
        # Weight zero exactly for the particles that could not finish within T tokens.
        assert in_language(text(row, True)) == positive
        assert GRAMMAR.accepts(row, LM.eos_token_id) == positive
    kept = {text(row, True) for row, positive in zip(rows, alive, strict=True) if positive}
    assert len(kept) > 1  # "ab" and "aabb" (several spellings)


def test_conditional_smc_with_exact_references_is_an_upper_bound(log_z):
    program, _ = programs(True, STEPS)
    exact = lmppl.infer.Exact(program).run(None)
    weights = np.asarray(exact.weights, np.float64)
    rows = np.random.default_rng(3).choice(len(weights), RUNS, p=weights / weights.sum())
    references = jnp.asarray(np.asarray(exact.samples["s"])[rows])
    # 16 particles: with 4, Z / Ẑ is heavy-tailed here (a reference whose companions all
    # die at the last step), and 300 runs rarely see its tail.
    sampler = lmppl.infer.SMC(program, 16, ess_threshold=1.0)
    upper = np.asarray(sampler.conditional_log_marginals(jax.random.key(4), references))
    assert_within_standard_errors(np.exp(log_z - upper.astype(np.float64)), 1.0, k=4)
    assert upper.mean() > log_z


def test_a_regular_grammar_equals_the_regex_automaton():
    """Two independent implementations of one regular language give one log Z."""
    regular = potentials.grammar('start: ("ab" | "b")+ "a"?', LM)
    automaton = potentials.regex("(ab|b)+a?", LM)

    def with_constraint(constraint):
        def program():
            s = numpyro.sample("s", lmppl.LM(LM, "a", STEPS))
            potentials.constrain("c", s, constraint)

        return program

    by_grammar = lmppl.infer.Exact(with_constraint(regular)).run(None).log_marginal
    by_regex = lmppl.infer.Exact(with_constraint(automaton)).run(None).log_marginal
    assert float(by_grammar) == pytest.approx(float(by_regex), abs=1e-5)


def test_a_grammar_that_does_not_compile_is_one_line():
    with pytest.raises(ValueError, match="grammar: cannot compile 'start: item'") as error:
        potentials.grammar("start: item", LM)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="give the grammar's text"):
        potentials.grammar("  ", LM)


def test_no_word_within_max_new_tokens_is_weight_zero_not_nan():
    """``aaabbb`` needs at least 4 tokens; with 2 the constraint leaves nothing: every
    weight is zero, flagged by a warning, never NaN."""

    def program():
        s = numpyro.sample("s", lmppl.LM(LM, "a", 2))
        potentials.constrain("long", s, potentials.grammar('start: "aaabbb"', LM))

    with pytest.warns(RuntimeWarning, match="every particle has weight zero"):
        result = lmppl.infer.SMC(program, 4).run(jax.random.key(0))
    assert np.isneginf(float(result.log_marginal))
    assert not np.isnan(np.asarray(result.log_weights)).any()
