"""Checks of the benchmark machinery (not part of the project's test command, which runs tests/):

    pytest benchmarks/test_harness.py -q

The harness's logic on synthetic timings (paired verdicts, interleaving, budgets, failures), every
method's norms on toy sizes of the suite's models against the float64 reference, and one small
end-to-end pass of the suite (timing, report, a peak-memory subprocess).
"""
from __future__ import annotations

import copy
import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness, report  # noqa: E402
from benchmarks.methods import max_rel_err, methods_for, reference_norms  # noqa: E402
from benchmarks.models import make_cases  # noqa: E402

CPU = torch.device("cpu")


# ============================================================================ paired verdicts
def test_verdict_ahead_behind_level():
    base = [10.0, 11.0, 9.5, 10.5, 10.2, 9.8, 10.1, 10.4, 9.9]
    faster = [t * 0.8 for t in base]
    assert report.verdict(faster, base)["verdict"] == "ahead"
    assert report.verdict(base, faster)["verdict"] == "behind"
    assert report.verdict(faster, base)["speedup"] == pytest.approx(1.25)
    wobble = [t * f for t, f in zip(base, itertools.cycle([0.9, 1.1, 1.0]))]
    assert report.verdict(wobble, base)["verdict"] == "level"


def test_pairing_cancels_drift():
    """The machine slows 3x over the run; a is 5% faster in every round: paired, that is
    unambiguous, though the two sets of times overlap almost entirely."""
    drift = [1.0 + 0.25 * r for r in range(9)]
    b = [2.0 * d for d in drift]
    a = [0.95 * t for t in b]
    assert harness.quartiles(a)[2] > harness.quartiles(b)[0]  # the raw times overlap
    v = report.verdict(a, b)
    assert v["verdict"] == "ahead" and v["ratio"] == pytest.approx(0.95)
    assert v["spread"] == pytest.approx(0.0, abs=1e-12)


def test_paired_uses_common_rounds():
    p = report.paired([1.0, 1.0, 1.0, 9.0], [2.0, 2.0, 2.0])
    assert p["rounds"] == 3 and p["ratio"] == 0.5
    with pytest.raises(ValueError):
        report.paired([], [1.0])


def test_quartiles_stay_in_range():
    assert harness.quartiles([3.0]) == (3.0, 3.0, 3.0)
    q1, med, q3 = harness.quartiles([1.0, 2.0])
    assert 1.0 <= q1 <= med <= q3 <= 2.0


# ============================================================================ rounds, failures
@pytest.fixture
def fake_clock(monkeypatch):
    """time_call returns each fn's declared duration and logs the call order."""
    calls = []

    def time_call(fn, device):
        fn()
        calls.append(fn.name)
        return fn.seconds

    monkeypatch.setattr(harness, "time_call", time_call)
    monkeypatch.setattr(harness, "_cpu_ticks", lambda: None)
    return calls


def _fn(name, seconds, fail=None):
    def fn():
        if fail is not None:
            raise fail
    fn.name, fn.seconds = name, seconds
    return fn


def test_rounds_interleave_and_budget(fake_clock):
    fns = {"a": _fn("a", 0.01), "b": _fn("b", 0.02), "slow": _fn("slow", 10.0)}
    timing = harness.Timing(rounds=5, min_rounds=2, min_sample_s=0.0, budget_s=1.0)
    out = harness.timed_rounds(fns, {k: f.seconds for k, f in fns.items()}, CPU, timing)
    assert len(out["a"].times) == len(out["b"].times) == 5
    assert len(out["slow"].times) == 2  # over budget: min_rounds only
    assert sorted(fake_clock[:3]) == ["a", "b", "slow"]  # each takes a turn per round
    assert out["a"].median == 0.01 and out["b"].spread == 0.0


def test_measure_reports_failures(fake_clock):
    watch = harness.Stopwatch(CPU)

    def ok():
        with watch:
            pass
    ok.name, ok.seconds, ok.inner = "ok", 0.001, watch
    fns = {"ok": ok, "oom": _fn("oom", 0.1, torch.OutOfMemoryError("CUDA out of memory")),
           "no": _fn("no", 0.1, harness.Unsupported("BackPACK has no extension for X")),
           "gone": _fn("gone", 0.1, harness.Unsupported("unavailable in this build: no option")),
           "bug": _fn("bug", 0.1, KeyError("k")), "slow": _fn("slow", 60.0)}
    timing = harness.Timing(rounds=3, min_sample_s=0.0, retries=0)
    samples, failures, outputs = harness.measure(fns, CPU, timing, too_slow_s=30)
    assert list(samples) == ["ok"]
    assert failures == {"oom": "OOM", "no": "unsupported: BackPACK has no extension for X",
                        "gone": "unavailable in this build: no option",
                        "bug": "error: KeyError: 'k'", "slow": "too slow (60.0 s per call)"}
    # the warm-up calls are not in the stopwatch: only the timed calls (one per round here)
    assert len(watch.times) == len(samples["ok"].times) == 3


# ============================================================================ methods
CASES = make_cases(tiny=True)


@pytest.mark.parametrize("case_name", list(CASES))
def test_every_method_norms_or_a_reason(case_name):
    case = CASES[case_name]
    base, x, y = case.instantiate(CPU)
    ref = reference_norms(case, base, x, y)
    for m in methods_for(case):
        step = harness.guard(lambda: m.make(case, copy.deepcopy(base), x, y), CPU)
        out = step if isinstance(step, str) else harness.guard(step, CPU)
        if isinstance(out, str):
            assert out.startswith(("unsupported", "unavailable", "skipped")), (m.key, out)
        elif m.key == "plain":
            assert out is None
        else:
            assert max_rel_err(out, ref) < 1e-4, m.key


def test_backpack_refuses_layers_it_skips():
    case = CASES["cnn"]
    base, x, y = case.instantiate(CPU)
    m = next(m for m in methods_for(case) if m.key == "backpack")
    out = harness.guard(m.make(case, base, x, y), CPU)
    assert out.startswith("unsupported: BackPACK has no") and "GroupNorm" in out


# ============================================================================ end to end
def test_suite_end_to_end(capsys):
    from benchmarks import run_suite

    args = run_suite.parse_args(["--tiny", "--quick", "--only", "gs-default,opacus-ghost"])
    args.no_memory, args.profile_steps = True, 1
    case = make_cases(tiny=True)["demo"]
    res = run_suite.measure_case(case, CPU, harness.Timing.quick(), args, log=lambda m: None)
    by = {r["key"]: r for r in res["rows"]}
    assert set(by) == {"plain", "gs-default", "opacus-ghost"}
    assert by["gs-default"]["step_s"] > 0 and by["gs-default"]["norms_max_rel_err"] < 1e-4
    assert res["verdicts"]["opacus-ghost"]["gs-default"]["verdict"] in ("ahead", "level",
                                                                         "behind")
    att = res["attribution"][0]
    assert any(o["op"].startswith("gradstats") for o in att["ours"])
    md = report.suite_markdown({"meta": report.environment(CPU), "cases": [res]})
    assert "gradstats default" in md and "step() (ms)" in md


def test_memory_child():
    from benchmarks import run_suite

    args = SimpleNamespace(memory_steps=1, tiny=True)
    mem = run_suite._memory(make_cases(tiny=True)["demo"], "gs-default", args, CPU)
    assert isinstance(mem, dict), mem
    assert mem["peak_rss"] >= 0 and mem["calls"] == 1
