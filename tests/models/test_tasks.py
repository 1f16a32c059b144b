"""Every task of ``models/`` builds and runs on stories260K; exact samples of each kind."""

from __future__ import annotations

import functools
import itertools

import jax
import numpy as np
import pytest

import lmppl
import models
from models import toxicity
from tests.fixtures import table_lm
from tests.statistical import assert_within_standard_errors

#: Options that keep the runs short: the long infilling ending given as text (the small
#: setting keeps its default, an ending drawn from p0).
OPTIONS = {"infilling": {"ending": " Tom was happy."}}


@functools.cache
def build(name: str) -> lmppl.Task:
    return models.TASKS[name](**OPTIONS.get(name, {}))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(models.TASKS))
def test_task_builds_and_smc_gives_a_finite_log_z(name):
    task = build(name)
    assert isinstance(task, lmppl.Task)
    structure = lmppl.infer.discover(task.program, task.args, task.kwargs)
    assert structure.lm_site.name == task.site
    assert structure.lm_site.model is task.lm
    assert task.lm.name == "stories260k"
    result = lmppl.infer.SMC(task.program, 8).run(jax.random.key(0), *task.args, **task.kwargs)
    assert np.isfinite(float(result.log_marginal))
    assert float(result.log_marginal) <= 1e-5  # φ ≤ 1 (a probability), so every Ẑ ≤ 1
    assert np.asarray(result.samples[task.site]).shape == (8, structure.lm_site.max_new_tokens)


@pytest.mark.slow
def test_rejection_samples_of_the_threshold_target_pass_the_threshold():
    """The threshold target's exact samples: every one has toxicity score < limit (the
    floor 1e-16 lets a failing draw through with probability ~1e-16)."""
    limit = 2.0  # p(toxic) > 0.12 under stories260K: about 8% of p0's stories
    task = toxicity.threshold(limit=limit)
    exact = task.exact_samples(jax.random.key(3), 8, batch_size=128, max_draws=20_000)
    assert exact.samples.shape == (8, 10) and exact.samples.dtype == np.int32
    assert 0 < exact.acceptance_rate < 1
    texts = [task.lm.tokenizer.decode(row) for row in exact.samples.tolist()]
    probs = np.clip(lmppl.scorers.offensive_language()(texts), 1e-300, 1.0)
    scores = np.log(probs[:, 0]) - np.log(probs[:, 1])
    assert np.all(scores < limit), scores


@pytest.mark.slow
def test_joint_samples_of_infilling_carry_their_conditions():
    """Infilling: (story, ending) pairs drawn together from p0; each ending is the
    condition its story is exact for, and goes back into the program's arguments."""
    task = build("infilling-small")  # its default ending was drawn from p0 (seed 0)
    assert task.args[0].shape == (1,)
    exact = task.exact_samples(jax.random.key(4), 3)
    assert exact.samples.shape == (3, 2) and exact.samples.dtype == np.int32
    assert exact.conditions.shape == (3, 1) and exact.condition_argument == 0
    assert np.all((exact.samples >= 0) & (exact.samples < task.lm.vocab_size))
    assert task.arguments_without_condition() == ((), {})
    args, kwargs = task.with_condition(exact.conditions[1])
    assert len(args) == 1 and np.array_equal(np.asarray(args[0]), exact.conditions[1])


LM = table_lm(3, context_length=8, seed=4)


@lmppl.task_factory
def enumerable(weight: float = 0.8) -> lmppl.Task:
    """A task of the enumerable kind: T = 2 over a 5-token table LM."""
    import jax.numpy as jnp
    import numpyro

    b = LM.tokenizer.encode("b", add_bos=False)[0]

    def program():
        s = numpyro.sample("s", lmppl.LM(LM, prompt="a", max_new_tokens=2, stop_at_eos=False))
        numpyro.factor("b_first", jnp.log(jnp.where(s[0] == b, weight, 1 - weight)))

    return lmppl.Task(name="enumerable", program=program, lm=LM, site="s", exact="enumerate")


def test_enumeration_samples_follow_the_target():
    """Frequencies of 4000 exact samples match σ within 4 standard errors per sequence."""
    task = enumerable()
    exact = task.exact_samples(jax.random.key(6), 4000)
    assert exact.samples.shape == (4000, 2)
    target = lmppl.infer.Exact(task.program).run()
    sigma = {
        tuple(row): p
        for row, p in zip(
            np.asarray(target.samples["s"]).tolist(), np.asarray(target.weights), strict=True
        )
    }
    counts = {seq: 0 for seq in itertools.product(range(LM.vocab_size), repeat=2)}
    for row in exact.samples.tolist():
        counts[tuple(row)] += 1
    for seq, count in counts.items():
        p = sigma.get(seq, 0.0)
        standard_error = np.sqrt(max(p * (1 - p), 1e-12) / 4000)
        assert_within_standard_errors(
            count / 4000,
            p,
            k=4,
            standard_error=standard_error,
            atol=1e-9,
            inclusive=True,
            context=f"frequency of {seq}",
        )
