"""The training machinery shared by twist learning (:mod:`lmppl.twists`) and TNT
(:mod:`lmppl.tnt`): checkpoints on disk and the host training loop.

* :mod:`~lmppl.training.checkpoint` — pytrees as ``.npz`` (leaves in flattening order,
  the step and the history), exact ``step_<n>.npz`` lookup, atomic writes;
* :mod:`~lmppl.training.loop` — :func:`run_training`: history, resume, checkpoints,
  divergence stop (:class:`TrainingDiverged`), periodic evaluation with the best kept.
"""

from lmppl.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_checkpoints,
)
from lmppl.training.loop import Best, TrainingDiverged, checkpoint_path, run_training

__all__ = [
    "Best",
    "TrainingDiverged",
    "checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
    "run_training",
    "save_checkpoint",
    "step_checkpoints",
]
