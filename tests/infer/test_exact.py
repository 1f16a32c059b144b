"""Exact enumeration against brute force built from NumPyro's log_density and LM.log_prob."""

import jax
import numpy as np
import pytest

import lmppl
from tests.fixtures import TARGETS, brute_force, log_z


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_exact_matches_brute_force(name):
    program, args = TARGETS[name]
    result = lmppl.infer.Exact(program).run(None, *args)
    vocab = 6 if name == "eos" else 5
    sequences, log_joint = brute_force(program, args, vocab, 3)
    finite = np.isfinite(log_joint)
    assert abs(float(result.log_marginal) - log_z(log_joint)) < 1e-4
    # Same support and the same value on every sequence.
    brute = {tuple(s): v for s, v in zip(sequences.tolist(), log_joint, strict=True)}
    got = dict(
        zip(
            map(tuple, np.asarray(result.samples["s"]).tolist()),
            np.asarray(result.log_weights),
            strict=True,
        )
    )
    for seq, value in brute.items():
        if seq in got:
            assert got[seq] == pytest.approx(value, abs=1e-4) or (
                np.isneginf(value) and np.isneginf(got[seq])
            )
        else:
            assert not np.isfinite(value), f"{seq} is missing from Exact's support"
    assert finite.sum() <= len(got)


def test_eos_support_excludes_tokens_after_eos():
    program, args = TARGETS["eos"]
    result = lmppl.infer.Exact(program).run(None)
    for row in np.asarray(result.samples["s"]).tolist():
        if 1 in row:
            assert all(tok == 1 for tok in row[row.index(1) :])


def test_exact_refuses_large_enumerations():
    program, _ = TARGETS["soft_factor"]
    with pytest.raises(ValueError, match="more than max_sequences"):
        lmppl.infer.Exact(program, max_sequences=10).run(None)


def test_optimal_twist_is_conditional_expectation():
    program, args = TARGETS["infilling"]
    exact = lmppl.infer.Exact(program)
    twist = exact.optimal_twist(*args)
    result = exact.run(None, *args)
    # ψ*_1(v) p0(v) summed over v is Z.
    per_first = {}
    for seq, lw in zip(
        np.asarray(result.samples["s"]).tolist(), np.asarray(result.log_weights), strict=True
    ):
        per_first.setdefault(seq[0], []).append(lw)
    lm = lmppl.infer.discover(program, args, {}).lm_site.model
    dist = lmppl.LM(lm, "a", 1, stop_at_eos=False)
    for first, values in per_first.items():
        log_p0 = float(dist.log_prob(jax.numpy.array([first])))
        assert twist.at([first]) + log_p0 == pytest.approx(
            float(jax.scipy.special.logsumexp(np.array(values))), abs=1e-4
        )
