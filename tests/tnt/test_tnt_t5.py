"""TNT on a tiny random T5 with one source per generation.

``tnt.build_dataset(t5, None, generations, annotations, source=[...])`` packs each
example's source into its prompt row (``[d_0, x]``, see :mod:`lmppl.lm.t5`). Checked: the
dataset's old log-probs are each source's own next-token laws (computed by feeding one
token at a time, another path than the teacher-forced pass); the TNT loss's gradient
reaches the encoder and matches a central finite difference; training lowers the exact
prevalence (by enumeration) of the unwanted token under every source; the same per-token
losses equal a decoder-only-style NumPy computation (the loss table) on T5's laws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmppl
from lmppl import tnt
from lmppl.decoding import feed, next_token_log_probs, prefill
from tests.fixtures import all_sequences
from tests.lm.t5_models import random_t5
from tests.tnt.test_tnt_losses import numpy_loss
from tests.tnt.tnt_common import perturbed

T5 = random_t5(2)  # <s> </s> a b c d; decoder start <s> = 0, EOS </s> = 1
SOURCES = ["ab", "dcd", "abcab"]
UNWANTED = 5  # "d"
STEPS = 3
TOKENS = np.array([[5, 2, 1], [3, 5, 4], [2, 2, 5], [5, 5, 3]], np.int32)
ROW_SOURCES = [SOURCES[0], SOURCES[1], SOURCES[2], SOURCES[1]]
MASK = TOKENS == UNWANTED
EPS = 1e-6


def stepwise_log_probs(lm, params, source: str, tokens: np.ndarray) -> np.ndarray:
    """``[B, T, V]`` log q(· | x, d_0, s_<t) feeding one token at a time."""
    dist = lmppl.LM(lm, source=source, max_new_tokens=tokens.shape[1])
    rows, steps = tokens.shape
    state = prefill(lm, params, dist.prompt_tokens, dist.prompt_length, rows, steps)
    out = []
    for t in range(steps):
        out.append(next_token_log_probs(state.logits, 1.0))
        state = feed(lm, params, state, jnp.asarray(tokens[:, t]))
    return np.stack([np.asarray(x, np.float64) for x in out], axis=1)


def rows_log_probs(params) -> np.ndarray:
    return np.concatenate(
        [stepwise_log_probs(T5, params, s, TOKENS[i : i + 1]) for i, s in enumerate(ROW_SOURCES)]
    )


DATASET = tnt.build_dataset(T5, None, TOKENS, MASK, source=ROW_SOURCES, stop_at_eos=False)


def test_dataset_packs_one_source_per_generation():
    assert DATASET.prompt_tokens.shape == (4, 1 + 6)  # d_0 + "abcab</s>"
    np.testing.assert_array_equal(DATASET.prompt_length, [4, 5, 7, 5])
    np.testing.assert_array_equal(DATASET.prompt_tokens[1, :5], [0, 5, 4, 5, 1])  # d_0 "dcd</s>"
    expected = rows_log_probs(T5.params)
    difference = np.abs(np.asarray(DATASET.old_log_probs, np.float64) - expected).max()
    print(f"old log-probs: max |Δ| {difference:.2e}")
    assert difference < 1e-5
    # the sources matter: row 1 and row 3 share theirs, rows 0 and 1 do not
    assert np.abs(expected[0, 0] - expected[1, 0]).max() > 0.05


@pytest.mark.parametrize("name", ["tnff", "tnrr", "ul"])
def test_loss_is_the_loss_table_on_t5_laws(name):
    params = perturbed(T5.params, scale=0.1)
    loss = tnt.make_loss(T5, name, alpha=3.0, epsilon=EPS)
    value = float(jax.jit(loss)(params, DATASET))
    log_q, log_o = rows_log_probs(params), rows_log_probs(T5.params)
    valid, weights = np.ones(TOKENS.shape, bool), np.ones(4)
    expected = numpy_loss(name, log_q, log_o, TOKENS, MASK, valid, weights, 3.0)
    print(f"{name}: {value:.6f} vs {expected:.6f}")
    np.testing.assert_allclose(value, expected, rtol=2e-5, atol=1e-5)


def test_gradient_reaches_the_encoder_and_matches_finite_differences():
    loss = jax.jit(tnt.make_loss(T5, "tnff", alpha=3.0, epsilon=EPS))
    params = perturbed(T5.params, scale=0.1)
    grads = jax.grad(loss)(params, DATASET)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    encoder = [
        float(jnp.abs(g).max())
        for path, g in flat
        if "encoder" in jax.tree_util.keystr(path)
        and "encoder_bias" not in jax.tree_util.keystr(path)
    ]
    assert encoder and min(encoder) > 1e-6, encoder  # every encoder weight is trained
    # A small direction (T5's unscaled attention scores make the loss bend fast) and a
    # step balancing curvature against float32 round-off of a loss of ~3 (each ~1e-3
    # relative here: 0.10101 central difference vs 0.10087 analytic).
    direction = perturbed(jax.tree.map(jnp.zeros_like, params), scale=0.05, seed=5)
    step = 3e-3

    def along(h):
        return float(loss(jax.tree.map(lambda p, d: p + h * d, params, direction), DATASET))

    finite_difference = (along(step) - along(-step)) / (2 * step)
    analytic = sum(
        float(jnp.vdot(g, d))
        for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
    )
    print(f"directional derivative: {analytic:.5f} vs finite difference {finite_difference:.5f}")
    np.testing.assert_allclose(analytic, finite_difference, rtol=5e-3)


def exact_prevalence(lm, source: str) -> float:
    sequences = all_sequences(T5.vocab_size, STEPS)
    contains = tnt.contains_unwanted(sequences, {UNWANTED}, eos_token_id=1)
    dist = lmppl.LM(T5, source=source, max_new_tokens=STEPS, params=lm.params)
    return float(
        np.exp(np.asarray(dist.log_prob(jnp.asarray(sequences)), np.float64))[contains].sum()
    )


def test_training_lowers_the_prevalence_under_every_source():
    tokens, sources = [], []
    for i, source in enumerate(SOURCES):
        generated = lmppl.generate(
            T5, source=source, num_samples=32, max_new_tokens=STEPS, rng_key=jax.random.key(i)
        )
        tokens.append(np.asarray(generated.tokens))
        sources += [source] * 32
    tokens = np.concatenate(tokens)
    annotations = tnt.from_detector(tokens, {UNWANTED}, eos_token_id=1)
    assert annotations.num_annotated > 5
    lm_new, history = tnt.train(
        T5,
        None,
        tokens,
        annotations,
        "tnff",
        source=sources,
        num_steps=30,
        learning_rate=1e-2,
        batch_size=32,
        rng_key=jax.random.key(0),
        progress=False,
    )
    assert np.all(np.isfinite(history["loss"]))
    for source in SOURCES:
        before, after = exact_prevalence(T5, source), exact_prevalence(lm_new, source)
        print(f"source {source!r}: prevalence {before:.4f} -> {after:.4f}")
        assert after < 0.5 * before
