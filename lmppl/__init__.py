"""lmppl: probabilistic inference in language models.

A language model is a NumPyro distribution over token sequences (:class:`LM`); a
potential is a ``numpyro.factor`` or an observed site (:mod:`lmppl.potentials`);
inference backends (:mod:`lmppl.infer`) read the program through NumPyro's handlers.
"""

from lmppl import diagnostics, evaluation, infer, potentials, scorers, tnt, training, twists
from lmppl.compilation_cache import enable_compilation_cache
from lmppl.distribution import LM
from lmppl.evaluation import plots
from lmppl.generate import Generation, generate
from lmppl.lm import LanguageModel, ModelConfig, load, random_lm, table_lm
from lmppl.prompt import concat
from lmppl.realign import Realigned, realign
from lmppl.task import Task, task_factory

__all__ = [
    "LM",
    "Generation",
    "LanguageModel",
    "Task",
    "ModelConfig",
    "concat",
    "diagnostics",
    "enable_compilation_cache",
    "evaluation",
    "generate",
    "infer",
    "load",
    "plots",
    "potentials",
    "scorers",
    "Realigned",
    "random_lm",
    "realign",
    "table_lm",
    "task_factory",
    "tnt",
    "training",
    "twists",
]
