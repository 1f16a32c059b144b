"""TNT losses against a direct NumPy computation, and their gradients at θ = θ_o."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmppl import tnt
from tests.fixtures import all_sequences
from tests.tnt.tnt_common import LM, PROMPT, make_batch, perturbed, stepwise_log_probs

EPS = 1e-6
KL_LOSSES = ("tnff", "tnrr", "tnrf")
NLL_LOSSES = ("tnfll", "tnrll", "nl", "ul")


def numpy_loss(name, log_q, log_o, tokens, mask, valid, weights, alpha):
    """The loss table of lmppl.tnt.losses, written out per token in float64."""
    q, p_o = np.exp(log_q), np.exp(log_o)
    total = 0.0
    for b in range(tokens.shape[0]):
        seq = 0.0
        for t in range(tokens.shape[1]):
            if not valid[b, t]:
                continue
            x = tokens[b, t]
            p_new = p_o[b, t].copy()
            p_new[x] = 0.0
            p_new /= p_new.sum()
            p_tilde = (1 - EPS) * p_new
            p_tilde[x] = EPS
            fwd_new = sum(
                p * (np.log(p) - lq) for p, lq in zip(p_new, log_q[b, t], strict=True) if p > 0
            )
            fwd_old = np.sum(p_o[b, t] * (log_o[b, t] - log_q[b, t]))
            rev_new = np.sum(q[b, t] * (log_q[b, t] - np.log(p_tilde)))
            rev_old = np.sum(q[b, t] * (log_q[b, t] - log_o[b, t]))
            nll = -log_q[b, t, x]
            annotated = {
                "tnff": fwd_new,
                "tnrr": rev_new,
                "tnrf": rev_new,
                "tnfll": fwd_new,
                "tnrll": rev_new,
                "nl": log_q[b, t, x],
                "ul": -np.log(1 - q[b, t, x]),
            }[name]
            other = {"tnff": fwd_old, "tnrr": rev_old, "tnrf": fwd_old}.get(name, nll)
            seq += alpha * annotated if mask[b, t] else other
        total += weights[b] * seq
    return total / weights.sum()


TOKENS = np.array([[2, 3, 4, 1, 1], [3, 3, 5, 2, 4], [5, 4, 3, 2, 1]], np.int32)
MASK = np.array([[0, 1, 0, 0, 0], [1, 0, 0, 1, 0], [0, 0, 1, 0, 0]], bool)
WEIGHTS = np.array([1.0, 2.0, 0.5], np.float32)


@functools.cache
def teacher_forced():
    """``log q(params, batch)`` and its VJP, compiled once for every loss: a loss's
    gradient is the VJP of ``∂L/∂log q`` (the chain rule ``make_loss`` differentiates)."""

    def log_q(params, batch):
        return tnt.sequence_log_probs(
            LM, params, batch.prompt_tokens, batch.prompt_length, batch.tokens
        )

    def pullback(params, batch, cotangent):
        return jax.vjp(lambda p: log_q(p, batch), params)[1](cotangent)[0]

    return jax.jit(log_q), jax.jit(pullback)


def loss_and_grad_norm(name, batch, params=None, alpha=1e4):
    params = LM.params if params is None else params
    log_q, pullback = teacher_forced()
    values = log_q(params, batch)
    value, cotangent = jax.value_and_grad(
        lambda lq: tnt.batch_loss(name, lq, batch, alpha=alpha, epsilon=EPS)
    )(values)
    return float(value), float(optax.tree.norm(pullback(params, batch, cotangent)))


def test_make_loss_is_batch_loss_of_the_teacher_forced_pass():
    batch = make_batch(LM, PROMPT, TOKENS, MASK, tnt.valid_mask(TOKENS, 1), WEIGHTS)
    params = perturbed(LM.params)
    loss = tnt.make_loss(LM, "tnrf", alpha=3.0, epsilon=EPS)
    value, grads = jax.jit(jax.value_and_grad(loss))(params, batch)
    expected_value, expected_norm = loss_and_grad_norm("tnrf", batch, params, alpha=3.0)
    np.testing.assert_allclose(float(value), expected_value, rtol=1e-6)
    np.testing.assert_allclose(float(optax.tree.norm(grads)), expected_norm, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(tnt.LOSSES))
def test_loss_matches_numpy(name):
    valid = tnt.valid_mask(TOKENS, 1)
    batch = make_batch(LM, PROMPT, TOKENS, MASK, valid, WEIGHTS)
    params = perturbed(LM.params)
    # q and p_o by feeding one token at a time: another path than the teacher-forced pass
    log_q = stepwise_log_probs(LM, params, PROMPT, TOKENS)
    log_o = stepwise_log_probs(LM, LM.params, PROMPT, TOKENS)
    for alpha in (1.0, 1e4):
        expected = numpy_loss(name, log_q, log_o, TOKENS, MASK, valid, WEIGHTS, alpha)
        value, _ = loss_and_grad_norm(name, batch, params, alpha=alpha)
        np.testing.assert_allclose(value, expected, rtol=2e-5, atol=1e-5)


def grad_norm(name, batch, params=None):
    return loss_and_grad_norm(name, batch, params)[1]


def sampled_batch(steps=5, rows=64, annotate=False):
    generated = jax.random.randint(jax.random.key(7), (rows, steps), 2, 6)
    mask = np.asarray(generated == 3) if annotate else np.zeros((rows, steps), bool)
    return make_batch(LM, PROMPT, generated, mask)


@pytest.mark.parametrize("name", KL_LOSSES)
def test_kl_losses_are_stationary_at_the_old_model_without_annotations(name):
    batch = sampled_batch()
    value, norm = loss_and_grad_norm(name, batch)
    assert abs(value) < 1e-5
    # zero up to float32 rounding: a millionth of the NLL gradient on the same batch
    assert norm < 1e-5 * grad_norm("tnfll", batch)
    # not a vacuous check: away from θ_o, or with annotations, the gradient is large
    assert grad_norm(name, batch, perturbed(LM.params)) > 1e-2
    assert grad_norm(name, sampled_batch(annotate=True)) > 1e-2


@pytest.mark.parametrize("name", NLL_LOSSES)
def test_nll_losses_have_zero_gradient_only_in_expectation_under_the_old_model(name):
    # on a finite sample of sequences the NLL gradient at θ_o is not zero ...
    on_sample = grad_norm(name, sampled_batch())
    assert on_sample > 1e-2
    # ... but weighted by p_o over every sequence (the score identity) it vanishes
    steps = 5
    sequences = all_sequences(LM.vocab_size, steps)
    batch = make_batch(LM, PROMPT, sequences, np.zeros(sequences.shape, bool))
    log_p = np.take_along_axis(np.asarray(batch.old_log_probs), sequences[..., None], -1)
    weights = np.exp(log_p[..., 0].astype(np.float64).sum(-1))
    assert abs(weights.sum() - 1) < 1e-5
    batch = batch._replace(weights=jnp.asarray(weights, jnp.float32))
    in_expectation = grad_norm(name, batch)
    print(name, "NLL gradient norm on a sample", on_sample, "in expectation", in_expectation)
    assert in_expectation < 1e-5 * on_sample
