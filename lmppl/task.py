"""A task: a program with its arguments and a way to draw exact samples of its target.

The recipes (``inference/``) and the command line (``lmppl sample / train-twist /
bounds``) need more than the NumPyro program: its arguments, which site is the latent
sequence, how to draw exact samples of σ for the upper bounds (rejection for classifier
and threshold targets, joint sampling for infilling, enumeration for tiny models) and,
for infilling, how the condition enters the program and the twist. :class:`Task` holds
exactly that; the program itself stays an ordinary lmppl program.

Functions that build tasks are marked with :func:`task_factory`, so the command line
can call them with ``--set name=value`` options (``lmppl sample models/toxicity.py:classifier
--set num_tokens=10``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["EXACT_SAMPLERS", "Task", "is_task_factory", "task_factory"]

#: How a task's exact target samples are drawn.
EXACT_SAMPLERS = ("rejection", "joint", "enumerate")


@dataclasses.dataclass(frozen=True)
class Task:
    """A program with everything needed to sample, learn twists for and evaluate it.

    Attributes:
      name: a short name (used in file names and tables).
      program: the NumPyro program (one latent ``lmppl.LM`` site).
      lm: the base language model p0 (twist heads read its hidden size).
      site: the name of the latent LM site.
      args, kwargs: the program's arguments. For infilling, ``args[condition_argument]``
        is the default condition (an observed continuation).
      exact: ``"rejection"``, ``"joint"`` or ``"enumerate"`` (see
        :mod:`lmppl.evaluation.samplers`), or None when no exact sampler is known.
      observed: the observed site whose value is the condition (joint sampling).
      condition_argument: where the condition goes in ``args`` (joint sampling).
      log_envelope: ``log M ≥ max log φ`` for rejection sampling.
      twist_condition: ``f(*args, **kwargs)`` handed to conditional twists.
      description: one line for humans.
    """

    name: str
    program: Callable
    lm: Any
    site: str = "story"
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    exact: str | None = None
    observed: str | None = None
    condition_argument: int = 0
    log_envelope: float = 0.0
    twist_condition: Callable[..., Any] | None = None
    description: str = ""

    def __post_init__(self):
        if self.exact is not None and self.exact not in EXACT_SAMPLERS:
            raise ValueError(f"exact must be one of {EXACT_SAMPLERS} or None, got {self.exact!r}")
        if self.exact == "joint" and self.observed is None:
            raise ValueError("a task with exact='joint' must name its observed site")

    @property
    def conditional(self) -> bool:
        """Whether the target depends on a condition drawn with each exact sample."""
        return self.exact == "joint"

    def arguments_without_condition(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the condition removed (what joint sampling takes)."""
        if not self.conditional:
            return self.args, dict(self.kwargs)
        index = self.condition_argument
        return (*self.args[:index], *self.args[index + 1 :]), dict(self.kwargs)

    def with_condition(self, condition: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the program observed at ``condition``."""
        if not self.conditional:
            raise ValueError(f"task {self.name!r} has no condition")
        args, kwargs = self.arguments_without_condition()
        index = self.condition_argument
        return (*args[:index], condition, *args[index:]), kwargs

    def exact_samples(self, rng_key: jax.Array, num_samples: int, **options):
        """Exact samples of σ (:class:`~lmppl.evaluation.ExactSamples`).

        ``options`` go to the sampler (e.g. ``max_draws``, ``batch_size``, ``progress``
        for rejection). Joint sampling returns each sample with its own condition.
        """
        from lmppl import evaluation

        if self.exact is None:
            raise ValueError(
                f"task {self.name!r} has no exact sampler; give the Task exact='rejection', "
                "'joint' or 'enumerate'"
            )
        if self.exact == "rejection":
            return evaluation.rejection_sample(
                self.program,
                rng_key,
                num_samples,
                *self.args,
                log_envelope=self.log_envelope,
                **options,
                **self.kwargs,
            )
        if self.exact == "joint":
            args, kwargs = self.arguments_without_condition()
            return evaluation.joint_sample(
                self.program,
                rng_key,
                num_samples,
                *args,
                observed=self.observed,
                condition_argument=self.condition_argument,
                **kwargs,
            )
        return evaluation.enumeration_sample(
            self.program, rng_key, num_samples, *self.args, **self.kwargs
        )


def task_factory(function: Callable[..., Task]) -> Callable[..., Task]:
    """Mark ``function`` as building a :class:`Task` from keyword options (for the CLI)."""
    function.__lmppl_task_factory__ = True
    return function


def is_task_factory(obj: Any) -> bool:
    """Whether ``obj`` was marked with :func:`task_factory`."""
    return callable(obj) and getattr(obj, "__lmppl_task_factory__", False) is True
