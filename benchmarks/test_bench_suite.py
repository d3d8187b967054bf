"""pytest-benchmark entries for the suite's methods on small models (``quick`` sizes).

They live under benchmarks/, outside the test command's ``testpaths``; run them with

    pytest benchmarks/test_bench_suite.py --benchmark-only
    pytest benchmarks/test_bench_suite.py --benchmark-only --benchmark-group-by=param:model

Each entry times one training step (zero grads, forward, mean loss, backward, per-example
squared norms) of one method on one model and checks its norms against the float64 reference.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradstats import bench  # noqa: E402

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cpu")
CASES = bench.make_cases(DEVICE, quick=True)
METHODS = {
    "plain": bench.m_plain,
    "gradstats-hooks": bench.m_gradstats("hooks", "auto"),
    "gradstats-fused": bench.m_gradstats("fused", "auto"),
    "loop": bench.m_loop,
    "vmap": bench.m_vmap,
    "opacus-ghost": bench.m_opacus_ghost,
    "backpack": bench.m_backpack(False),
}


@pytest.fixture(scope="module", params=list(CASES))
def problem(request):
    case = CASES[request.param]
    torch.manual_seed(0)
    base = case.build()
    x, y = case.make_batch(torch.Generator().manual_seed(0))
    return case, base, x, y


@pytest.mark.parametrize("method", list(METHODS))
def test_step(benchmark, problem, method):
    case, base, x, y = problem
    model = copy.deepcopy(base)
    try:
        step = METHODS[method](case, model, x, y)
    except bench.Unsupported as e:
        pytest.skip(str(e))
    except ImportError as e:
        pytest.skip(f"peer not installed: {e}")
    benchmark.group = case.name
    out = benchmark(step)
    if out is not None:
        runs = bench._opacus_model(copy.deepcopy(base)) if method.startswith("opacus") else base
        ref = bench.reference_norms(case, runs, x, y)
        assert bench.max_rel_err(out, ref) < 1e-4
