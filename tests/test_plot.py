"""``gradstats plot`` and the run log: a short demo run's log against its JSON report, the
figure's content against the log read independently, CSV against JSONL, and bad logs."""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from gradstats.apps.cli import main

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    argv = ["demo", "--epochs", "1", "--batch-size", "64", "--quiet", "--json", str(d / "r.json")]
    assert main([*argv, "--log", str(d / "run.jsonl")]) == 0
    assert main([*argv, "--log", str(d / "run.csv")]) == 0
    lines = [json.loads(x) for x in (d / "run.jsonl").read_text().splitlines()]
    return d, lines, json.loads((d / "r.json").read_text())


def test_log_is_the_reports_history_one_line_per_step(demo_run):
    _, lines, report = demo_run
    n_train, b = report["data"]["n_train"], report["config"]["batch_size"]
    assert len(lines) == report["steps"] == math.ceil(n_train / b)
    assert [r["step"] for r in lines] == list(range(1, len(lines) + 1))
    assert [r["batch_size"] for r in lines] == [b] * (len(lines) - 1) + [n_train % b or b]
    assert np.array_equal(np.cumsum([r["batch_size"] for r in lines]),
                          [r["examples"] for r in lines])
    assert all(r["lr"] == report["config"]["lr"] for r in lines)
    for line, h in zip(lines, report["history"]):
        assert {k: line[k] for k in h if k in line} == {k: h[k] for k in h if k in line}
        assert set(line["layers"]) == set(report["layers"])


def test_csv_log_reads_back_as_the_jsonl_log(demo_run):
    from gradstats.apps.plot import LAYER_KEYS, REQUIRED, read_run_log

    d, lines, _ = demo_run
    from_csv = read_run_log(d / "run.csv")
    assert len(from_csv) == len(lines)
    def same(a, b):  # null (an undefined value) reads back as null
        return a is None and b is None or (a is not None and b is not None and a == b)

    for c, j in zip(from_csv, lines):
        for k in REQUIRED + ("loss",):
            assert same(c[k], j[k]), (k, c[k], j[k])
        for name, vals in j["layers"].items():
            assert all(same(c["layers"][name][k], vals[k]) for k in LAYER_KEYS), name


def _line(ax, label):
    found = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(found) == 1, [ln.get_label() for ln in ax.get_lines()]
    return found[0]


def test_figure_shows_the_log(demo_run):
    from gradstats.apps.plot import plot_run, read_run_log

    d, lines, report = demo_run
    fig = plot_run(read_run_log(d / "run.jsonl"), "t")
    main_ax, layers_ax, sched_ax, loss_ax = fig.axes[:4]
    x = [r["examples"] for r in lines]

    ema = _line(main_ax, "smoothed (EMA)")
    assert list(ema.get_xdata()) == x
    assert list(ema.get_ydata()) == [r["b_simple_ema"] for r in lines]
    batch = _line(main_ax, "batch size used (examples per step)")
    assert list(batch.get_ydata()) == [r["batch_size"] for r in lines]
    assert "examples" in main_ax.get_ylabel() and main_ax.get_yscale() == "log"
    lo, hi = main_ax.get_ylim()
    emas = [r["b_simple_ema"] for r in lines]
    assert lo < min(emas) and max(emas) < hi and lo < min(r["batch_size"] for r in lines)
    band = main_ax.collections[-1].get_paths()[0].vertices[:, 1]
    ends = [(r["b_simple_lo"], r["b_simple_hi"]) for r in lines if r["b_simple_lo"] is not None]
    assert band.min() == pytest.approx(max(lo, min(a for a, _ in ends)))
    assert band.max() == pytest.approx(min(hi, max(b for _, b in ends)))

    names = sorted(report["layers"])
    assert len(layers_ax.get_lines()) == len(names) + 1
    for name in names:
        assert list(_line(layers_ax, name).get_ydata()) == [
            r["layers"][name]["b_simple_ema"] for r in lines]
    assert list(_line(layers_ax, "whole model").get_ydata()) == list(ema.get_ydata())

    assert list(_line(sched_ax, "learning rate").get_ydata()) == [r["lr"] for r in lines]
    assert sched_ax.get_yscale() == "linear"  # a constant learning rate spans no decades
    assert list(loss_ax.get_lines()[0].get_ydata()) == [r["loss"] for r in lines]
    for ax in (sched_ax, loss_ax):
        assert ax.get_xlabel() == "examples seen"
        assert ax.get_xlim()[0] <= x[0] and x[-1] <= ax.get_xlim()[1]
    tops = [c for c in main_ax.child_axes if c.get_xlabel() == "steps"]
    assert len(tops) == 1
    assert fig.get_suptitle() == "t"


def test_changing_schedules_on_log_axes(tmp_path):
    """A synthetic log whose batch size doubles and whose learning rate decays over decades:
    both schedule axes go logarithmic and the lines follow the log."""
    from gradstats.apps.plot import plot_run, read_run_log

    rng = np.random.default_rng()
    n = int(rng.integers(40, 80))
    batch = [int(8 * 2 ** (5 * i // n)) for i in range(n)]
    lr = list(0.5 * np.exp(-np.linspace(0, rng.uniform(3, 6), n)))
    ema = list(np.exp(rng.normal(4, 0.3, n)))
    path = tmp_path / "s.jsonl"
    with path.open("w") as fh:
        for i in range(n):
            rec = {"step": i + 1, "examples": int(sum(batch[:i + 1])), "batch_size": batch[i],
                   "lr": lr[i], "b_simple": None if i % 7 == 0 else ema[i] * 1.3,
                   "b_simple_ema": ema[i], "b_simple_lo": ema[i] / 2, "b_simple_hi": ema[i] * 2,
                   "tr_sigma": 1.0, "g2": 0.01, "tr_sigma_ema": 1.0, "g2_ema": 0.01,
                   "layers": {"enc.fc": {"b_simple": 1.0, "b_simple_ema": ema[i] / 3,
                                         "tr_sigma": 1.0, "g2": 1.0}}}
            fh.write(json.dumps(rec) + "\n")
    fig = plot_run(read_run_log(path))
    main_ax, layers_ax, sched_ax, loss_ax = fig.axes[:4]
    twin = [a for a in fig.axes if a.get_ylabel() == "batch size (examples per step)"][0]
    # the learning rate falls by more than a decade, the batch grows 8 -> 128
    assert sched_ax.get_yscale() == "log" and twin.get_yscale() == "log"
    assert list(_line(sched_ax, "learning rate").get_ydata()) == pytest.approx(lr)
    assert list(twin.get_lines()[0].get_ydata()) == batch
    assert [ln.get_label() for ln in layers_ax.get_lines()] == ["enc.fc", "whole model"]
    assert not loss_ax.axison  # no loss in this log
    points = main_ax.collections[0].get_offsets()
    assert len(points) == n - len(range(0, n, 7))  # the null per-step values are left out


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_command_writes_the_png(demo_run, capsys):
    d, lines, _ = demo_run
    assert main(["plot", str(d / "run.jsonl"), "--out", str(d / "fig.png")]) == 0
    assert _png_size(d / "fig.png") == (13 * 120, int(8.5 * 120))
    out = capsys.readouterr().out
    assert f"{len(lines)} steps, {lines[-1]['examples']} examples" in out
    assert main(["plot", str(d / "run.csv")]) == 0  # default: next to the log
    assert _png_size(d / "run.png") == (13 * 120, int(8.5 * 120))


@pytest.mark.parametrize("content, message", [
    ("", "holds no steps"),
    ("{not json}\n", "line 1: not JSON"),
    ("[1, 2]\n", "line 1: expected a JSON object"),
    ('{"step": 1, "examples": 8}\n', "line 1: missing keys batch_size, lr"),
])
def test_bad_logs_name_the_argument_and_the_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert main(["plot", str(path)]) == 2
    err = capsys.readouterr().err
    assert "argument RUN" in err and message in err, err
    assert not (tmp_path / "bad.png").exists()


def test_bad_paths(tmp_path, capsys, demo_run):
    d, _, _ = demo_run
    assert main(["plot", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read the run log" in capsys.readouterr().err
    assert main(["plot", str(d / "run.jsonl"), "--out", str(d / "run.jsonl")]) == 2
    assert "argument --out" in capsys.readouterr().err
    lines = (d / "run.jsonl").read_text().splitlines()
    swapped = tmp_path / "order.jsonl"
    swapped.write_text("\n".join([lines[1], lines[0]]) + "\n")
    assert main(["plot", str(swapped)]) == 2
    assert "line 2: step and examples must increase" in capsys.readouterr().err
