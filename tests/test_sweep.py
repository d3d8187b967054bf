"""``gradstats critical-batch``: the quick sweep end to end, its files against an independent
refit, and the command line's argument errors."""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest

from gradstats.apps.cli import main

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("critical_batch")
    assert main(["critical-batch", "--quick", "--quiet", "--no-plot", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "runs.csv").read_text().splitlines()))
    return out, rows, json.loads((out / "result.json").read_text())


def test_files_written(quick):
    out, rows, result = quick
    assert (out / "runs.csv").is_file() and (out / "result.json").is_file()
    assert not (out / "critical_batch.png").exists()  # --no-plot
    assert [int(r["batch_size"]) for r in rows] == [8, 32, 128]
    for r in rows:
        assert int(r["examples"]) == int(r["batch_size"]) * int(r["steps"])
    assert len(result["runs"]) == len(rows)


def test_fit_equals_independent_refit_of_csv(quick):
    """S = S_min + E_min/B by least squares in 1/B with weights 1/S^2 (critical.py's default,
    ``relative=True``), recomputed with numpy from the CSV alone."""
    _, rows, result = quick
    b = np.array([float(r["batch_size"]) for r in rows])
    s = np.array([float(r["steps"]) for r in rows])
    # np.polyfit weights multiply the residuals: w = 1/S minimises sum ((S - fit)/S)^2
    e_min, s_min = np.polyfit(1.0 / b, s, 1, w=1.0 / s)
    fit = result["fit"]
    assert fit["s_min"] == pytest.approx(s_min, rel=1e-9)
    assert fit["e_min"] == pytest.approx(e_min, rel=1e-9)
    assert fit["b_crit"] == pytest.approx(e_min / s_min, rel=1e-9)
    for name in ("s_min", "e_min", "b_crit"):
        lo, hi = fit[f"{name}_ci"]
        why = fit["bootstrap"]["undefined"].get(name)
        if why is None:
            assert 0 < lo <= fit[name] <= hi
        else:  # three runs may leave an end unresolved: said so, with no made-up number
            assert lo is None and hi is None
            assert why.startswith("undefined: not resolved by these runs")
    # and the CSV loads through the library's own reader
    from gradstats.critical import load_runs

    runs = load_runs(quick[0] / "runs.csv")
    assert np.array_equal(runs.steps, s)


def test_steps_fall_with_batch_size(quick):
    _, rows, result = quick
    steps = [int(r["steps"]) for r in sorted(rows, key=lambda r: int(r["batch_size"]))]
    assert all(a >= b for a, b in zip(steps, steps[1:])), steps
    assert steps[0] > steps[-1]


def test_runs_and_b_simple_are_consistent(quick):
    _, rows, result = quick
    target = result["config"]["target_loss"]
    best = {(r["batch_size"], r["lr"]): r for r in result["trials"] if r["status"] == "reached"}
    for r in rows:
        trial = best[(int(r["batch_size"]), float(r["lr"]))]
        assert trial["steps"] == [int(r["steps"])]
        # no reached trial at this batch size took fewer steps
        assert all(sum(t["steps"]) >= int(r["steps"]) for t in result["trials"]
                   if t["batch_size"] == int(r["batch_size"]) and t["status"] == "reached")
    bs = result["b_simple"]
    # the monitored rerun trains identically (hooks mode leaves the arithmetic alone)
    assert bs["same_steps_as_sweep"]
    assert bs["history"][-1]["loss"] <= target < bs["history"][-2]["loss"]
    assert len(bs["history"]) == bs["steps"]
    for key in ("at_start", "at_target", "run_average"):
        assert bs["whole_split"][key] > 0
    pred = bs["predicted"]
    assert 0 < pred["s_min"] <= bs["steps"]
    assert pred["b_crit"] == pytest.approx(pred["e_min"] / pred["s_min"])
    assert math.isfinite(result["wall_s"])


def test_deterministic_given_seed():
    from gradstats.apps.data import load_digits
    from gradstats.apps.sweep import QUICK, search_lr

    data = load_digits(QUICK.seed)
    runs = [search_lr(data, QUICK, 32) for _ in range(2)]
    (best_a, tried_a), (best_b, tried_b) = runs
    assert replace(best_a, wall_s=0.0) == replace(best_b, wall_s=0.0)
    assert [replace(t, wall_s=0.0) for t in tried_a] == [replace(t, wall_s=0.0) for t in tried_b]
    assert len(tried_a) >= QUICK.lr_candidates


def test_report_explains_the_intervals_with_units(quick):
    """The bootstrap counts in the report add up (every resample has a fit; those without a
    positive B_crit are counted by cause), and the text gives each number its unit and each
    interval either two positive ends or the reason it is undefined."""
    from gradstats.apps.critical_batch import format_result

    _, rows, result = quick
    boot, fit = result["fit"]["bootstrap"], result["fit"]
    assert boot["resamples"] == fit["n_boot"] == result["config"]["n_boot"]
    assert boot["usable"] <= boot["resamples"]
    bad = boot["resamples"] - boot["usable"]
    assert bad <= boot["s_min_nonpositive"] + boot["e_min_nonpositive"] <= 2 * bad
    text = format_result(result)
    flat = " ".join(text.split())  # the explanation is wrapped
    assert f"{boot['resamples']} resamples of the {len(rows)} runs" in flat
    assert f"{boot['usable']} of the {boot['resamples']} resamples give a positive" in flat
    for name, unit in (("S_min", "steps"), ("E_min", "examples"),
                       ("B_crit = E_min/S_min", "examples")):
        m = re.search(re.escape(name) + rf" = ([0-9.e+]+) {unit}, 95% interval (.*)", flat)
        assert m is not None, name
        shown = re.match(rf"\[([0-9.e+]+), ([0-9.e+]+)\] {unit}", m.group(2))
        if shown is None:
            assert m.group(2).startswith("undefined: not resolved by these runs"), name
        else:
            assert 0 < float(shown.group(1)) <= float(shown.group(2)), name


def test_plot_needs_matplotlib_before_the_sweep(monkeypatch, tmp_path, capsys):
    import importlib.util

    import gradstats.apps.critical_batch as cb

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(cb, "run_sweep", lambda *a, **k: pytest.fail("swept anyway"))
    assert main(["critical-batch", "--quick", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'gradstats[demo]'" in err and "--no-plot" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, flag", [
    (["--batch-sizes", "8,x"], "--batch-sizes"),
    (["--batch-sizes", "32"], "--batch-sizes"),
    (["--batch-sizes", "1,8"], "--batch-sizes"),
    (["--batch-sizes", "8,100000"], "--batch-sizes"),
    (["--target-loss", "0"], "--target-loss"),
    (["--target-loss", "-1"], "--target-loss"),
    (["--target-loss", "50"], "--target-loss"),
    (["--seed", "abc"], "--seed"),
    (["--reference-batch", "7"], "--reference-batch"),
    (["--n-boot", "-3"], "--n-boot"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_arguments_exit_nonzero_naming_the_flag(argv, flag, capsys, tmp_path):
    code = main(["critical-batch", "--quick", "--quiet", "--out", str(tmp_path), *argv])
    assert code != 0
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "result.json").exists()
