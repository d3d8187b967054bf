"""The demo and the command line: the monitor's B_simple in the demo's history against an
independent recomputation from explicit per-example gradients (torch.func.vmap(grad))."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from gradstats.apps.cli import COMMANDS, build_parser, main

#: (mode, batch size, steps checked): the default run behind the JSON, and a larger batch in
#: hooks mode (a partial last batch of 1437 - 11 * 128 = 29 examples at step 11).
CASES = [("fused", 32, (0, 7, 30, 44)), ("hooks", 128, (0, 5, 11))]


def _independent(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, m: int
                 ) -> tuple[torch.Tensor, float]:
    """Per-example squared norms ``|g_i|^2`` and ``B_simple`` from per-example gradients of
    the cross-entropy of a fresh copy of ``model``:
    ``tr = (sum_i |g_i|^2 - n |gbar|^2)/(n-1)``, ``|G|^2 = |gbar|^2 - tr (1/n - 1/m)``."""
    from gradstats.apps.models import make_mlp

    fresh = make_mlp(model[0].out_features, seed=12345)
    fresh.load_state_dict(model.state_dict())
    params = {k: v.detach().clone() for k, v in fresh.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(fresh, p, (xi[None],)), yi[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([v.reshape(len(x), -1) for v in g.values()], 1).double()
    n = len(x)
    sq = flat.square().sum(1)
    gbar2 = float(flat.mean(0).square().sum())
    tr = (float(sq.sum()) - n * gbar2) / (n - 1)
    g2 = gbar2 - tr * (m - n) / (n * m)
    return sq, tr / g2


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory) -> dict:
    pytest.importorskip("sklearn")
    path = tmp_path_factory.mktemp("demo") / "report.json"
    assert main(["demo", "--epochs", "1", "--quiet", "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.mark.parametrize("mode, batch, steps", CASES)
def test_history_matches_per_example_autograd(demo_json: dict, mode: str, batch: int,
                                              steps: tuple[int, ...]) -> None:
    from gradstats.apps.demo import DemoConfig, run_demo

    m = demo_json["data"]["n_train"]
    seen: dict[int, tuple[torch.Tensor, float, torch.Tensor, float]] = {}

    def on_step(step, model, x, y, stats):
        if step in steps:
            sq, b = _independent(model, x, y, m)
            seen[step] = (sq, b, stats.per_example_sq_norms, stats.b_simple)

    report = run_demo(DemoConfig(epochs=1, mode=mode, batch_size=batch), on_step=on_step)
    assert sorted(seen) == list(steps)
    assert report["steps"] == math.ceil(m / batch)
    hist = demo_json["history"] if batch == 32 else report["history"]
    assert len(hist) == math.ceil(m / batch)
    assert all(h["b_simple"] is not None and math.isfinite(h["b_simple"]) and h["b_simple"] > 0
               for h in hist)
    assert all(math.isfinite(h["b_simple_ema"]) for h in hist)
    for step, (sq, b_ref, sq_mon, b_mon) in seen.items():
        torch.testing.assert_close(sq_mon, sq, rtol=1e-5, atol=0)
        assert b_mon == pytest.approx(b_ref, rel=1e-5), step
        assert hist[step]["b_simple"] == pytest.approx(b_ref, rel=1e-5), step


def test_json_report_shape(demo_json: dict) -> None:
    assert demo_json["config"]["mode"] == "fused"
    assert set(demo_json["layers"]) == {"0", "2", "4"}
    assert 0.5 < demo_json["final"]["test_accuracy"] <= 1.0
    lo, b, hi = (demo_json["final"][k] for k in ("b_simple_lo", "b_simple_ema", "b_simple_hi"))
    assert lo < b < hi
    rows = demo_json["batch_advice"]["rows"]
    assert [r["batch_size"] for r in rows] == sorted(r["batch_size"] for r in rows)
    b = demo_json["batch_advice"]["b_noise_estimate"]  # the progress-weighted B_simple
    for r in rows:
        assert r["lr_fraction"] == pytest.approx(1 / (1 + b / r["batch_size"]))
        assert r["steps_factor"] * r["lr_fraction"] == pytest.approx(1.0)


def test_advice_uses_the_progress_weighted_b_simple(demo_json: dict) -> None:
    """S_min = sum_t 1/(1 + b_t/B_t), E_min = sum_t b_t/(1 + b_t/B_t) over the smoothed values
    of the history, recomputed here; the advice uses E_min/S_min, not the final value, and the
    run itself lies on the predicted hyperbola (S_min + E_min/B = S at a fixed batch B)."""
    hist = demo_json["history"]
    s_min = sum(1 / (1 + h["b_simple_ema"] / h["batch_size"]) for h in hist)
    e_min = sum(h["b_simple_ema"] / (1 + h["b_simple_ema"] / h["batch_size"]) for h in hist)
    pw = demo_json["b_simple_progress_weighted"]
    assert (pw["s_min"], pw["e_min"]) == pytest.approx((s_min, e_min), rel=1e-12)
    assert demo_json["batch_advice"]["b_noise_estimate"] == pytest.approx(e_min / s_min)
    emas = [h["b_simple_ema"] for h in hist]
    assert min(emas) < e_min / s_min < max(emas)
    assert e_min / s_min != pytest.approx(demo_json["final"]["b_simple_ema"], rel=0.01)
    b = demo_json["config"]["batch_size"]
    full = [h for h in hist if h["batch_size"] == b]
    s_full = sum(1 / (1 + h["b_simple_ema"] / b) for h in full)
    e_full = sum(h["b_simple_ema"] / (1 + h["b_simple_ema"] / b) for h in full)
    assert s_full + e_full / b == pytest.approx(len(full))


def test_report_text_labels_both_values_with_units(tmp_path, capsys) -> None:
    pytest.importorskip("sklearn")
    path = tmp_path / "r.json"
    assert main(["demo", "--epochs", "1", "--batch-size", "64", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    pw, final = report["batch_advice"]["b_noise_estimate"], report["final"]["b_simple_ema"]
    flat = " ".join(out.split())
    for label, value in (("B_simple, progress-weighted over the run:", pw),
                         ("B_simple at the end of training:", final)):
        m = re.search(re.escape(label) + r" ([0-9.]+) examples", flat)
        assert m is not None, label
        assert float(m.group(1)) == pytest.approx(value, rel=0.006), label  # 3 figures shown
    assert "batch 64 examples" in out and f"({report['steps']} steps)" in out


def test_mode_off_reports_no_noise_scale(tmp_path, capsys) -> None:
    pytest.importorskip("sklearn")
    path = tmp_path / "off.json"
    assert main(["demo", "--epochs", "1", "--mode", "off", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "final held-out accuracy" in out and "B_simple" not in out
    report = json.loads(path.read_text())
    assert "layers" not in report and "b_simple" not in report["history"][0]


@pytest.mark.parametrize("argv, flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "1"], "--batch-size"),
    (["--batch-size", "100000"], "--batch-size"),
    (["--epochs", "-3"], "--epochs"),
    (["--lr", "nan"], "--lr"),
    (["--mode", "both"], "--mode"),
    (["--beta", "1"], "--beta"),
])
def test_bad_arguments_exit_nonzero_naming_the_argument(argv, flag, capsys) -> None:
    if argv[0] == "--batch-size" and argv[1] in ("1", "100000"):
        pytest.importorskip("sklearn")
    assert main(["demo", *argv]) != 0
    err = capsys.readouterr().err
    assert f"argument {flag}" in err, err


def test_cli_without_command_and_registry(capsys) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert "demo" in COMMANDS and "plot" in COMMANDS and "bench" not in COMMANDS
    sub = build_parser()._subparsers._group_actions[0].choices
    assert set(sub) == set(COMMANDS)
    assert main(["bench"]) == 2


def test_version_and_help_do_not_import_torch() -> None:
    code = ("import sys, contextlib, io, gradstats.apps.cli as c\n"
            "for argv in (['--version'], ['--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        assert c.main(argv) == 0, argv\n"
            "    assert 'gradstats' in out.getvalue(), argv\n"
            "assert 'demo' in out.getvalue() and 'critical-batch' in out.getvalue()\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_plot_without_matplotlib_fails_before_training(monkeypatch, tmp_path, capsys) -> None:
    import importlib.util

    import gradstats.apps.demo as demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("trained anyway"))
    png = tmp_path / "p.png"
    assert main(["demo", "--plot", str(png)]) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'gradstats[demo]'" in err
    assert not png.exists()


def test_plot_and_log_need_the_monitor(tmp_path, capsys) -> None:
    for flag in ("--plot", "--log"):
        assert main(["demo", "--mode", "off", flag, str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and "--mode fused" in err
    assert not list(tmp_path.iterdir())


def test_missing_sklearn_is_a_clear_message(monkeypatch, capsys) -> None:
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    assert main(["demo", "--epochs", "1"]) == 1
    assert "pip install 'gradstats[demo]'" in capsys.readouterr().err
