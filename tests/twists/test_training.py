"""Training: a CTL-trained twist makes the proposal exact (KL by enumeration) and learns
ψ*_t up to a constant per t; checkpoints resume; NaN stops with a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmppl
from lmppl.twists.losses import TwistLoss
from tests.fixtures import ENDING
from tests.fixtures import infilling as infill
from tests.twists.enumeration import LM, TARGETS, kl_divergences


def prefix_marginals(program, args, steps, vocab, eos=None):
    """σ_t of every prefix, indexed like ExactTwist tables (prefix read as a base-V number).

    Prefixes padded after an EOS (EOS before position t) get 0: the sweep never reads ψ_t
    there (a finished row keeps the twist value of its last real prefix).
    """
    exact = lmppl.infer.Exact(program).run(None, *args)
    sequences = np.asarray(exact.samples["s"])
    sigma = np.asarray(exact.weights, np.float64)
    tables = []
    for t in range(1, steps + 1):
        codes = np.zeros(len(sequences), np.int64)
        for k in range(t):
            codes = codes * vocab + sequences[:, k]
        table = np.zeros(vocab**t)
        real = (
            np.ones(len(sequences), bool) if eos is None else ~(sequences[:, : t - 1] == eos).any(1)
        )
        np.add.at(table, codes[real], sigma[real])
        tables.append(table)
    return tables


@pytest.mark.slow
@pytest.mark.parametrize("target", ["classifier", "short"])
def test_ctl_drives_both_kl_divergences_to_zero_and_learns_optimal_twist(target):
    program, args = TARGETS[target]
    structure = lmppl.infer.discover(program, args, {})
    vocab, steps = structure.lm_site.model.vocab_size, structure.lm_site.max_new_tokens
    twist = lmppl.twists.TabularTwist(vocab, steps)
    before = kl_divergences(program, args, twist)
    trained, history = lmppl.twists.fit(
        program,
        twist,
        "ctl",
        num_steps=300,
        num_particles=128,
        learning_rate=0.05,
        rng_key=jax.random.key(0),
        args=args,
        progress=False,
    )
    after = kl_divergences(program, args, trained)
    print(target, "KL(σ‖q), KL(q‖σ) before", before, "after", after)
    assert before[0] > 0.05 and before[1] > 0.05
    assert after[0] < 0.02 * before[0] + 2e-3 and after[1] < 0.02 * before[1] + 2e-3
    assert np.mean(history["ess"][-20:]) > 0.9 > history["ess"][0]
    # log ψ_t − log ψ*_t is constant over prefixes (σ_t-weighted spread per t)
    optimal = lmppl.infer.Exact(program).optimal_twist(*args).log_psi
    learned = [np.asarray(table) for table in trained.log_psi()]
    weights = prefix_marginals(program, args, steps, vocab, structure.lm_site.eos_token_id)
    for t in range(steps):
        keep = weights[t] > 1e-3
        difference = learned[t][keep] - optimal[t][keep]
        w = weights[t][keep] / weights[t][keep].sum()
        spread = np.sqrt(np.sum(w * (difference - np.sum(w * difference)) ** 2))
        print(f"t={t + 1}: σ-weighted std of log ψ_t − log ψ*_t = {spread:.4f}")
        assert spread < 0.1, (t, spread)


def test_mlp_head_ctl_reduces_kl():
    program, args = TARGETS["classifier"]
    twist = lmppl.twists.MLPTwist(LM, hidden_size=32)
    before = kl_divergences(program, args, twist)
    trained, _ = lmppl.twists.fit(
        program,
        twist,
        "ctl",
        num_steps=150,
        num_particles=64,
        learning_rate=1e-2,
        rng_key=jax.random.key(1),
        args=args,
        progress=False,
    )
    after = kl_divergences(program, args, trained)
    print("MLP KL before", before, "after", after)
    assert after[0] < 0.5 * before[0] and after[1] < 0.5 * before[1]


@pytest.mark.parametrize("method", ["rl", "sixo", "fudge", "dpg"])
def test_baselines_train_toward_the_target(method):
    program, args = TARGETS["classifier"]
    output = "log_sigmoid" if method == "fudge" else "log"
    twist = lmppl.twists.TabularTwist(LM.vocab_size, 3, output=output)
    before = kl_divergences(program, args, twist)
    trained, history = lmppl.twists.fit(
        program,
        twist,
        method,
        num_steps=150,
        num_particles=64,
        learning_rate=0.05,
        rng_key=jax.random.key(2),
        args=args,
        progress=False,
    )
    after = kl_divergences(program, args, trained)
    print(method, "KL before", before, "after", after)
    assert after[0] < 0.5 * before[0] and after[1] < 0.5 * before[1]
    assert set(history) == {
        "step",
        "loss",
        "ess",
        "log_marginal",
        "grad_norm",
        "param_norm",
        "seconds",
    }


def _resumable_run():
    """The short target, a fresh-twist factory and fit options shared by the resume tests."""
    program, args = TARGETS["short"]
    make = lambda: lmppl.twists.MLPTwist(lmppl.infer.discover(program, args, {}).lm_site.model, 8)
    options = dict(
        num_particles=16, learning_rate=1e-2, rng_key=jax.random.key(4), args=args, progress=False
    )
    return program, make, options


@pytest.mark.slow
def test_checkpoints_resume_to_the_same_parameters(tmp_path):
    program, make, options = _resumable_run()
    straight, straight_history = lmppl.twists.fit(program, make(), "ctl", num_steps=6, **options)
    first, _ = lmppl.twists.fit(
        program, make(), "ctl", num_steps=4, checkpoint_dir=tmp_path, checkpoint_every=2, **options
    )
    assert sorted(p.name for p in tmp_path.glob("step_*.npz")) == [
        "step_0000002.npz",
        "step_0000004.npz",
    ]
    resumed, history = lmppl.twists.fit(
        program, make(), "ctl", num_steps=6, checkpoint_dir=tmp_path, **options
    )
    assert history["step"] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(history["loss"], straight_history["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    path = tmp_path / "twist.npz"
    lmppl.twists.save_twist(path, resumed)
    loaded = lmppl.twists.load_twist(path, make())
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="shape"):
        lmppl.twists.load_twist(path, lmppl.twists.MLPTwist(LM, 8))


def test_nan_loss_stops_training_with_a_clear_error(tmp_path):
    program, args = TARGETS["classifier"]
    broken = TwistLoss(
        "broken",
        ("proposal",),
        lambda samples: (jnp.sum(samples["proposal"].log_psi) * jnp.nan, {}),
    )
    with pytest.raises(lmppl.twists.TrainingDiverged, match="diverged at step 0"):
        lmppl.twists.fit(
            program,
            lmppl.twists.LinearTwist(LM),
            broken,
            num_steps=3,
            num_particles=8,
            rng_key=jax.random.key(0),
            args=args,
            progress=False,
            checkpoint_dir=tmp_path,
        )
    assert (tmp_path / "step_0000000.npz").exists()


def test_fudge_needs_a_probability_twist_and_bad_method_is_named():
    program, args = TARGETS["classifier"]
    with pytest.raises(ValueError, match="log_sigmoid"):
        lmppl.twists.fit(
            program,
            lmppl.twists.LinearTwist(LM),
            "fudge",
            num_steps=1,
            num_particles=4,
            rng_key=jax.random.key(0),
            args=args,
        )
    with pytest.raises(ValueError, match="unknown twist-learning method 'ppo'"):
        lmppl.twists.fit(
            program,
            lmppl.twists.LinearTwist(LM),
            "ppo",
            num_steps=1,
            num_particles=4,
            rng_key=jax.random.key(0),
            args=args,
        )


@pytest.mark.slow
def test_conditional_twist_trains_on_infilling_and_runs_in_twisted_smc():
    twist = lmppl.twists.LinearTwist(LM, condition_length=2)
    condition = lambda ending: ending
    before = kl_divergences(infill, (ENDING,), twist, condition=ENDING)
    trained, history = lmppl.twists.fit(
        infill,
        twist,
        "ctl",
        num_steps=100,
        num_particles=64,
        learning_rate=3e-2,
        rng_key=jax.random.key(5),
        args=(ENDING,),
        twist_condition=condition,
        progress=False,
    )
    after = kl_divergences(infill, (ENDING,), trained, condition=ENDING)
    print("conditional linear KL before", before, "after", after)
    assert after[0] < before[0] and after[1] < before[1]
    result = lmppl.infer.TwistedSMC(
        infill, 16, twists={"s": trained}, twist_condition=condition
    ).run(jax.random.key(0), ENDING)
    assert np.isfinite(float(result.log_marginal))


@pytest.mark.slow
def test_transformer_twist_trains_on_stories260k():
    lm = lmppl.load("stories260k")
    import numpyro

    def program():
        story = numpyro.sample("story", lmppl.LM(lm, "Once upon a time", 4))
        numpyro.factor(
            "likes_the", 2.0 * jnp.sum(story == lm.tokenizer.encode("the", add_bos=False)[0])
        )

    trained, history = lmppl.twists.fit(
        program,
        lmppl.twists.TransformerTwist(lm),
        "ctl",
        num_steps=3,
        num_particles=8,
        learning_rate=1e-3,
        rng_key=jax.random.key(0),
        progress=False,
    )
    assert len(history["loss"]) == 3 and np.all(np.isfinite(history["loss"]))
    result = lmppl.infer.TwistedSMC(program, 8, twists={"story": trained}).run(jax.random.key(1))
    assert np.isfinite(float(result.log_marginal))


def test_resume_skips_partial_and_unreadable_checkpoints(tmp_path):
    """A write killed midway (a leftover partial file, a truncated ``step_*.npz``) never
    blocks a resume: names are matched exactly and unreadable files are skipped."""
    program, make, options = _resumable_run()
    straight, straight_history = lmppl.twists.fit(program, make(), "ctl", num_steps=6, **options)
    lmppl.twists.fit(
        program, make(), "ctl", num_steps=4, checkpoint_dir=tmp_path, checkpoint_every=2, **options
    )
    good = (tmp_path / "step_0000004.npz").read_bytes()
    (tmp_path / "step_0000004.npz.tmp.npz").write_bytes(good[: len(good) // 2])  # old temp name
    (tmp_path / ".step_0000005.npz.partial").write_bytes(good[: len(good) // 3])
    (tmp_path / "step_0000005.npz").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint .*step_0000005.npz"):
        resumed, history = lmppl.twists.fit(
            program, make(), "ctl", num_steps=6, checkpoint_dir=tmp_path, **options
        )
    assert history["step"] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(history["loss"], straight_history["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("learning_rate", [1e6, 1e30])
def test_blow_up_stops_training_and_keeps_finite_parameters(tmp_path, learning_rate):
    """A learning rate that blows the parameters up (finite or not) is caught at once;
    the checkpoint written holds the last finite, bounded parameters."""
    program, args = TARGETS["classifier"]
    twist = lmppl.twists.MLPTwist(LM, 8)
    with pytest.raises(lmppl.twists.TrainingDiverged, match="diverged at step 0"):
        lmppl.twists.fit(
            program,
            twist,
            "ctl",
            num_steps=5,
            num_particles=8,
            learning_rate=learning_rate,
            rng_key=jax.random.key(0),
            args=args,
            progress=False,
            checkpoint_dir=tmp_path,
        )
    params, opt_state, step, _ = lmppl.twists.load_checkpoint(
        tmp_path / "step_0000000.npz", twist.params, None
    )
    assert step == 0
    for saved, initial in zip(jax.tree.leaves(params), jax.tree.leaves(twist.params), strict=True):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(initial))


@pytest.mark.slow
def test_ctl_learns_a_twist_on_top_of_per_step_potentials():
    """A banned token (a per-step potential, applied by the sweep's proposal) plus a factor:
    CTL on the SIS batch (which reads the step factors through the sweep's weights) learns
    a twist under which twisted SIS is exact, log Ẑ = log Z on every run (the default
    mixture batch: tests/twists/test_step_potential_mixture.py)."""
    from tests.fixtures import banned

    log_z = float(lmppl.infer.Exact(banned).run(None).log_marginal)
    twist = lmppl.twists.TabularTwist(LM.vocab_size, 3)

    def spread(candidate):
        sampler = lmppl.infer.TwistedSMC(banned, 4, {"s": candidate}, ess_threshold=None)
        estimates = np.asarray(sampler.log_marginals(jax.random.key(1), 200), np.float64)
        return estimates.mean() - log_z, estimates.std()

    trained, _ = lmppl.twists.fit(
        banned,
        twist,
        "ctl",
        num_steps=300,
        num_particles=128,
        learning_rate=0.05,
        rng_key=jax.random.key(0),
        batch="proposal",
        progress=False,
    )
    bias_before, sd_before = spread(twist)
    bias_after, sd_after = spread(trained)
    print(
        f"untrained: bias {bias_before:.4f} sd {sd_before:.4f}; trained: {bias_after:.4f} {sd_after:.4f}"
    )
    assert sd_before > 0.2
    assert sd_after < 0.05 * sd_before + 0.01
    assert abs(bias_after) < 0.02
