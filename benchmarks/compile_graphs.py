"""Graph counts of ``torch.compile(model)`` with the monitor attached, per mode, from
``torch._dynamo.explain`` over one forward (the models of tests/test_compile.py).

    python benchmarks/compile_graphs.py
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_compile import BUILD, _batches  # noqa: E402

from gradstats import GradStatsMonitor  # noqa: E402


def count(name: str, mode: str | None) -> tuple[int, int, list[str]]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BUILD[name]().double()
    mon = GradStatsMonitor(model, mode=mode) if mode else None
    x = _batches(name, torch.Generator().manual_seed(0), 1)[0][0]
    ex = torch._dynamo.explain(model)(x)
    if mon is not None:
        mon.detach()
    reasons = sorted({str(r.reason).splitlines()[0][:90] for r in ex.break_reasons})
    return ex.graph_count, ex.graph_break_count, reasons


def main() -> None:
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}")
    print(f"{'model':6} {'monitor':8} {'graphs':>6} {'breaks':>6}  reasons")
    for name in BUILD:
        for mode in (None, "hooks", "fused"):
            g, b, why = count(name, mode)
            print(f"{name:6} {mode or 'none':8} {g:6d} {b:6d}  {'; '.join(why)}")


if __name__ == "__main__":
    main()
