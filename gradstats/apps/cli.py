"""The ``gradstats`` command line: ``gradstats <command> [options]``.

Each subcommand is one :class:`Command` in :data:`COMMANDS`: the module that implements it and a
help line. The module (which may import torch) is imported only when its command is parsed, so
``gradstats --help`` and ``gradstats --version`` stay fast; it defines
``add_arguments(parser)`` and ``run_cli(args) -> int`` (the exit status). :func:`main` reports
the shared errors of :mod:`.common` the same way for every command: a ``UsageError`` or a
``ConfigError`` (named by its ``--flag``) as a usage error (status 2), a ``MissingDependency``
with its install hint (status 1). A new subcommand is one entry here, or a
:func:`register_command` call before :func:`main` runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NamedTuple

from .._version import __version__
from .common import ConfigError, MissingDependency, UsageError

__all__ = ["Command", "COMMANDS", "register_command", "build_parser", "main"]


class Command(NamedTuple):
    module: str  # defines add_arguments(parser) and run_cli(args) -> int
    help: str


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "gradstats.apps.demo",
        "train a small MLP on scikit-learn's handwritten digits with the monitor attached and "
        "report the gradient noise scale B_simple and what it means for the batch size"),
    "critical-batch": Command(
        "gradstats.apps.critical_batch",
        "measure the critical batch size B_crit = E_min/S_min of the demo model by training to "
        "a target loss at several batch sizes (each with its best learning rate), and compare "
        "it with the measured gradient noise scale B_simple"),
    "experiment": Command(
        "gradstats.apps.experiments.command",
        "run an experiment that tests the theory on real data (e1 critical batch, e2 best "
        "learning rate, adam surge, e3 closed-loop batch size) and write JSON, CSV and PNG"),
    "plot": Command(
        "gradstats.apps.plot",
        "draw a logged run (JSONL or CSV, e.g. from `gradstats demo --log`): B_simple against "
        "the batch size used, per layer, and the learning-rate and batch-size schedules"),
}


def register_command(name: str, module: str, help: str) -> None:
    """Adds subcommand ``name``, implemented by ``module`` (imported when the command runs)."""
    COMMANDS[name] = Command(module, help)


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its arguments are added from its module on first use."""

    def __init__(self, *args: Any, command: Command | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._command, self._module = command, None

    def load(self) -> ModuleType:
        """The command's module, imported (and its arguments added) the first time."""
        if self._module is None:
            if self._command is None:
                raise RuntimeError(f"{self.prog}: no command to load")
            self._module = importlib.import_module(self._command.module)
            self._module.add_arguments(self)
        return self._module

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        if self._command is not None:
            self.load()
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; subcommand arguments are loaded when a subcommand is parsed."""
    parser = argparse.ArgumentParser(
        prog="gradstats",
        description="Per-example gradient norms and the gradient noise scale "
                    "B_simple = tr(Sigma)/|G|^2 during PyTorch training.")
    parser.add_argument("--version", action="version", version=f"gradstats {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, command=cmd)
        p.set_defaults(_parser=p)
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
    p: _CommandParser = args._parser
    try:
        return p.load().run_cli(args)
    except (UsageError, ConfigError) as e:
        if isinstance(e, ConfigError):
            e = f"argument --{e.field.replace('_', '-')}: {e.message}"
        p.print_usage(sys.stderr)
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except MissingDependency as e:
        print(f"{p.prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
