"""Exit codes, the one-line error format and the argument parser class of the CLI."""

from __future__ import annotations

import argparse

__all__ = ["BACKENDS", "EXACT_KINDS", "METHODS", "PROG", "TWIST_KINDS", "UsageError"]


PROG = "lmppl"
BACKENDS = ("smc", "is", "twisted", "exact")
METHODS = ("ctl", "rl", "sixo", "fudge", "dpg")
TWIST_KINDS = ("linear", "mlp", "transformer")
EXACT_KINDS = ("rejection", "joint", "enumerate")


class UsageError(Exception):
    """Bad command-line arguments (exit status 2): unknown target, option or value."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``lmppl: error: ...``) and exit status 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _known_errors() -> tuple[type[BaseException], ...]:
    from lmppl.evaluation import RejectionBudgetExhausted
    from lmppl.infer import ProgramError
    from lmppl.twists import TrainingDiverged

    return (
        ValueError,
        TypeError,
        KeyError,
        OSError,
        ImportError,
        ProgramError,
        RejectionBudgetExhausted,
        TrainingDiverged,
    )


def _one_line(error: BaseException) -> str:
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    message = " ".join(message.split())
    return message or type(error).__name__


# --------------------------------------------------------------------------- targets
