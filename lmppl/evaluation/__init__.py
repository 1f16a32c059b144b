"""Measuring inference: exact target samples, bidirectional log Z bounds, KL estimates.

* :mod:`~lmppl.evaluation.samplers` — rejection (classifier / threshold targets), joint
  (infilling) and enumeration samplers of σ.
* :mod:`~lmppl.evaluation.bounds` — ``log_z_bounds``: lower (SMC / SIS) and upper
  (conditional SMC) bounds per K with 95% intervals.
* :mod:`~lmppl.evaluation.diagnose` — ``diagnose``: bounds, gap, ESS and a plain-language
  verdict on whether a sampler's answer can be trusted.
* :mod:`~lmppl.evaluation.kl` — ``KL(q‖σ)`` and ``KL(σ‖q)`` (Zhao et al. 2024, Eq. 23).
* :mod:`~lmppl.evaluation.plots` — bounds against K, ESS over steps, weight histograms
  (also reachable as ``lmppl.plots``).
"""

from lmppl.evaluation import plots
from lmppl.evaluation.bounds import BoundsRow, BoundsTable, group_by_condition, log_z_bounds
from lmppl.evaluation.diagnose import Diagnosis, diagnose
from lmppl.evaluation.intervals import Interval, mean_interval
from lmppl.evaluation.kl import KLEstimates, kl_estimates
from lmppl.evaluation.samplers import (
    ExactSamples,
    RejectionBudgetExhausted,
    enumeration_sample,
    joint_sample,
    rejection_sample,
)

__all__ = [
    "BoundsRow",
    "BoundsTable",
    "Diagnosis",
    "ExactSamples",
    "Interval",
    "KLEstimates",
    "RejectionBudgetExhausted",
    "diagnose",
    "enumeration_sample",
    "group_by_condition",
    "joint_sample",
    "kl_estimates",
    "log_z_bounds",
    "mean_interval",
    "plots",
    "rejection_sample",
]
