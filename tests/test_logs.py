"""gradstats.logs: the record of a step against the monitor's statistics, the JSONL and CSV
files read back (by the plot's own reader) as the records written, non-finite values through
JSON, the TensorBoard event files read back with tensorboard's reader, and bad arguments."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import gradstats
from gradstats.apps.plot import read_run_log
from gradstats.logs import (
    PREFIX,
    CsvLogger,
    JsonlLogger,
    MultiLogger,
    TensorBoardLogger,
    open_run_log,
    record_from_line,
    record_of,
    run_log_line,
)


def _run(steps: int = 5, seed: int = 0):
    """StepStats of a few SGD steps of a small MLP (the first ones have no interval yet)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = []
    with gradstats.GradStatsMonitor(model, beta=0.5) as mon:
        for _ in range(steps):
            x = torch.randn(16, 4, generator=g)
            y = x[:, :2] + 0.3 * torch.randn(16, 2, generator=g)
            nn.functional.mse_loss(model(x), y).backward()
            out.append(mon.step())
            opt.step()
            opt.zero_grad()
    return out


@pytest.fixture(scope="module")
def stats():
    return _run()


def _records(stats):
    seen, recs = 0, []
    for s in stats:
        seen += s.n
        recs.append(record_of(s, lr=0.05, examples=seen, loss=1.0 / s.step))
    return recs


def _same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) \
        or a == b


def test_record_holds_the_step_statistics(stats):
    s = stats[-1]
    rec = record_of(s, lr=0.05, examples=80, b_noise=12.5, eta_max=0.3)
    lo, hi = s.b_simple_interval
    want = {"b_simple": s.b_simple, "b_simple_ema": s.b_simple_ema, "b_simple_lo": lo,
            "b_simple_hi": hi, "b_simple_stderr": s.b_simple_stderr, "tr_sigma": s.tr_sigma,
            "g2": s.g2, "tr_sigma_ema": s.tr_sigma_ema, "g2_ema": s.g2_ema, "lr": 0.05,
            "batch_size": 16, "examples": 80, "b_noise": 12.5, "eta_max": 0.3}
    for k, v in want.items():
        assert _same(rec[PREFIX + k], v), k
    assert 0 < lo < s.b_simple_ema < hi  # five steps at beta = 0.5: resolved
    names = list(s.layers)
    assert names == ["0", "2"]
    for name in names:
        ls = s.layers[name]
        for k in ("b_simple", "b_simple_ema", "tr_sigma", "g2", "tr_sigma_ema", "g2_ema"):
            assert _same(rec[f"{PREFIX}layers/{name}/{k}"], getattr(ls, k)), (name, k)
    # the layers add up to the whole model (the statistics are sums over parameters)
    tr = sum(rec[f"{PREFIX}layers/{n}/tr_sigma"] for n in names)
    assert tr == pytest.approx(rec[PREFIX + "tr_sigma"], rel=1e-9)
    assert all(isinstance(v, (int, float)) for v in rec.values())
    assert "gradstats/loss" not in rec  # optional keys only when given


def test_jsonl_round_trip_with_non_finite_values(tmp_path, stats):
    recs = _records(stats)
    recs[0][PREFIX + "b_noise"] = math.inf  # any non-finite number becomes null
    assert any(math.isnan(v) for v in recs[0].values())  # no interval after one step
    path = tmp_path / "run.jsonl"
    with JsonlLogger(path) as log:
        for i, r in enumerate(recs, start=1):
            log.log(r, i)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    lines = [json.loads(x, parse_constant=no_constants) for x in path.read_text().splitlines()]
    assert len(lines) == len(recs) and lines[0]["b_simple_lo"] is None
    assert lines[0]["b_noise"] is None
    for i, (line, r) in enumerate(zip(lines, recs), start=1):
        back, step = record_from_line(line)
        assert step == i and set(back) == set(r)
        for k, v in r.items():
            assert _same(back[k], v if math.isfinite(v) else math.nan), k
    # the plot's reader takes the file as it is, nested layers included
    read = read_run_log(path)
    assert [x["b_simple_ema"] for x in read] == [x["b_simple_ema"] for x in lines]
    assert read[-1]["layers"]["2"]["g2_ema"] == recs[-1][PREFIX + "layers/2/g2_ema"]


def test_csv_grows_its_header_and_reads_as_the_jsonl(tmp_path, stats):
    recs = _records(stats)
    recs[3][PREFIX + "b_noise"] = 7.0  # a column that appears late
    csv_path, jsonl_path = tmp_path / "run.csv", tmp_path / "run.jsonl"
    with open_run_log(csv_path) as c, open_run_log(jsonl_path) as j:
        assert isinstance(c, CsvLogger) and isinstance(j, JsonlLogger)
        for i, r in enumerate(recs, start=1):
            c.log(r, i)
            j.log(r, i)
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[0] == "step" and "b_noise" in header and "layers.0.b_simple_ema" in header
    from_csv, from_jsonl = read_run_log(csv_path), read_run_log(jsonl_path)
    assert len(from_csv) == len(recs)
    for c, j in zip(from_csv, from_jsonl):
        for k in ("step", "examples", "batch_size", "lr", "b_simple", "b_simple_ema",
                  "b_simple_lo", "b_simple_hi", "tr_sigma", "g2", "loss"):
            assert c[k] == j[k] or (c[k] is None and j[k] is None), k
        assert c["layers"] == j["layers"]
    assert [r.get("b_noise") for r in from_csv] == [None, None, None, 7.0, None]


def test_run_log_line_nests_layers_with_dots_in_names():
    rec = {PREFIX + "b_simple": 2.0, PREFIX + "layers/enc.block.0/g2": math.nan, "epoch": 3}
    line = run_log_line(rec, 9)
    assert line == {"step": 9, "b_simple": 2.0, "epoch": 3,
                    "layers": {"enc.block.0": {"g2": None}}}


def test_tensorboard_event_files_hold_the_scalars(tmp_path, stats):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recs = _records(stats)
    log = MultiLogger(TensorBoardLogger(tmp_path / "tb"), JsonlLogger(tmp_path / "r.jsonl"))
    for i, r in enumerate(recs, start=1):
        log.log(r, i)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {PREFIX + k for k in ("b_simple", "b_simple_ema", "b_simple_lo", "b_simple_hi",
                                 "tr_sigma", "g2", "lr", "examples", "batch_size")} <= tags
    assert PREFIX + "layers/2/b_simple_ema" in tags
    events = acc.Scalars(PREFIX + "b_simple_ema")
    assert [e.step for e in events] == list(range(1, len(recs) + 1))
    for e, r in zip(events, recs):
        assert e.value == pytest.approx(r[PREFIX + "b_simple_ema"], rel=1e-6)
    lo = acc.Scalars(PREFIX + "b_simple_lo")
    assert math.isnan(lo[0].value) and lo[-1].value == pytest.approx(
        recs[-1][PREFIX + "b_simple_lo"], rel=1e-6)
    assert (tmp_path / "r.jsonl").read_text().count("\n") == len(recs)


def test_tensorboard_logger_takes_an_existing_writer(tmp_path):
    class Writer:
        def __init__(self):
            self.seen, self.flushed = [], 0

        def add_scalar(self, tag, value, step):
            self.seen.append((tag, value, step))

        def flush(self):
            self.flushed += 1

    w = Writer()
    log = TensorBoardLogger(writer=w)
    log.log({PREFIX + "b_simple": 3, PREFIX + "flag": True}, 4)
    log.close()  # not ours to close: flushed only
    assert w.seen == [(PREFIX + "b_simple", 3.0, 4), (PREFIX + "flag", 1.0, 4)]
    assert w.flushed == 1


def test_bad_arguments_are_named(tmp_path, stats):
    with pytest.raises(ValueError, match="log_dir"):
        TensorBoardLogger()
    with pytest.raises(ValueError, match="exactly one"):
        TensorBoardLogger(tmp_path, writer=object())
    with pytest.raises(TypeError, match="add_scalar"):
        TensorBoardLogger(writer=object())
    with pytest.raises(TypeError, match="log"):
        MultiLogger(JsonlLogger(tmp_path / "a.jsonl"), "not a logger")
    with pytest.raises(ValueError, match="lr"):
        record_of(stats[0], lr="fast")
