"""The ``gradstats`` command line: ``gradstats <command> [options]``.

Each subcommand is one :class:`Command` in :data:`COMMANDS`: a help line, a function that adds
its arguments to its sub-parser, and a function that runs it and returns the exit status. A new
subcommand (``bench``, ``critical-batch``) is one line in :func:`_register_builtin` (imported
lazily there, so a module may import this one for :class:`UsageError` and the argument types),
or a :func:`register_command` call before :func:`main` runs.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ._version import __version__

__all__ = ["Command", "COMMANDS", "UsageError", "register_command", "build_parser", "main",
           "positive_int", "positive_float"]


class UsageError(ValueError):
    """Bad command-line input found after parsing; reported like an argparse error (status 2)."""


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int]) -> None:
    """Adds subcommand ``name``; ``run(args)`` returns the exit status."""
    COMMANDS[name] = Command(help, add_arguments, run)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite real > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (0.0 < v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    _register_builtin()
    parser = argparse.ArgumentParser(
        prog="gradstats",
        description="Per-example gradient norms and the gradient noise scale "
                    "B_simple = tr(Sigma)/|G|^2 during PyTorch training.")
    parser.add_argument("--version", action="version", version=f"gradstats {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.set_defaults(_parser=p)
        cmd.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``gradstats`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except UsageError as e:
        p: argparse.ArgumentParser = args._parser
        p.print_usage(sys.stderr)
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _register_builtin() -> None:
    """The built-in subcommands, imported when the parser is first built."""
    from . import demo

    COMMANDS.setdefault("demo", Command(demo.HELP, demo.add_arguments, demo.run_cli))
    from . import sweep
    COMMANDS.setdefault("critical-batch", Command(sweep.HELP, sweep.add_arguments, sweep.run_cli))
    from . import bench
    COMMANDS.setdefault("bench", Command(bench.HELP, bench.add_arguments, bench.run_cli))
