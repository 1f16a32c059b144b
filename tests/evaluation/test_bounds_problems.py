"""Bounds that cannot be read as bounds are flagged in words (issue #15, item 8)."""

import numpy as np

from lmppl.evaluation import BoundsRow, BoundsTable, mean_interval


def row(lower, upper, method="SMC", k=64):
    lower, upper = np.asarray(lower, float), np.asarray(upper, float)
    return BoundsRow(
        method, k, mean_interval(lower), mean_interval(upper), lower[None], upper[None]
    )


def test_sound_bounds_raise_no_problem():
    table = BoundsTable([row([-3.1, -3.0, -3.05, -2.95], [-2.9, -2.8, -2.85, -2.95])])
    assert table.problems() == []
    assert table.problems(reference=(-2.95, 0.05)) == []


def test_crossed_bounds_are_flagged():
    table = BoundsTable([row([-1.0, -1.1, -0.9, -1.0], [-3.0, -3.1, -2.9, -3.0], k=16)])
    (line,) = table.problems()
    assert "SMC K=16" in line and "cross" in line


def test_identical_runs_and_infinite_bounds_are_flagged():
    floor = np.log(1e-16)
    table = BoundsTable(
        [row([floor] * 4, [-8.0, -9.0, -8.5, -8.7]), row([-np.inf, -9.0], [-8, -8])]
    )
    lines = table.problems()
    assert any("every run gave the same lower bound" in line for line in lines)
    assert any("lower bound is -inf" in line for line in lines)


def test_bounds_that_contradict_an_independent_estimate_are_flagged():
    # The threshold target of issue #15: bounds near -19 while rejection says -8.8.
    table = BoundsTable([row([-19.2, -19.0, -19.1, -19.1], [-19.0, -18.9, -19.1, -19.0])])
    lines = table.problems(reference=(-8.8, 0.2))
    assert len(lines) == 1 and "upper bound -19.000 is below the independent estimate" in lines[0]
