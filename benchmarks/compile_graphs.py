"""Graph counts of ``torch.compile(model)`` with the monitor attached, per mode, from
``torch._dynamo.explain`` over one forward: on the first call (the eager path, a graph break
around each hook) and after ``monitor.prepare_compile`` (the traced path of gradstats.traced),
or the reason the traced path does not cover the model. Models of tests/test_compile.py and
tests/test_compile_fullgraph.py.

    python benchmarks/compile_graphs.py
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_compile import BUILD, _batches  # noqa: E402
from test_compile_fullgraph import Problem  # noqa: E402

from gradstats import GradStatsMonitor  # noqa: E402


def _model(name: str):
    torch.manual_seed(0)
    if name in ("attn-untied", "nano"):
        prob = Problem("attn" if name == "attn-untied" else "nano", 0)
        return prob.model, prob.batch(4)[0]
    return BUILD[name]().double(), _batches(name, torch.Generator().manual_seed(0), 1)[0][0]


def count(name: str, mode: str | None, prepare: bool) -> str:
    torch._dynamo.reset()
    model, x = _model(name)
    mon = GradStatsMonitor(model, mode=mode) if mode else None
    if prepare and mon is not None:
        try:
            mon.prepare_compile(x)
        except ValueError as e:
            mon.detach()
            return "n/a: " + str(e).split("(", 1)[1].split(");")[0]
    ex = torch._dynamo.explain(model)(x)
    if mon is not None:
        mon.detach()
    return f"{ex.graph_count} graphs, {ex.graph_break_count} breaks"


def main() -> None:
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}")
    print("| model | monitor | first call | after prepare_compile |")
    print("|---|---|---|---|")
    for name in (*BUILD, "attn-untied", "nano"):
        for mode in (None, "hooks", "fused"):
            first = count(name, mode, False)
            prepared = count(name, mode, True) if mode else first
            print(f"| {name} | {mode or 'none'} | {first} | {prepared} |", flush=True)


if __name__ == "__main__":
    main()
