"""Regular-expression and JSON-schema constraints as per-step potentials, against brute force.

The tiny table LM's vocabulary has multi-character tokens (``a b ab "``), so a text has
several tokenizations and the token automaton is not the character automaton. The brute
force never uses lmppl's automaton: it decodes every sequence (special tokens spelled out,
so a sequence holding one never matches) and asks Python's ``re`` or ``json``.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import lmppl
from lmppl import evaluation, potentials
from lmppl.decoding import trim_at_eos
from tests.fixtures import brute_force, table_lm
from tests.statistical import assert_within_standard_errors, mean_and_standard_error

LM = table_lm(("a", "b", "ab"), context_length=12, seed=4, scale=1.2)  # <s> </s> a b ab
JSON_LM = table_lm(('"', "a", "b", '"a'), context_length=12, seed=6, scale=1.0)
PATTERN = "(ab)+a?"  # loops after an accepting state (outlines-core 0.2.14 drops those moves)
AUTOMATON = potentials.regex(PATTERN, LM)
SCHEMA = {"enum": ["a", "ab", "b"]}
JSON_AUTOMATON = potentials.json_schema(SCHEMA, JSON_LM)
STEPS = 4
NUM_RUNS = 400


def constrained(stop_at_eos: bool = True, steps: int = STEPS):
    def program():
        s = numpyro.sample("s", lmppl.LM(LM, "a", steps, stop_at_eos=stop_at_eos))
        potentials.constrain(
            "pattern", s, AUTOMATON, eos_token_id=LM.eos_token_id if stop_at_eos else None
        )

    def free():
        numpyro.sample("s", lmppl.LM(LM, "a", steps, stop_at_eos=stop_at_eos))

    return program, free


PROGRAM, FREE = constrained()
PROGRAM_NO_EOS, FREE_NO_EOS = constrained(False, 3)


def json_program():
    s = numpyro.sample("s", lmppl.LM(JSON_LM, "a", STEPS))
    potentials.constrain("json", s, JSON_AUTOMATON)


def json_free():
    numpyro.sample("s", lmppl.LM(JSON_LM, "a", STEPS))


def text(model, row, stop_at_eos):
    tokens = trim_at_eos(row, model.eos_token_id) if stop_at_eos else list(row)
    return model.tokenizer.decode(tokens, skip_special_tokens=False)


def in_pattern(model, row, stop_at_eos):
    return re.fullmatch(PATTERN, text(model, row, stop_at_eos)) is not None


def in_schema(model, row, stop_at_eos):
    try:
        return json.loads(text(model, row, stop_at_eos)) in SCHEMA["enum"]
    except json.JSONDecodeError:
        return False


CASES = {
    "regex_eos": (PROGRAM, FREE, LM, STEPS, True, in_pattern),
    "regex_no_eos": (PROGRAM_NO_EOS, FREE_NO_EOS, LM, 3, False, in_pattern),
    "json_schema": (json_program, json_free, JSON_LM, STEPS, True, in_schema),
}


def brute_force_target(case):
    """``(sequences, log p0 + log 1[s ∈ L])`` with the indicator from ``re`` / ``json``."""
    _, free, model, steps, stop_at_eos, member = CASES[case]
    sequences, log_p0 = brute_force(free, (), model.vocab_size, steps)
    inside = np.asarray([member(model, row, stop_at_eos) for row in sequences.tolist()])
    return sequences, np.where(inside, log_p0, -np.inf)


def as_distribution(sequences, log_weights):
    log_weights = np.asarray(log_weights, np.float64)
    weights = np.exp(log_weights - np.logaddexp.reduce(log_weights))
    return {
        tuple(row): w
        for row, w in zip(np.asarray(sequences).tolist(), weights, strict=True)
        if w > 0
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_equals_brute_force(case):
    """Exact's log Z and σ equal the enumeration of p0 · 1[text ∈ L] (via ``re`` / ``json``)."""
    program = CASES[case][0]
    sequences, log_target = brute_force_target(case)
    assert np.isfinite(log_target).sum() >= 3  # a non-trivial language on this support
    result = lmppl.infer.Exact(program).run(None)
    np.testing.assert_allclose(
        float(result.log_marginal), np.logaddexp.reduce(log_target), rtol=0, atol=1e-5
    )
    exact = as_distribution(result.samples["s"], result.log_weights)
    brute = as_distribution(sequences, log_target)
    assert exact.keys() == brute.keys()
    np.testing.assert_allclose([exact[k] for k in brute], list(brute.values()), atol=1e-6)


def test_loops_after_accepting_states():
    """``(ab)+a?`` keeps going after ``ab``: every tokenization of ``ababa`` is accepted."""
    a, b, ab = 2, 3, 4
    for tokens in ([a, b, a, b, a], [ab, ab, a], [a, b, ab, a], [ab, a, b]):
        assert AUTOMATON.accepts(tokens)
    for tokens in ([a], [ab, b], [b, a], [ab, a, a]):
        assert not AUTOMATON.accepts(tokens)
    assert AUTOMATON.accepts([ab, LM.eos_token_id, a])  # the text stops at EOS


def test_token_classes_are_the_distinct_columns():
    """Tokens share a class iff they move alike from every state (dense view round trip)."""
    for automaton in (AUTOMATON, JSON_AUTOMATON):
        dense = automaton.transitions
        assert dense.shape == (automaton.num_states, automaton.vocab_size)
        assert np.unique(dense, axis=1).shape[1] == automaton.num_classes
        for c in range(automaton.num_classes):
            members = dense[:, automaton.token_class == c]
            assert (members == members[:, :1]).all()


def exact_log_z(case):
    return float(lmppl.infer.Exact(CASES[case][0]).run(None).log_marginal)


def random_twist(seed):
    """A fixed twist that reads the prefix: log ψ = table[t, v] + 0.4 · #a in the prefix."""
    table = jnp.asarray(np.random.default_rng(seed).normal(size=(STEPS, LM.vocab_size)))

    def twist(inputs):
        count = jnp.sum(inputs.tokens == 2, axis=1).astype(jnp.float32)
        return (table[inputs.step][None, :] + 0.4 * count[:, None]).astype(jnp.float32)

    return twist


BACKENDS = {
    "is": lambda program: lmppl.infer.ImportanceSampling(program, 4),
    "smc_systematic": lambda program: lmppl.infer.SMC(
        program, 4, resampling="systematic", ess_threshold=1.0
    ),
    "twisted": lambda program: lmppl.infer.TwistedSMC(program, 4, twists={"s": random_twist(0)}),
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_marginal_likelihood_is_unbiased(backend):
    """E[Ẑ] = Z = P_p0(text ∈ L): the mean of Ẑ/Z over many 4-particle runs is 1."""
    log_z = exact_log_z("regex_eos")
    estimates = BACKENDS[backend](PROGRAM).log_marginals(jax.random.key(3), NUM_RUNS)
    ratios = np.exp(np.asarray(estimates, np.float64) - log_z)
    assert mean_and_standard_error(ratios)[1] > 0
    assert_within_standard_errors(ratios, 1.0, k=4)


def test_every_smc_sample_is_in_the_language():
    result = lmppl.infer.SMC(PROGRAM, 64, ess_threshold=1.0).run(jax.random.key(5))
    rows = np.asarray(result.samples["s"]).tolist()
    assert all(in_pattern(LM, row, True) for row in rows)
    eos = LM.eos_token_id
    for row in rows:  # EOS only where the automaton state accepts
        if eos in row:
            state = AUTOMATON.run(row[: row.index(eos)])
            assert state >= 0 and AUTOMATON.accepting[state]
    assert np.all(np.isfinite(np.asarray(result.log_weights)))
    assert len({tuple(r) for r in rows}) > 1


def test_conditional_smc_upper_bound_with_constraint():
    """With exact references, E[Z / Ẑ_cond] = 1 (the upper half of the bounds)."""
    sequences, log_target = brute_force_target("regex_eos")
    weights = np.exp(log_target - np.logaddexp.reduce(log_target))
    rows = np.random.default_rng(2).choice(len(sequences), 200, p=weights)
    references = jnp.asarray(sequences[rows])
    sampler = lmppl.infer.SMC(PROGRAM, 4, ess_threshold=1.0)
    estimates = sampler.conditional_log_marginals(jax.random.key(4), references)
    ratios = np.exp(np.logaddexp.reduce(log_target) - np.asarray(estimates, np.float64))
    assert mean_and_standard_error(ratios)[1] > 0
    assert_within_standard_errors(ratios, 1.0, k=4)


def test_rejection_from_the_masked_proposal_is_exact():
    """The masked IS proposal has w = σ̃/q ≤ 1, so rejection from it (what the bounds use as
    references) gives exact samples of σ: frequencies match brute force, P(accept) = Z."""
    sequences, log_target = brute_force_target("regex_eos")
    log_z = float(np.logaddexp.reduce(log_target))
    draws = evaluation.rejection_sample(PROGRAM, jax.random.key(6), 400, batch_size=1024)
    sigma = as_distribution(sequences, log_target)
    keys = list(sigma)
    counts = dict.fromkeys(keys, 0)
    for row in draws.samples.tolist():
        counts[tuple(row)] += 1  # a KeyError here: a sample outside the language
    frequencies = np.asarray([counts[k] for k in keys]) / draws.num_samples
    expected = np.asarray([sigma[k] for k in keys])
    error = np.sqrt(expected * (1 - expected) / draws.num_samples)
    assert_within_standard_errors(frequencies, expected, k=4, standard_error=error)
    # P(accept) = E_q[σ̃/q] = Z (the envelope is 1).
    z = np.exp(log_z)
    assert_within_standard_errors(
        draws.acceptance_rate, z, k=4, standard_error=np.sqrt(z * (1 - z) / draws.num_draws)
    )


def test_dead_state_allows_nothing():
    potential = AUTOMATON.bind(STEPS, LM.eos_token_id)
    prefix = jnp.zeros((STEPS,), jnp.int32)
    dead = potential.log_weights(jnp.asarray(-1, jnp.int32), prefix, jnp.asarray(0))
    assert np.all(np.isneginf(np.asarray(dead)))
    assert int(potential.update(jnp.asarray(0, jnp.int32), jnp.asarray(3), jnp.asarray(0))) == -1


def test_nothing_allowed_gives_weight_zero_not_nan():
    """A twist that zeroes every allowed token at t = 1: each row's mask·twist is all zero,
    so every weight is 0 (log −inf), flagged by a warning; never NaN."""

    def zero_at_one(inputs):
        level = jnp.where(inputs.step == 1, -jnp.inf, 0.0)
        return jnp.full((inputs.tokens.shape[0], LM.vocab_size), level, jnp.float32)

    # No resampling: the zero weights reach the end (check_output flags the final weights).
    sampler = lmppl.infer.TwistedSMC(PROGRAM, 4, twists={"s": zero_at_one}, ess_threshold=None)
    with pytest.warns(RuntimeWarning, match="every particle has weight zero"):
        result = sampler.run(jax.random.key(0))
    assert np.isneginf(float(result.log_marginal))
    assert np.all(np.isneginf(np.asarray(result.log_weights)))


def test_json_schema_accepts_its_documents():
    quote, a, b, quote_a = 2, 3, 4, 5
    assert JSON_AUTOMATON.accepts([quote, a, quote])
    assert JSON_AUTOMATON.accepts([quote_a, b, quote])
    assert not JSON_AUTOMATON.accepts([quote, b, a, quote])
    assert not JSON_AUTOMATON.accepts([quote, a])


def one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_errors_are_one_line():
    one_line_error(lambda: potentials.regex("a(", LM), "cannot compile the regular expression")
    one_line_error(lambda: potentials.regex("^ab", LM), r"cannot compile .*Unsupported")
    one_line_error(lambda: potentials.regex("c+", LM), "no token sequence of this vocabulary")
    one_line_error(
        lambda: potentials.json_schema({"type": "foo"}, JSON_LM),
        "cannot turn the JSON schema into a regular expression: Unsupported type: foo",
    )
    one_line_error(
        lambda: potentials.regex(PATTERN, LM, max_table_bytes=64),
        r"has \d+ states × \d+ token classes: a table of .* exceeds max_table_bytes",
    )


def test_pattern_longer_than_the_sequence_is_refused():
    long = potentials.regex("(ab){3}", LM)  # at least 3 tokens ("ab" "ab" "ab")

    def program():
        s = numpyro.sample("s", lmppl.LM(LM, "a", 2))
        potentials.constrain("long", s, long)

    one_line_error(
        lambda: lmppl.infer.SMC(program, 4).run(jax.random.key(0)),
        "constraint 'long': the shortest token sequence matching .* has 3 tokens; "
        "the sequence has 2",
    )


SMALLER_TOKENIZER = table_lm(("a", "b"), context_length=12).tokenizer  # 4 tokens
LARGER_TOKENIZER = table_lm(("a", "b", "ab", "ba"), context_length=12).tokenizer  # 6 tokens


def foreign_constraint(tokenizer):
    automaton = potentials.regex("(ab)+", tokenizer)

    def program():
        s = numpyro.sample("s", lmppl.LM(LM, "a", STEPS))
        potentials.constrain("pattern", s, automaton)

    return automaton, program


@pytest.mark.parametrize("tokenizer", [SMALLER_TOKENIZER, LARGER_TOKENIZER], ids=["4", "6"])
def test_constraint_from_another_vocabulary_is_refused_everywhere(tokenizer):
    """A regex built on a tokenizer whose size is not the model's (5) is refused in one
    line by SMC, Exact and plain NumPyro (trace, log_density, Predictive)."""
    automaton, program = foreign_constraint(tokenizer)
    assert automaton.vocab_size == tokenizer.vocab_size != LM.vocab_size
    match = (
        rf"constraint 'pattern' was built for a vocabulary of {tokenizer.vocab_size} tokens "
        r"but the LM site 's' \(table-5\) has a vocabulary of 5: build it from the model"
    )
    seeded = numpyro.handlers.seed(program, 0)
    sample = numpyro.handlers.trace(numpyro.handlers.seed(FREE, 0)).get_trace()["s"]["value"]
    for call in (
        lambda: lmppl.infer.SMC(program, 4).run(jax.random.key(0)),
        lambda: lmppl.infer.TwistedSMC(program, 4, twists={"s": random_twist(0)}).run(
            jax.random.key(0)
        ),
        lambda: lmppl.infer.Exact(program).run(None),
        lambda: numpyro.handlers.trace(seeded).get_trace(),
        lambda: numpyro.infer.util.log_density(program, (), {}, {"s": sample}),
        lambda: numpyro.infer.Predictive(program, num_samples=2)(jax.random.key(0)),
    ):
        one_line_error(call, match)


def test_step_factor_of_the_wrong_width_is_refused():
    def program():
        s = numpyro.sample("s", lmppl.LM(LM, "a", STEPS))
        potentials.banned_tokens("no_b", s, [3], vocab_size=4, eos_token_id=LM.eos_token_id)

    one_line_error(
        lambda: lmppl.infer.SMC(program, 4).run(jax.random.key(0)),
        r"per-step potential 'no_b' returns 4 log-weights per step but the LM site 's' "
        r"\(table-5\) has a vocabulary of 5",
    )


def test_token_beyond_the_potential_width_has_weight_zero():
    """Without a trace to find the model in (a bare seed), a token the potential does not
    cover gets log m = −inf, never the weight of another token (JAX clamps indices)."""
    automaton = potentials.regex("(ab)+", SMALLER_TOKENIZER)  # ids 0..3: <s> </s> a b

    def program(tokens):
        return potentials.constrain("pattern", tokens, automaton)

    a, b = 2, 3
    inside = numpyro.handlers.seed(program, 0)(jnp.asarray([a, b, 1, 1]))
    beyond = numpyro.handlers.seed(program, 0)(jnp.asarray([a, b, a, 4]))
    assert float(inside) == 0.0
    assert np.isneginf(float(beyond))


def test_optimal_twist_over_a_constraint_makes_twisted_smc_exact():
    """ψ*_t covers the automaton's later masks and φ: log Ẑ = log Z on every run."""
    exact = lmppl.infer.Exact(PROGRAM)
    log_z = float(exact.run(None).log_marginal)
    sampler = lmppl.infer.TwistedSMC(PROGRAM, 4, twists={"s": exact.optimal_twist()})
    estimates = np.asarray(sampler.log_marginals(jax.random.key(8), 20))
    np.testing.assert_allclose(estimates, log_z, atol=2e-5)
