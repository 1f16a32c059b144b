"""TNT training on a tiny Llama: prevalence falls (exactly, by enumeration), the model stays
close to the exact minimal update, checkpoints resume, divergence is a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lmppl
from lmppl import tnt
from lmppl.twists import TrainingDiverged
from tests.fixtures import all_sequences
from tests.tnt.tnt_common import LM, PROMPT, UNWANTED

STEPS = 4


SEQUENCES = all_sequences(LM.vocab_size, STEPS)
CONTAINS = tnt.contains_unwanted(SEQUENCES, {UNWANTED}, eos_token_id=1)


def enumerated_log_probs(lm):
    """log p_lm(s) of every sequence (−inf off the support), one compiled scorer for all
    models (their parameters are arguments)."""
    dist = lmppl.LM(LM, PROMPT, STEPS, params=lm.params)
    return np.asarray(dist.log_prob(jnp.asarray(SEQUENCES)), np.float64)


def exact_prevalence(lm):
    """P_lm(an unwanted token before EOS), by enumeration."""
    return float(np.exp(enumerated_log_probs(lm))[CONTAINS].sum())


def exact_kl_to_target(lm):
    """KL(σ ‖ p_lm) with σ = p_o 1[clean] / Z the exact minimal update of the old model."""
    log_o = enumerated_log_probs(LM)
    keep = ~CONTAINS & np.isfinite(log_o)
    log_sigma = log_o[keep] - np.log(np.exp(log_o[keep]).sum())
    return float(np.sum(np.exp(log_sigma) * (log_sigma - enumerated_log_probs(lm)[keep])))


def data(num=128):
    generated = lmppl.generate(
        LM, PROMPT, num_samples=num, max_new_tokens=STEPS, rng_key=jax.random.key(1)
    )
    return generated.tokens, tnt.from_detector(generated.tokens, {UNWANTED}, eos_token_id=1)


@pytest.mark.parametrize("loss", ["tnff", "tnrf"])
def test_training_lowers_prevalence_and_approaches_the_minimal_update(loss):
    tokens, annotations = data()
    assert annotations.num_annotated > 5
    before, kl_before = exact_prevalence(LM), exact_kl_to_target(LM)
    lm_new, history = tnt.train(
        LM,
        PROMPT,
        tokens,
        annotations,
        loss,
        num_steps=60,
        learning_rate=1e-2,
        batch_size=32,
        rng_key=jax.random.key(0),
        progress=False,
    )
    after, kl_after = exact_prevalence(lm_new), exact_kl_to_target(lm_new)
    print(loss, "prevalence", before, "->", after, "KL(σ‖p)", kl_before, "->", kl_after)
    assert after < 0.5 * before
    # Not asserted: that TNFF ends closer to σ = p_o·1[clean]/Z than p_o is. At these
    # settings (60 steps, lr 1e-2) it depends on the data sample: KL(σ‖p) 0.110 before,
    # after 0.066 / 0.129 / 0.245 / 0.286 for four 128-sequence samples and 0.205 for 512
    # (prevalence 0.104 → 0.002–0.010 in all); it held for the sample this test drew
    # before the token sampler changed, by luck.
    assert len(history["loss"]) == 60 and np.all(np.isfinite(history["loss"]))
    # the old model is untouched
    assert exact_prevalence(LM) == pytest.approx(before, abs=1e-7)


def test_checkpoints_resume_and_params_round_trip(tmp_path):
    tokens, annotations = data(64)
    kwargs = dict(
        num_steps=6, learning_rate=1e-2, batch_size=16, rng_key=jax.random.key(0), progress=False
    )
    straight, _ = tnt.train(LM, PROMPT, tokens, annotations, "tnrr", **kwargs)
    tnt.train(
        LM,
        PROMPT,
        tokens,
        annotations,
        "tnrr",
        checkpoint_dir=tmp_path,
        checkpoint_every=2,
        **{**kwargs, "num_steps": 4},
    )
    assert sorted(p.name for p in tmp_path.glob("step_*.npz"))[-1] == "step_0000004.npz"
    resumed, history = tnt.train(
        LM, PROMPT, tokens, annotations, "tnrr", checkpoint_dir=tmp_path, **kwargs
    )
    assert history["step"] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    path = tnt.save_params(tmp_path / "new.npz", resumed)
    loaded = tnt.load_params(path, LM)
    assert exact_prevalence(loaded) == pytest.approx(exact_prevalence(resumed), abs=1e-6)


def test_divergence_is_a_clear_error(tmp_path):
    tokens, annotations = data(32)
    with pytest.raises(TrainingDiverged, match="diverged at step 0"):
        tnt.train(
            LM,
            PROMPT,
            tokens,
            annotations,
            num_steps=3,
            batch_size=8,
            rng_key=jax.random.key(0),
            optimizer=optax.scale(float("nan")),
            checkpoint_dir=tmp_path,
            progress=False,
        )
    good, _, step, _ = lmppl.twists.load_checkpoint(tmp_path / "step_0000000.npz", LM.params)
    assert step == 0 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good))
    with pytest.raises(ValueError, match="unknown TNT loss"):
        tnt.train(
            LM,
            PROMPT,
            tokens,
            annotations,
            "kl",
            num_steps=1,
            batch_size=8,
            rng_key=jax.random.key(0),
        )
