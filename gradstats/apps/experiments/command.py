"""``gradstats experiment NAME [--quick] [--out DIR]``: the experiments that test the theory on
real data (``docs/experiments/README.md``).

* ``e1``: critical batch size from steps/examples at several batch sizes, beside ``B_simple``
  and the Hessian-weighted ``B_noise`` measured online (digits MLP and CNN, text).
* ``e2``: the best SGD learning rate of a run against ``eta_max / (1 + B_noise/B)`` measured
  early in training (digits MLP and CNN).
* ``adam``: the best Adam learning rate against the sign-descent curve (surge, ``B_peak``), with
  Adam's default betas and at ``beta1 = beta2 = 0`` (text).
* ``e3``: the closed-loop batch-size controller against the fitted fixed-batch frontier and a
  hand-set ramp (digits MLP and CNN).
* ``all``: the four in that order.

Sweeps and reference runs are saved under ``OUT/sweeps`` and ``OUT/reference`` and reused by
every later experiment that needs the same one; each experiment writes ``OUT/NAME/``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ..common import positive_int
from .output import write_outputs

__all__ = ["EXPERIMENTS", "add_arguments", "run_cli", "run_experiment"]

EXPERIMENTS = {"e1": "e1", "e2": "e2", "adam": "adam", "e3": "e3"}


def _tasks(text: str) -> tuple[str, ...]:
    from .tasks import TASKS

    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in TASKS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"must be comma-separated task names from "
                                         f"{', '.join(TASKS)}; got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=[*EXPERIMENTS, "all"], metavar="NAME",
                   help=f"which experiment: {', '.join(EXPERIMENTS)} or all")
    p.add_argument("--quick", action="store_true",
                   help="the small, seeded profile (seconds; what the tests run)")
    p.add_argument("--out", metavar="DIR", default="gradstats-experiments",
                   help="where results go (default ./gradstats-experiments); sweeps and "
                        "reference runs found there are reused")
    p.add_argument("--tasks", type=_tasks, metavar="T1,T2",
                   help="only these tasks (digits-mlp, digits-cnn, text) of the experiment")
    p.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="torch intra-op threads (default 1)")
    p.add_argument("--corpus", choices=("pinned", "any"), default="pinned",
                   help="text corpus: 'pinned' refuses a standard library whose files differ "
                        "from the manifest; 'any' uses this interpreter's files by the same "
                        "rule and records their digest")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress lines and no report")


def run_experiment(name: str, *, quick: bool, out: str | Path, tasks: tuple[str, ...] | None,
                   threads: int = 1, corpus: str = "pinned", plot: bool = True,
                   log=None) -> tuple[dict, list[Path]]:
    """Runs experiment ``name`` and writes its files; returns the result and the paths."""
    mod = importlib.import_module(f".{EXPERIMENTS[name]}", __package__)
    kw = {} if tasks is None else {"tasks": tasks}
    result, rows = mod.run(quick, Path(out), threads=threads, corpus=corpus, log=log, **kw)
    return result, write_outputs(result, rows, Path(out), mod.NAME, mod.plot if plot else None)


def run_cli(args: argparse.Namespace) -> int:
    """``gradstats experiment``."""
    from ..common import DEMO_EXTRA
    from ..plotting import require_matplotlib
    from ..text import CorpusError
    from .search import SweepError

    if not args.no_plot:
        require_matplotlib("the experiment's PNG", DEMO_EXTRA + " (or pass --no-plot)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    for name in names:
        mod = importlib.import_module(f".{EXPERIMENTS[name]}", __package__)
        tasks = args.tasks
        if tasks is not None:
            tasks = tuple(t for t in tasks if t in mod.TASKS)
            if not tasks:
                print(f"gradstats experiment {name}: none of the tasks given is one of its own "
                      f"({', '.join(mod.TASKS)}); skipped", file=sys.stderr)
                continue
        try:
            result, paths = run_experiment(name, quick=args.quick, out=args.out, tasks=tasks,
                                           threads=args.threads, corpus=args.corpus,
                                           plot=not args.no_plot,
                                           log=None if args.quiet else log)
        except (SweepError, CorpusError) as e:
            print(f"gradstats experiment {name}: {e}", file=sys.stderr)
            return 1
        if not args.quiet:
            print(mod.format_result(result))
            print("wrote " + ", ".join(map(str, paths)))
    return 0
