"""The one statistical assertion of the test suite: a mean within k standard errors.

Every Monte Carlo check compares a mean with an exact value through its standard error:

    assert_within_standard_errors(samples, expected, k=4)

takes the mean of ``samples`` (over axis 0) and its standard error ``std(ddof=1)/√n``;

    assert_within_standard_errors(mean, expected, k=4, standard_error=se)

takes both as given (a binomial frequency, an interval reported by lmppl). Scalars and
arrays (checked elementwise) both work. The failure message shows the mean, the expected
value, the standard error and how many standard errors apart they are.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Side = Literal["two-sided", "not_above", "not_below"]


def mean_and_standard_error(samples) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std(ddof=1) / √n)`` over axis 0 of ``samples`` (float64)."""
    samples = np.asarray(samples, np.float64)
    n = samples.shape[0]
    return samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(n)


def assert_within_standard_errors(
    estimate,
    expected,
    *,
    k: float,
    standard_error=None,
    atol: float = 0.0,
    side: Side = "two-sided",
    inclusive: bool = False,
    context=None,
) -> None:
    """Fail unless ``estimate`` is within ``k`` standard errors (plus ``atol``) of ``expected``.

    ``standard_error=None``: ``estimate`` holds the samples (axis 0); their mean and standard
    error are computed. Otherwise ``estimate`` is the mean and ``standard_error`` its s.e.

    ``side``: ``"two-sided"`` checks ``|mean − expected| < k·se + atol``; ``"not_above"``
    only ``mean − expected < k·se + atol`` (``expected`` is an upper bound of the mean's
    expectation); ``"not_below"`` only ``expected − mean < k·se + atol`` (a lower bound).
    ``inclusive=True`` uses ``≤`` instead of ``<``. ``context`` is added to the message.
    """
    if standard_error is None:
        mean, standard_error = mean_and_standard_error(estimate)
    else:
        mean = np.asarray(estimate, np.float64)
        standard_error = np.asarray(standard_error, np.float64)
    expected = np.asarray(expected, np.float64)
    difference = mean - expected
    if side == "two-sided":
        deviation = np.abs(difference)
    elif side == "not_above":
        deviation = difference
    elif side == "not_below":
        deviation = -difference
    else:
        raise ValueError(f"side must be 'two-sided', 'not_above' or 'not_below', not {side!r}")
    allowed = k * standard_error + atol
    ok = deviation <= allowed if inclusive else deviation < allowed
    if np.all(ok):
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        errors_apart = difference / standard_error
    relation = "<=" if inclusive else "<"
    lines = [
        f"mean not within {k} standard errors of expected ({side}, deviation {relation} "
        f"{k}·SE + {atol:g}):",
        f"  mean     = {_show(mean)}",
        f"  expected = {_show(expected)}",
        f"  SE       = {_show(standard_error)}",
        f"  (mean − expected) / SE = {_show(errors_apart)}",
    ]
    if np.ndim(ok):
        lines.append(f"  failing entries: {np.argwhere(~np.asarray(ok)).tolist()}")
    if context is not None:
        lines.append(f"  context: {context}")
    raise AssertionError("\n".join(lines))


def _show(values) -> str:
    return np.array2string(np.asarray(values), precision=6, threshold=20)
