"""The ``lmppl`` command line: sample a target, train a twist, measure bounds on log Z.

::

    lmppl sample TARGET [--backend smc|is|twisted|exact] [--particles N] [--twist FILE]
                        [--set name=value ...] [--show K] [--out FILE.json|FILE.nc]
    lmppl train-twist TARGET --method ctl|rl|sixo|fudge|dpg [--twist linear|mlp|transformer] --out DIR
    lmppl bounds TARGET [--particles 1 4 16 64] [--runs R] [--exact-samples M]
                        [--twist FILE] --out PREFIX

``TARGET`` is one of

* a task name of the repository's ``models/`` (``models.TASKS``: ``sentiment``,
  ``toxicity-classifier``, ``toxicity-threshold``, ``infilling``, ``infilling-small``);
  found in the current directory or beside the installed ``lmppl`` package (a checkout);
* ``module:attr`` — ``models.toxicity:classifier``; the current directory is importable;
* ``path/to/file.py:attr`` — a Python file.

``attr`` is a :class:`lmppl.Task`, a function marked ``@lmppl.task_factory`` (called with
the ``--set name=value`` options; values are Python literals when they parse as one, else
strings), or a NumPyro program without arguments (wrapped as a Task with no exact
sampler: ``bounds`` then needs ``--exact enumerate`` or ``--exact rejection``).

Exit status: 0 success, 2 bad arguments (unknown target or option), 1 a failure while
running. Known errors are one line ``lmppl: error: ...`` on stderr; ``--traceback``
shows the Python traceback too.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from lmppl.cli.commands import cmd_bounds, cmd_sample, cmd_train_twist
from lmppl.cli.errors import (
    BACKENDS,
    EXACT_KINDS,
    METHODS,
    PROG,
    TWIST_KINDS,
    UsageError,
    _known_errors,
    _one_line,
    _Parser,
)
from lmppl.cli.output import format_samples
from lmppl.cli.targets import parse_options, resolve_target
from lmppl.compilation_cache import enable_compilation_cache

__all__ = [
    "UsageError",
    "build_parser",
    "format_samples",
    "main",
    "parse_options",
    "resolve_target",
]


TARGET_HELP = (
    "a models/ task name (e.g. sentiment, toxicity-classifier), module:attr "
    "(e.g. models.toxicity:classifier) or path/to/file.py:attr; attr is an lmppl.Task, an "
    "@lmppl.task_factory or a NumPyro program without arguments"
)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    parser.add_argument(
        "--set",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="an option of a task factory (repeatable); VALUE is a Python literal or a string",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--traceback",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the Python traceback of an error",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Probabilistic inference in language models: sample a target with "
        "(twisted) SMC, train twists, measure bidirectional bounds on log Z.",
        epilog="Exit status: 0 ok, 2 bad arguments, 1 failure. TARGET: " + TARGET_HELP + ".",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the Python traceback of an error"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sample = commands.add_parser(
        "sample",
        help="run inference and print the heaviest samples, log Ẑ and the ESS",
        description="Run inference on TARGET and print the heaviest distinct samples "
        "(decoded text, normalised weight, number of particles), log Ẑ and the ESS.",
    )
    _common(sample)
    sample.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="smc (bootstrap SMC), is (importance sampling), twisted (needs --twist) or exact "
        "(enumeration, tiny models); default smc, or twisted with --twist",
    )
    sample.add_argument("--particles", type=int, default=64, help="N (default 64)")
    sample.add_argument("--twist", metavar="CHECKPOINT", help="a twist file or train-twist folder")
    sample.add_argument("--show", type=int, default=5, help="samples to print (default 5)")
    sample.add_argument("--out", metavar="FILE", help="write the result: .json or .nc (ArviZ)")
    sample.add_argument(
        "--weighted",
        action="store_true",
        help="with --out FILE.nc: write the weighted particles (ArviZ treats draws as equally "
        "weighted: use sample_stats.weight) instead of the default equally weighted resample",
    )
    sample.set_defaults(run=cmd_sample)

    train = commands.add_parser(
        "train-twist",
        help="train a twist and save it (twist.npz, history.csv)",
        description="Train a twist head on the frozen base LM of TARGET and write "
        "DIR/twist.npz (parameters, class and options, training history) and DIR/history.csv.",
    )
    _common(train)
    train.add_argument("--method", choices=METHODS, required=True, help="the twist loss")
    train.add_argument(
        "--twist",
        choices=TWIST_KINDS,
        default="mlp",
        help="twist: a linear or MLP head on the frozen LM (default mlp), or transformer (a "
        "trainable copy of the LM body: more capacity, measured closer bounds on stories260K)",
    )
    train.add_argument(
        "--hidden-size", type=int, default=64, help="width of the MLP head (default 64)"
    )
    train.add_argument("--steps", type=int, default=100, help="gradient steps (default 100)")
    train.add_argument("--particles", type=int, default=32, help="SIS batch size (default 32)")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    train.add_argument(
        "--batch",
        choices=("mixture", "proposal"),
        default="mixture",
        help="training batch: the twisted proposal pooled with p0 rollouts (default, robust to "
        "dropped modes) or the SIS batch alone (the paper's recipe)",
    )
    train.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="measure the twist's bounds on log Z every N steps and keep the best "
        "(default: steps / 5; 0: never)",
    )
    train.add_argument(
        "--eval-particles", type=int, default=64, help="K of the evaluations (default 64)"
    )
    train.add_argument(
        "--eval-runs",
        type=int,
        default=8,
        help="runs per bound in each evaluation (default 8; more: a less noisy best checkpoint)",
    )
    train.add_argument(
        "--exact-samples",
        type=int,
        default=16,
        help="exact samples of σ drawn for the upper bounds (default 16)",
    )
    train.add_argument(
        "--positives",
        type=int,
        default=0,
        help="draw M exact samples of σ once and use them as the positives of ctl / sixo / dpg "
        "(needs an unconditional exact sampler; default 0: positives from the training batch, "
        "which measured as good or better on stories260K: inference/results/trust/)",
    )
    train.add_argument(
        "--positive-draws",
        type=int,
        default=2_000_000,
        help="rejection budget for the positives (default 2000000 draws of p0; if it runs out, "
        "the positives found so far are used, or none)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        help="write DIR/checkpoints/step_N.npz every N steps (default 50; 0: only at the end)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run whose checkpoints are in DIR/checkpoints (e.g. after Ctrl-C)",
    )
    train.add_argument("--out", metavar="DIR", required=True, help="folder to write")
    train.set_defaults(run=cmd_train_twist)

    bounds = commands.add_parser(
        "bounds",
        help="bidirectional bounds on log Z against K: table and figure",
        description="Lower (SMC) and upper (conditional SMC with an exact target sample) "
        "bounds on log Z for each K; writes PREFIX.md, PREFIX.csv and PREFIX.png.",
    )
    _common(bounds)
    bounds.add_argument("--particles", type=int, nargs="+", default=[1, 4, 16, 64], help="K values")
    bounds.add_argument("--runs", type=int, default=8, help="runs per K (default 8)")
    bounds.add_argument(
        "--exact-samples", type=int, default=None, help="exact samples M (default: --runs)"
    )
    bounds.add_argument(
        "--methods",
        nargs="+",
        choices=("smc", "is", "twisted"),
        default=None,
        help="backends to bound (default smc, plus twisted with --twist)",
    )
    bounds.add_argument("--twist", metavar="CHECKPOINT", help="a twist file or train-twist folder")
    bounds.add_argument(
        "--exact",
        choices=EXACT_KINDS,
        default=None,
        help="override the task's exact sampler (needed for a plain program)",
    )
    bounds.add_argument(
        "--max-draws",
        type=int,
        default=200_000,
        help="rejection sampling budget (default 200000)",
    )
    bounds.add_argument("--out", metavar="PREFIX", required=True, help="output prefix")
    bounds.set_defaults(run=cmd_bounds)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lmppl")
    except Exception:  # not installed (run from a checkout)
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad arguments, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv
    enable_compilation_cache()
    try:
        options = build_parser().parse_args(argv)
        show_traceback = bool(getattr(options, "traceback", False))
        return options.run(options)
    except SystemExit as done:  # --help, --version
        return done.code if isinstance(done.code, int) else 0
    except UsageError as error:
        if show_traceback:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _known_errors() as error:
        if show_traceback:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # e.g. a user's scorer failing inside the sweep
        if show_traceback:
            traceback.print_exc()
        hint = "" if show_traceback else " (--traceback for details)"
        print(f"{PROG}: error: {type(error).__name__}: {_one_line(error)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
