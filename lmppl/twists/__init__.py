"""Learned twists for twisted SMC (Zhao et al. 2024): networks, losses, training.

* networks: :class:`LinearTwist`, :class:`MLPTwist` (heads on the frozen base LM's hidden
  states), :class:`TransformerTwist` (a trainable copy of the base LM body with a head),
  :class:`TabularTwist` (one parameter per prefix, for enumerable targets);
* losses (:mod:`lmppl.twists.losses`): ``ctl``, ``rl``, ``sixo``, ``fudge``, ``dpg``;
* training: :func:`fit` ``-> (trained_twist, history)``, by default on a defensive
  mixture of the twisted proposal and p0 (:mod:`lmppl.twists.mixture`: no mode of σ that
  p0 reaches is dropped), optionally measuring its own bidirectional bounds
  (``eval_every``, :class:`BoundsMonitor`; :class:`TwistGapWarning` when they stay apart); twist files with
  :func:`save_twist` / :func:`load_twist` (they record the twist's class and options,
  so ``load_twist(path, lm)`` rebuilds it; :mod:`lmppl.twists.io`); exact positives from a
  pool of exact samples of σ (:func:`pool_sampler`, ``fit(target_sampler=...)``).

A trained twist is used as ``lmppl.infer.TwistedSMC(program, N, twists={"site": twist})``.
"""

from lmppl.training.checkpoint import load_checkpoint, save_checkpoint, step_checkpoints
from lmppl.twists import losses
from lmppl.twists.base import Twist
from lmppl.twists.heads import LinearTwist, MLPTwist
from lmppl.twists.io import build_twist, load_twist, read_twist_info, save_twist, twist_spec
from lmppl.twists.losses import TwistLoss, ctl, dpg, fudge, rl, sixo
from lmppl.twists.mixture import defensive_mixture
from lmppl.twists.monitor import BoundsMonitor, TwistGapWarning
from lmppl.twists.positives import pool_sampler
from lmppl.twists.samples import Samples
from lmppl.twists.tabular import TabularTwist
from lmppl.twists.training import BATCHES, TrainingDiverged, fit
from lmppl.twists.transformer import TransformerTwist

__all__ = [
    "BATCHES",
    "BoundsMonitor",
    "LinearTwist",
    "MLPTwist",
    "Samples",
    "TabularTwist",
    "TrainingDiverged",
    "TwistGapWarning",
    "TransformerTwist",
    "Twist",
    "TwistLoss",
    "build_twist",
    "ctl",
    "dpg",
    "defensive_mixture",
    "fit",
    "fudge",
    "load_checkpoint",
    "load_twist",
    "losses",
    "pool_sampler",
    "read_twist_info",
    "rl",
    "save_checkpoint",
    "save_twist",
    "sixo",
    "step_checkpoints",
    "twist_spec",
]
