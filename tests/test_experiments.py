"""``gradstats experiment``: the quick profiles end to end (files written, fields present and
consistent with each other and with independent recomputations), the pieces the headline numbers
come from checked on synthetic inputs with known answers, the text corpus and its pinning, the
transformer under the monitor against per-example autograd, and the command line's errors."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradstats.apps.cli import main

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

NAMES = ("e1", "e2", "adam", "e3")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``gradstats experiment all --quick`` once; every experiment's files, parsed."""
    out = tmp_path_factory.mktemp("experiments")
    old = torch.get_num_threads()
    try:
        assert main(["experiment", "all", "--quick", "--quiet", "--no-plot", "--out",
                     str(out)]) == 0
    finally:
        torch.set_num_threads(old)
    res = {n: json.loads((out / n / "result.json").read_text()) for n in NAMES}
    rows = {n: list(csv.DictReader((out / n / f"{n}.csv").read_text().splitlines()))
            for n in NAMES}
    return out, res, rows


# ----------------------------------------------------------------------------- end to end
def test_every_experiment_writes_json_and_csv(quick):
    out, res, rows = quick
    for n in NAMES:
        assert rows[n], n
        assert res[n]["quick"] is True
        assert not (out / n / f"{n}.png").exists()  # --no-plot


def _draw(quick, names, tmp_path):
    import importlib

    _, res, _ = quick
    for n in names:
        mod = importlib.import_module(f"gradstats.apps.experiments.{n}")
        mod.plot(res[n], tmp_path / f"{n}.png")
        png = (tmp_path / f"{n}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_adam_png_from_the_result(quick, tmp_path):
    _draw(quick, ["adam"], tmp_path)


@pytest.mark.slow
def test_every_png_from_the_results(quick, tmp_path):
    _draw(quick, NAMES, tmp_path)


def test_sweeps_are_shared_not_repeated(quick):
    """E1, E2, the Adam experiment and E3 read the same sweep per (task, optimizer): one file
    each under sweeps/, and the keys in the results agree."""
    out, res, _ = quick
    files = sorted(p.name for p in (out / "sweeps").iterdir())
    stems = ["-".join(f.split("-")[:-1]) for f in files]
    assert len(stems) == len(set(stems)) == 4, files  # mlp, cnn, text adam, text beta 0
    e1 = res["e1"]["tasks"]
    for task in ("digits-mlp", "digits-cnn"):
        assert res["e2"]["tasks"][task]["sweep_key"] == e1[task]["sweep_key"]
        assert res["e3"]["tasks"][task]["sweep_key"] == e1[task]["sweep_key"]
    assert res["adam"]["settings"]["default"]["sweep_key"] == e1["text"]["sweep_key"]


def test_e1_runs_fit_and_units(quick):
    _, res, rows = quick
    for task, e in res["e1"]["tasks"].items():
        mine = [r for r in rows["e1"] if r["task"] == task]
        k = e["tokens_per_example"]
        assert k == (16 if task == "text" else 1)
        for r in mine:
            b, s = int(r["batch_size"]), int(r["steps"])
            assert int(r["examples"]) == b * s  # fixed batch size
            assert int(r["tokens"]) == b * s * k and int(r["batch_tokens"]) == b * k
        # the fit is S = S_min + E_min/B, least squares in 1/B with weights 1/S^2
        b = np.array([float(r["batch_size"]) for r in mine])
        s = np.array([float(r["steps"]) for r in mine])
        if "error" in e["fit"]:
            continue
        e_min, s_min = np.polyfit(1.0 / b, s, 1, w=1.0 / s)
        assert e["fit"]["s_min"] == pytest.approx(s_min, rel=1e-9)
        assert e["fit"]["b_crit"] == pytest.approx(e_min / s_min, rel=1e-9)
        for v in e["noise_scales"].values():
            if v["value"] is not None and v["b_crit_over_it"] is not None:
                assert v["b_crit_over_it"] == pytest.approx(e["fit"]["b_crit"] / v["value"])
        if k > 1:
            assert e["in_tokens"]["b_crit"] == pytest.approx(k * e["fit"]["b_crit"])
        # each batch size's best learning rate reached the target with every seed
        assert len(mine) == len(e["batch_sizes"]) * (2 if task == "digits-mlp" else 1)
        assert all(len(r["steps"]) == len(mine) // len(e["batch_sizes"])
                   for r in e["batch_sizes"])


def test_e2_prediction_recomputed(quick):
    _, res, rows = quick
    for task, e in res["e2"]["tasks"].items():
        p = e["predictions"]["early"]
        for i, b in enumerate(e["sizes"]):
            if p["eta_max"] is not None and p["eta_max"] > 0 and p["b_noise"] >= 0:
                assert p["eta_star"][i] == pytest.approx(p["eta_max"] / (1 + p["b_noise"] / b))
                assert p["ratios"][i] == pytest.approx(p["c"] * p["eta_star"][i] / e["best_lr"][i])
            lr, grid = e["best_lr"][i], e["best_grid_lr"][i]
            f = e["lr_factor"]
            assert grid / f * (1 - 1e-9) <= lr <= grid * f * (1 + 1e-9)  # vertex clipped
        if p["c"] is not None:
            logs = [math.log(b / a) for a, b in zip(p["eta_star"], e["best_lr"])]
            assert math.log(p["c"]) == pytest.approx(sum(logs) / len(logs))
            assert p["within_tolerance"] == (max(abs(r - 1) for r in p["ratios"]) <= 0.3)
        assert len([r for r in rows["e2"] if r["task"] == task]) == len(e["sizes"])


def test_adam_curve_recomputed(quick):
    _, res, _ = quick
    for e in res["adam"]["settings"].values():
        m = e["early"]
        for b, pred in zip(e["sizes"], e["predicted"]):
            if pred is None:
                continue
            beta = (1 + math.pi * m["kappa2"] / (2 * b)) ** -0.5
            want = m["l1"] * beta / (m["tr_h"] + beta ** 2 * (m["s_h_s"] - m["tr_h"]))
            assert pred == pytest.approx(want, rel=1e-9)
        top = max(e["best_lr"])
        assert e["shape"]["measured"] == pytest.approx([x / top for x in e["best_lr"]])
        g = e["grid"]
        assert g["argmax_size"] == e["sizes"][int(np.argmax(e["best_lr"]))]
        assert g["surge"] is False or g["b_peak"] is not None
    assert res["adam"]["settings"]["beta0"]["optimizer"].startswith("Adam (beta1 0, beta2 0")


def test_e3_runs_consistent_with_frontier(quick):
    _, res, _ = quick
    for e in res["e3"]["tasks"].values():
        fit = e["fit"]
        for kind, runs in e["runs"].items():
            assert len(runs) == 3
            for r in runs:
                sizes = [t[2] for t in r["trace"]]
                assert all(e["b_min"] <= b <= e["b_max"] and b % e["b_min"] == 0 for b in sizes)
                if r["status"] != "reached":
                    continue
                # examples = the batch sizes of the first S steps (the first at B_min)
                used = [e["b_min"]] + sizes[:r["steps"] - 1]
                assert r["examples"] == sum(used)
                front = fit["s_min"] * r["examples"] / (r["examples"] - fit["e_min"])
                assert r["frontier_steps_at_examples"] == pytest.approx(front)
            if kind == "ramp":
                assert all(a <= b for r in runs for a, b in zip([t[2] for t in r["trace"]],
                                                               [t[2] for t in r["trace"]][1:]))
            v = e[kind]
            if "savings" in v:
                per = [1 - r["steps"] / r["frontier_steps_at_examples"] for r in runs]
                assert v["savings"]["mean"] == pytest.approx(np.mean(per))
                assert v["target_met"] == (v["savings"]["mean"] >= 0.25)


# ----------------------------------------------------------------------------- synthetic
def test_parabola_vertex_recovers_known_minimum():
    from gradstats.apps.experiments.search import parabola_vertex

    rng = np.random.default_rng(1)
    for _ in range(20):
        u0, h, a, v = rng.normal(), rng.uniform(0.1, 1), rng.uniform(0.1, 5), rng.normal(0, .3)
        u = (u0 - h, u0, u0 + h)
        vert = u0 + v * h
        y = tuple(a * (x - vert) ** 2 + 3.0 for x in u)
        got = parabola_vertex(u, y)
        assert got == pytest.approx(min(max(vert, u[0]), u[2]))
    assert parabola_vertex((0, 1, 2), (1.0, 2.0, 1.0)) is None  # opens downward


def test_crossing_is_the_first_step_below_target():
    from gradstats.apps.experiments.runner import crossing

    rng = np.random.default_rng(2)
    for _ in range(50):
        s0, k = int(rng.integers(0, 100)), int(rng.integers(1, 30))
        l0, l1 = rng.uniform(1.5, 3.0), rng.uniform(0.1, 1.0)
        target = rng.uniform(l1, l0)
        # brute force on the straight line between the two evaluations
        first = next(s for s in range(s0 + 1, s0 + k + 1)
                     if l0 + (l1 - l0) * (s - s0) / k <= target + 1e-12)
        assert crossing(s0, l0, s0 + k, l1, target) == first
    assert crossing(4, 2.0, 5, 1.0, 1.5) == 5  # every step evaluated: the step itself


def test_fit_constant_and_curve_recover_known_parameters():
    from gradstats.apps.experiments.e2 import fit_constant, fit_curve

    rng = np.random.default_rng(3)
    sizes = [8, 16, 32, 64, 128, 256, 512]
    for _ in range(5):
        eta, bn, c = rng.uniform(0.1, 5), float(np.exp(rng.uniform(1, 6))), rng.uniform(0.2, 3)
        pred = [eta / (1 + bn / b) for b in sizes]
        got = fit_constant([c * p for p in pred], pred)
        assert got["c"] == pytest.approx(c) and got["within_tolerance"]
        assert got["ratios"] == pytest.approx([1.0] * len(sizes))
        ff = fit_curve(sizes, [c * p for p in pred])
        assert ff["b_noise"] == pytest.approx(bn, rel=0.01)
        assert ff["eta_max"] == pytest.approx(c * eta, rel=0.01)
    off = fit_constant([1.0, 1.0], [1.0, 1.5])  # one constant cannot match both
    assert off["max_deviation"] == pytest.approx(math.sqrt(1.5) - 1) and off["within_tolerance"]
    assert not fit_constant([1.0, 1.0], [1.0, 3.0])["within_tolerance"]


def test_savings_against_an_exact_frontier():
    from gradstats.apps.experiments.e3 import frontier_examples, frontier_steps, savings_interval

    rng = np.random.default_rng(4)
    s_min, e_min = rng.uniform(20, 60), rng.uniform(1000, 5000)
    runs = [{"batch_size": b, "steps": s_min + e_min / b} for b in (8, 16, 32, 64, 128, 256)
            for _ in range(2)]
    saved = rng.uniform(0.1, 0.5)
    ex = list(rng.uniform(1.5, 4, 3) * e_min)
    steps = [(1 - saved) * frontier_steps(s_min, e_min, x) for x in ex]
    sv = savings_interval(runs, steps, ex, n_boot=50)
    assert sv["mean"] == pytest.approx(saved) and sv["ci"] == pytest.approx([saved, saved])
    for x in ex:
        assert frontier_examples(s_min, e_min, frontier_steps(s_min, e_min, x)) == \
            pytest.approx(x)
    assert frontier_steps(s_min, e_min, e_min) == math.inf


def test_grid_peak_finds_a_known_surge():
    from gradstats.apps.experiments.adam import grid_peak
    from gradstats.scaling import adam_plateau_batch_size, adam_sign_descent_lr

    kappa2, off = 200.0, 9.0  # beta_noise = 1/3: a peak at pi kappa2 (1/9) / (2 (8/9))
    peak = adam_plateau_batch_size(kappa2, off, 0.0)
    assert peak == pytest.approx(math.pi * kappa2 / 16)
    sizes = [2.0 ** (k / 4) for k in range(40)]
    best = [adam_sign_descent_lr(1.0, 1.0, 1.0 + off, kappa2, b) for b in sizes]
    g = grid_peak(sizes, best, 2 ** 0.25)
    assert g["surge"] and g["b_peak"] == pytest.approx(peak, rel=0.05)
    mono = grid_peak(sizes, [adam_sign_descent_lr(1.0, 1.0, 1.5, kappa2, b) for b in sizes],
                     2 ** 0.25)
    assert not mono["surge"] and mono["b_peak"] is None


def test_runner_takes_the_steps_sweep_takes():
    """The generic runner against :func:`gradstats.apps.sweep.train_to_target` (its own loop)."""
    from gradstats.apps.experiments.runner import Optim, train
    from gradstats.apps.experiments.tasks import TaskConfig, make_task
    from gradstats.apps.sweep import train_to_target

    task = make_task(TaskConfig("digits-mlp", hidden=16))
    for b, lr, seed, limit in ((16, 0.5, 3, 60), (64, 0.1, 1, 15)):
        mine = train(task, Optim(), lr, 0.5, seed=seed, batch_size=b, limit=limit)
        ref, _ = train_to_target(task.data, b, lr, 0.5, seed=seed, hidden=16, limit=limit)
        assert (mine.status, mine.steps) == (ref.status, ref.steps)
        assert mine.examples == b * mine.steps
        assert mine.final_loss == pytest.approx(ref.final_loss, rel=1e-6)


# ----------------------------------------------------------------------------- text
def _fake_stdlib(tmp_path, n=12):
    root = tmp_path / "lib"
    root.mkdir()
    for i in range(n):
        (root / f"m{i:02d}.py").write_text(f"x = {i}  # caf\u00e9\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "sub.py").write_text("ignored")  # not top level: not selected
    return root, {f"m{i:02d}.py": hashlib.sha256((root / f"m{i:02d}.py").read_bytes())
                  .hexdigest() for i in range(n)}


def test_corpus_rule_split_and_pinning(tmp_path):
    from gradstats.apps.text import CorpusError, encode, load_corpus

    root, manifest = _fake_stdlib(tmp_path)
    c = load_corpus(stdlib=str(root), manifest=manifest)
    assert c.pinned and c.val_files == ("m09.py",) and len(c.train_files) == 11
    assert torch.equal(c.val, encode("x = 9  # caf\u00e9\n\n"))
    assert int(c.val[-3]) == 0 and int(encode("A")[0]) == 65  # non-ASCII -> 0
    (root / "m03.py").write_text("changed")
    with pytest.raises(CorpusError, match="m03.py: SHA-256"):
        load_corpus(stdlib=str(root), manifest=manifest)
    loose = load_corpus(pinned=False, stdlib=str(root), manifest=manifest)
    assert not loose.pinned and loose.digest != c.digest


@pytest.mark.skipif(sys.version.split()[0] != "3.11.7", reason="the manifest pins CPython 3.11.7")
def test_pinned_corpus_matches_this_interpreter():
    from gradstats.apps.text import load_corpus

    c = load_corpus()
    assert c.pinned and len(c.train) > 4_000_000 and len(c.val) > 400_000


def test_transformer_monitor_norms_match_per_example_autograd():
    """The monitor's per-example squared gradient norms of the char transformer (function-level
    coverage of the position table included) against torch.func per-example gradients."""
    from gradstats.apps.text import make_char_transformer
    from gradstats.monitor import GradStatsMonitor

    torch.manual_seed(0)
    model = make_char_transformer(1, context=8, d=16, n_layer=1, n_head=2).double()
    x = torch.randint(0, 128, (5, 8))
    y = torch.randint(0, 128, (5, 8))
    mon = GradStatsMonitor(model, loss_reduction="mean")
    out = model(x)
    F.cross_entropy(out.reshape(-1, 128), y.reshape(-1)).backward()
    st = mon.step()
    mon.detach()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        o = torch.func.functional_call(model, p, (xi[None],))
        return F.cross_entropy(o.reshape(-1, 128), yi)

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    want = sum(g.reshape(5, -1).pow(2).sum(1) for g in grads.values())
    assert torch.allclose(st.per_example_sq_norms.double(), want, rtol=1e-6)


# ----------------------------------------------------------------------------- command line
def test_cli_refuses_bad_names(capsys):
    assert main(["experiment", "e9"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["experiment", "e1", "--tasks", "digits-mlp,nope"]) == 2
    assert "comma-separated task names" in capsys.readouterr().err
