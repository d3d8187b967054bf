"""``gradstats plot RUN``: the noise scale, the batch size and the schedules of a logged run.

The run log
-----------
JSONL (``.jsonl``): one JSON object per line, one line per optimizer step, in step order.
Numbers that are not finite (an undefined ``B_simple``) are written as ``null``. Keys:

==================================  ===========================================================
``step``                            optimizer steps taken, this one included (1, 2, ...)
``examples``                        examples seen so far, this step's included
``batch_size``                      examples in this step (``stats.n``)
``lr``                              learning rate of this step (the first parameter group's)
``b_simple``                        this step's ``B_simple = tr_sigma / g2``, in examples (null
                                    when undefined: ``g2 <= 0`` or one example)
``b_simple_ema``                    smoothed ``B_simple``: ratio of the EMAs, in examples
``b_simple_lo``, ``b_simple_hi``    95% interval of the smoothed value, in examples, on the
                                    log scale (null while the smoothed ``|G|^2`` is not
                                    resolved from 0: then no finite upper end is honest)
``tr_sigma``, ``g2``                this step's unbiased ``tr(Sigma)`` and ``|G|^2``
                                    (per-example loss units)
``tr_sigma_ema``, ``g2_ema``        their bias-corrected EMAs
``b_noise``, ``eta_max``            optional: Hessian-weighted noise scale (examples) and best
                                    step size, e.g. from :class:`gradstats.CurvatureEstimator`
``loss``                            optional: the training loss of this step
``layers``                          ``{name: {"b_simple", "b_simple_ema", "tr_sigma", "g2",
                                    "tr_sigma_ema", "g2_ema"}}`` per layer (``*_ema``
                                    smoothed, the others this step's)
==================================  ===========================================================

Other keys are allowed and ignored. The loggers of :mod:`gradstats.logs` write this format
(``JsonlLogger``, ``CsvLogger``: the records of ``gradstats.logs.record_of`` with the
``gradstats/`` prefix left off), so the trainer callbacks' logs plot as they are;
:func:`step_record` makes one line from the :class:`~gradstats.StepStats` that
``monitor.step()`` returns.

CSV (``.csv``): the same with a header row; ``layers`` is flattened into columns
``layers.<name>.<key>`` (layer names may contain dots), an empty cell is null.

The figure
----------
``B_simple`` (smoothed, with its band and the per-step values) and the batch size used, both in
examples, against examples seen (steps on the top axis); the smoothed ``B_simple`` per layer;
the learning-rate and batch-size schedules; the loss when logged.
"""
from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..logs import record_of, run_log_line
from .common import PLOT_EXTRA, UsageError
from .plotting import (B_SIMPLE_LABEL, COLORS, log_if_decades, new_figure, noise_scale_panel,
                       positive, require_matplotlib, save, steps_axis)

__all__ = ["REQUIRED", "LAYER_KEYS", "RunLogError", "step_record", "read_run_log", "plot_run",
           "add_arguments", "run_cli"]

REQUIRED = ("step", "examples", "batch_size", "lr", "b_simple", "b_simple_ema", "b_simple_lo",
            "b_simple_hi", "tr_sigma", "g2", "tr_sigma_ema", "g2_ema")
OPTIONAL = ("b_noise", "eta_max", "loss")
LAYER_KEYS = ("b_simple", "b_simple_ema", "tr_sigma", "g2")


class RunLogError(ValueError):
    """A run log that cannot be read: the message names the file, the line and the problem."""


def step_record(stats: Any, *, examples: int, lr: float, loss: float | None = None,
                b_noise: float | None = None, eta_max: float | None = None) -> dict[str, Any]:
    """One line of the run log from a :class:`~gradstats.StepStats` (``stats.n`` examples):
    :func:`gradstats.logs.record_of` in the run-log layout."""
    rec = record_of(stats, lr=lr, examples=examples, loss=loss, b_noise=b_noise,
                    eta_max=eta_max)
    return run_log_line(rec, stats.step)


def _number(text: str, where: str) -> float | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise RunLogError(f"{where}: {text!r} is not a number") from None


def _csv_records(path: Path, text: str) -> Iterable[tuple[str, dict[str, Any]]]:
    for i, row in enumerate(csv.DictReader(text.splitlines()), start=2):
        where = f"{path}, line {i}"
        rec: dict[str, Any] = {"layers": {}}
        for k, v in row.items():
            if k is None or v is None:
                raise RunLogError(f"{where}: the row has a different number of cells than the "
                                  "header")
            if k.startswith("layers."):
                name, key = k[len("layers."):].rsplit(".", 1)
                rec["layers"].setdefault(name, {})[key] = _number(v, f"{where}, column {k}")
            elif k in REQUIRED or k in OPTIONAL:
                rec[k] = _number(v, f"{where}, column {k}")
        yield where, rec


def _jsonl_records(path: Path, text: str) -> Iterable[tuple[str, dict[str, Any]]]:
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunLogError(f"{where}: not JSON ({e.msg}); a run log holds one JSON object "
                              "per line") from None
        if not isinstance(rec, dict):
            raise RunLogError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        yield where, rec


def read_run_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run log (JSONL, or CSV by suffix ``.csv``), checked: every required key
    present, ``step`` and ``examples`` increasing. Raises :class:`RunLogError`."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise RunLogError(f"{p}: cannot read the run log ({e.strerror})") from None
    reader = _csv_records if p.suffix.lower() == ".csv" else _jsonl_records
    records: list[dict[str, Any]] = []
    for where, rec in reader(p, text):
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise RunLogError(f"{where}: missing key{'s' * (len(missing) > 1)} "
                              f"{', '.join(missing)} (see `gradstats plot --help` for the format)")
        for k in ("step", "examples", "batch_size"):
            if rec[k] is None or not rec[k] > 0:
                raise RunLogError(f"{where}: {k} must be a number > 0, got {rec[k]!r}")
        if records and not (rec["step"] > records[-1]["step"]
                            and rec["examples"] > records[-1]["examples"]):
            raise RunLogError(f"{where}: step and examples must increase from line to line")
        rec.setdefault("layers", {})
        records.append(rec)
    if not records:
        raise RunLogError(f"{p}: the run log holds no steps")
    return records


def _col(records: list[dict[str, Any]], key: str) -> list[Any]:
    return [r.get(key) for r in records]


def _schedule_axis(ax: Any, values: list[Any], headroom: float) -> None:
    """Log scale over decades; otherwise linear from 0 to ``headroom`` times the largest value,
    so a constant schedule reads flat (the two schedules get different headroom so that
    constant ones do not hide each other)."""
    if not log_if_decades(ax, values):
        top = max((v for v in values if v is not None), default=1.0)
        ax.set_ylim(0, headroom * top if top > 0 else 1.0)


def _layer_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    return [colormaps["tab10" if n <= 10 else "tab20"](i) for i in range(10 if n <= 10 else 20)]


def plot_run(records: list[dict[str, Any]], title: str = "") -> Any:
    """The run's figure (a matplotlib Figure): see this module's docstring."""
    x = _col(records, "examples")
    steps = _col(records, "step")
    batch = _col(records, "batch_size")
    has_loss = any(r.get("loss") is not None for r in records)
    fig, axes = new_figure(2, 2, (13, 8.5), sharex=True)
    (ax, ax_layers), (ax_sched, ax_loss) = axes

    lim = noise_scale_panel(ax, x, _col(records, "b_simple_ema"), _col(records, "b_simple_lo"),
                            _col(records, "b_simple_hi"), per_step=_col(records, "b_simple"),
                            extra=batch)
    ax.step(x, batch, where="pre", color=COLORS["batch"], lw=1.5,
            label="batch size used (examples per step)")
    if any(r.get("b_noise") is not None for r in records):
        ax.plot(x, _col(records, "b_noise"), color=COLORS["predicted"], lw=1,
                label="B_noise (Hessian-weighted)")
    if lim is None:
        ax.text(0.5, 0.5, "B_simple undefined at every step", transform=ax.transAxes,
                ha="center")
    ax.set_title("noise scale vs the batch size used")
    ax.legend(loc="upper left", fontsize=8)

    names = sorted({n for r in records for n in r["layers"]})
    seen: list[float] = []
    # more layers than the default cycle's 10 colours: 20 distinct ones, then line styles
    palette = _layer_colors(len(names))
    for i, name in enumerate(names):
        y = [r["layers"].get(name, {}).get("b_simple_ema") for r in records]
        pts = [(a, b) for a, b in zip(x, y) if positive(b)]
        if pts:
            ax_layers.plot(*zip(*pts), lw=1.2, label=name, color=palette[i % len(palette)],
                           ls=("-", "-.", ":")[i // len(palette) % 3])
            seen += [b for _, b in pts]
    whole = [(a, b) for a, b in zip(x, _col(records, "b_simple_ema")) if positive(b)]
    if whole:
        ax_layers.plot(*zip(*whole), color="black", ls="--", lw=1, label="whole model")
    log_if_decades(ax_layers, seen + [b for _, b in whole])
    ax_layers.set_ylabel(B_SIMPLE_LABEL)
    ax_layers.set_title("smoothed B_simple per layer")
    if names:
        ax_layers.legend(loc="best", fontsize=8, ncol=1 + len(names) // 8, title="layer",
                         title_fontsize=8)

    lr = _col(records, "lr")
    ax_sched.plot(x, lr, color=COLORS["lr"], lw=1.5, label="learning rate")
    _schedule_axis(ax_sched, lr, 1.6)
    ax_sched.set_ylabel("learning rate", color=COLORS["lr"])
    ax_batch = ax_sched.twinx()
    ax_batch.step(x, batch, where="pre", color=COLORS["batch"], lw=1.5, label="batch size")
    _schedule_axis(ax_batch, batch, 1.1)
    ax_batch.set_ylabel("batch size (examples per step)", color=COLORS["batch"])
    ax_sched.legend(ax_sched.get_lines() + ax_batch.get_lines(),
                    ["learning rate", "batch size (examples per step)"], loc="lower left",
                    fontsize=8)
    ax_sched.set_title("schedules: learning rate and batch size")

    if has_loss:
        loss = _col(records, "loss")
        ax_loss.plot(x, loss, color=COLORS["loss"], lw=0.8)
        log_if_decades(ax_loss, loss)
        ax_loss.set_ylabel("training loss")
        ax_loss.set_title("training loss")
    else:
        ax_loss.set_axis_off()
        ax_loss.text(0.5, 0.5, "no loss in the log", transform=ax_loss.transAxes, ha="center")
    for a in (ax, ax_layers):
        steps_axis(a, x, steps)
    for a in (ax_sched, ax_loss):
        a.set_xlabel("examples seen")
    ax_loss.xaxis.set_tick_params(labelbottom=True)
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__.split("\n", 2)[2]
    p.add_argument("run", metavar="RUN", help="the run log: a .jsonl file (or .csv)")
    p.add_argument("--out", metavar="F.png",
                   help="where to write the figure (default: RUN with the suffix .png)")
    p.add_argument("--title", help="figure title (default: the log's file name)")


def run_cli(args: argparse.Namespace) -> int:
    """``gradstats plot``."""
    require_matplotlib("the figure", PLOT_EXTRA)
    run = Path(args.run)
    out = Path(args.out) if args.out else run.with_suffix(".png")
    if out.resolve() == run.resolve():
        raise UsageError(f"argument --out: {out} is the run log itself; name a .png file")
    try:
        records = read_run_log(run)
    except RunLogError as e:
        raise UsageError(f"argument RUN: {e}") from None
    fig = plot_run(records, args.title if args.title is not None else run.name)
    save(fig, str(out))
    last = records[-1]
    ema = last["b_simple_ema"]
    print(f"{out}: {len(records)} steps, {last['examples']:.0f} examples; smoothed B_simple at "
          f"the end {'n/a' if not positive(ema) else f'{ema:.4g} examples'}")
    return 0

