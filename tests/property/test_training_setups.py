"""Random models and training setups: every statistic the monitor reports agrees with
per-example autograd in float64, or the monitor refuses by name (see check.py for the outcomes
and the accepted refusals, spec.py for what is drawn and the tolerances)."""
from __future__ import annotations

import time

import torch
from hypothesis import given, settings

from .check import evaluate
from .profiles import profile
from .spec import cases
from .summary import Summary

SUMMARY_PATH = "/tmp/gradstats-property-summary.txt"


def test_random_training_setups(ddp_pool) -> None:
    name, chosen = profile()
    summary = Summary(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    @settings(chosen)
    @given(case=cases())
    def one(case) -> None:
        t = time.monotonic()
        summary.add(case, evaluate(case, ddp_pool), time.monotonic() - t)

    try:
        one()
    finally:
        torch.set_num_threads(threads)
        text = summary.write(SUMMARY_PATH)
        print(text)
    failed = summary.failures
    lines = [f"{out.kind}: {case}\n    " + "\n    ".join((out.details or [out.message])[:4])
             for case, out, _ in failed[:5]]
    assert not failed, (f"{len(failed)} of {len(summary.rows)} cases failed (per feature: "
                        f"{SUMMARY_PATH}; cases: {SUMMARY_PATH[:-4]}-cases.json):\n"
                        + "\n".join(lines))
