"""lmppl.LM is a NumPyro distribution: sampling, log_prob, handlers, Predictive."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from jax.scipy.special import logsumexp
from numpyro import handlers
from numpyro.infer import Predictive
from numpyro.infer.util import log_density

import lmppl
from tests.fixtures import all_sequences, table_lm
from tests.statistical import assert_within_standard_errors

LM = table_lm(3, context_length=12, seed=3, scale=1.2)


@pytest.mark.parametrize("stop_at_eos", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_prob_normalises_over_all_sequences(stop_at_eos, temperature):
    dist = lmppl.LM(LM, "ab", 3, temperature=temperature, stop_at_eos=stop_at_eos)
    log_probs = dist.log_prob(all_sequences(LM.vocab_size, 3))
    assert float(logsumexp(log_probs)) == pytest.approx(0.0, abs=1e-5)


def test_log_prob_is_the_product_of_next_token_probabilities():
    dist = lmppl.LM(LM, "ab", 3, stop_at_eos=False)
    value = jnp.array([4, 2, 3], jnp.int32)
    prefix = [0, 2, 3]  # <s> a b
    total = 0.0
    for token in value.tolist():
        cache = LM.init_cache(1, 8)
        out = LM.apply(LM.params, jnp.asarray([prefix]), cache)
        total += float(jax.nn.log_softmax(out.logits[0, -1])[token])
        prefix.append(token)
    assert float(dist.log_prob(value)) == pytest.approx(total, abs=1e-5)


def test_tokens_after_eos_are_padding():
    dist = lmppl.LM(LM, "a", 3)
    eos = LM.tokenizer.eos_token_id
    assert float(dist.log_prob(jnp.array([2, eos, eos]))) == pytest.approx(
        float(lmppl.LM(LM, "a", 2).log_prob(jnp.array([2, eos]))), abs=1e-6
    )
    assert np.isneginf(float(dist.log_prob(jnp.array([2, eos, 3]))))
    samples = np.asarray(dist.sample(jax.random.key(0), (500,)))
    for row in samples.tolist():
        if eos in row:
            assert all(t == eos for t in row[row.index(eos) :])


def test_sample_frequencies_match_probabilities():
    dist = lmppl.LM(LM, "a", 2, stop_at_eos=False)
    n = 20000
    samples = np.asarray(dist.sample(jax.random.key(1), (n,)))
    sequences = all_sequences(LM.vocab_size, 2)
    probs = np.exp(np.asarray(dist.log_prob(sequences)))
    codes = samples[:, 0] * LM.vocab_size + samples[:, 1]
    freq = np.bincount(codes, minlength=len(probs)) / n
    error = np.sqrt(probs * (1 - probs) / n)
    assert_within_standard_errors(freq, probs, k=4, standard_error=error, atol=1e-9, inclusive=True)


def test_batched_prompts_and_values():
    prompts = jnp.array([[0, 2], [0, 4]], jnp.int32)
    dist = lmppl.LM(LM, prompts, 2)
    assert dist.batch_shape == (2,) and dist.event_shape == (2,)
    x = dist.sample(jax.random.key(0), (3,))
    assert x.shape == (3, 2, 2)
    lp = dist.log_prob(x)
    assert lp.shape == (3, 2)
    single = lmppl.LM(LM, [0, 4], 2).log_prob(x[:, 1])
    np.testing.assert_allclose(np.asarray(lp[:, 1]), np.asarray(single), atol=1e-5)


def test_concat_drops_padding_after_eos():
    eos = LM.tokenizer.eos_token_id
    story = jnp.array([2, eos, eos], jnp.int32)
    joined = lmppl.LM(LM, lmppl.concat("a", story, "b"), 1)
    np.testing.assert_array_equal(
        np.asarray(joined.prompt_tokens)[: int(joined.prompt_length)], [0, 2, 2, 3]
    )
    direct = lmppl.LM(LM, [0, 2, 2, 3], 1)
    value = jnp.array([4])
    assert float(joined.log_prob(value)) == pytest.approx(float(direct.log_prob(value)), abs=1e-6)


def program(ending):
    s = numpyro.sample("s", lmppl.LM(LM, "a", 2, stop_at_eos=False))
    numpyro.sample("e", lmppl.LM(LM, lmppl.concat("a", s), 2, stop_at_eos=False), obs=ending)
    numpyro.deterministic("first", s[0])


def test_numpyro_handlers_work():
    ending = jnp.array([2, 3])
    trace = handlers.trace(handlers.seed(program, 0)).get_trace(ending)
    assert trace["s"]["value"].shape == (2,) and trace["e"]["is_observed"]
    fixed = jnp.array([4, 4])
    conditioned = handlers.trace(
        handlers.seed(handlers.condition(program, {"s": fixed}), 1)
    ).get_trace(ending)
    np.testing.assert_array_equal(np.asarray(conditioned["s"]["value"]), [4, 4])
    log_joint, _ = log_density(program, (ending,), {}, {"s": fixed})
    expected = lmppl.LM(LM, "a", 2, stop_at_eos=False).log_prob(fixed) + lmppl.LM(
        LM, [0, 2, 4, 4], 2, stop_at_eos=False
    ).log_prob(ending)
    assert float(log_joint) == pytest.approx(float(expected), abs=1e-5)


def test_predictive_forward_sampling():
    draws = Predictive(program, num_samples=7)(jax.random.key(2), jnp.array([2, 3]))
    assert draws["s"].shape == (7, 2)
    np.testing.assert_array_equal(np.asarray(draws["first"]), np.asarray(draws["s"][:, 0]))


def test_greedy_decoding_via_sample_tokens():
    from lmppl.decoding import sample_tokens

    tokens, _ = sample_tokens(
        jax.random.key(0),
        LM.params,
        jnp.array([0, 2]),
        jnp.array(2),
        model=LM,
        num_rows=3,
        max_new_tokens=3,
        temperature=0.0,
        eos=None,
    )
    assert (np.asarray(tokens) == np.asarray(tokens)[0]).all()
    step = jnp.argmax(LM.apply(LM.params, jnp.array([[0, 2]]), LM.init_cache(1, 6)).logits[0, -1])
    assert int(tokens[0, 0]) == int(step)
