"""Per-step records of the monitor and the loggers that write them.

:func:`record_of` turns the :class:`~gradstats.StepStats` of one step into a flat dict of
numbers with ``gradstats/`` names, which W&B (``wandb.log(record, step=step)``), MLflow
(``mlflow.log_metrics(record, step=step)``), TensorBoard or a trainer's own logger take as it is:

=========================================  ======================================================
``gradstats/b_simple``                     this step's ``B_simple = tr(Sigma)/|G|^2`` (examples;
                                           nan when undefined)
``gradstats/b_simple_ema``                 smoothed: the ratio of the two EMAs
``gradstats/b_simple_lo``, ``_hi``         its 95% interval (log scale; nan while the smoothed
                                           ``|G|^2`` is not resolved from 0)
``gradstats/b_simple_stderr``              its delta-method standard error
``gradstats/tr_sigma``, ``gradstats/g2``   this step's unbiased ``tr(Sigma)``, ``|G|^2``
                                           (per-example loss units)
``gradstats/tr_sigma_ema``, ``g2_ema``     their bias-corrected EMAs
``gradstats/lr``, ``batch_size``,          the learning rate, the examples of this step and the
``examples``                               examples seen so far (when given)
``gradstats/b_noise``, ``eta_max``,        when given: the Hessian-weighted noise scale, the best
``loss``                                   step size, the training loss
``gradstats/layers/<name>/<key>``          per layer, ``<key>`` one of :data:`LAYER_KEYS`
=========================================  ======================================================

The JSONL and CSV files hold the same records in the run-log layout that ``gradstats plot``
reads (:mod:`gradstats.apps.plot`): ``step`` first, the names without the ``gradstats/`` prefix,
the layers nested (JSONL ``{"layers": {name: {key: value}}}``) or in ``layers.<name>.<key>``
columns (CSV). JSON has no NaN: a non-finite number is written as ``null`` (an empty CSV cell)
and read back as nan (:func:`record_from_line`).
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

__all__ = ["PREFIX", "STEP_KEYS", "LAYER_KEYS", "Logger", "record_of", "run_log_line",
           "record_from_line", "flatten_line", "JsonlLogger", "CsvLogger", "TensorBoardLogger",
           "MultiLogger", "open_run_log"]

PREFIX = "gradstats/"
#: whole-model keys of every record (after the prefix)
STEP_KEYS = ("b_simple", "b_simple_ema", "b_simple_lo", "b_simple_hi", "b_simple_stderr",
             "tr_sigma", "g2", "tr_sigma_ema", "g2_ema")
#: per-layer keys (``b_simple_lo``/``_hi`` too when the layer statistics carry an interval)
LAYER_KEYS = ("b_simple", "b_simple_ema", "tr_sigma", "g2", "tr_sigma_ema", "g2_ema")
_LAYERS = PREFIX + "layers/"
Number = float | int | bool


@runtime_checkable
class Logger(Protocol):
    """Anything that takes one flat record per step."""

    def log(self, record: Mapping[str, Number], step: int) -> None: ...

    def close(self) -> None: ...


def _num(v: Any, name: str) -> Number:
    if isinstance(v, bool):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None


def record_of(stats: Any, *, lr: float | None = None, batch_size: int | None = None,
              examples: int | None = None, b_noise: float | None = None,
              eta_max: float | None = None, loss: float | None = None) -> dict[str, Number]:
    """The flat record of one step (see the module docstring); ``batch_size`` defaults to
    ``stats.n``. Undefined values are nan, optional ones left out when not given."""
    lo, hi = stats.b_simple_interval
    rec: dict[str, Number] = {}
    for k, v in (("lr", lr), ("batch_size", stats.n if batch_size is None else batch_size),
                 ("examples", examples)):
        if v is not None:
            rec[PREFIX + k] = _num(v, k) if k == "lr" else int(v)
    values = {"b_simple": stats.b_simple, "b_simple_ema": stats.b_simple_ema,
              "b_simple_lo": lo, "b_simple_hi": hi, "b_simple_stderr": stats.b_simple_stderr,
              "tr_sigma": stats.tr_sigma, "g2": stats.g2, "tr_sigma_ema": stats.tr_sigma_ema,
              "g2_ema": stats.g2_ema}
    rec.update({PREFIX + k: float(v) for k, v in values.items()})
    for k, v in (("b_noise", b_noise), ("eta_max", eta_max), ("loss", loss)):
        if v is not None:
            rec[PREFIX + k] = _num(v, k)
    for name, ls in stats.layers.items():
        base = f"{_LAYERS}{name}/"
        for k in LAYER_KEYS:
            rec[base + k] = float(getattr(ls, k))
        interval = getattr(ls, "b_simple_interval", None)
        if interval is not None:
            rec[base + "b_simple_lo"], rec[base + "b_simple_hi"] = map(float, interval)
    return rec


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def run_log_line(record: Mapping[str, Number], step: int) -> dict[str, Any]:
    """The run-log line of ``record``: ``step``, the names without the prefix, layers nested,
    non-finite numbers as None."""
    line: dict[str, Any] = {"step": int(step)}
    layers: dict[str, dict[str, Any]] = {}
    for k, v in record.items():
        if k.startswith(_LAYERS):
            name, key = k[len(_LAYERS):].rsplit("/", 1)
            layers.setdefault(name, {})[key] = _json_value(v)
        else:
            line[k.removeprefix(PREFIX)] = _json_value(v)
    if layers:
        line["layers"] = layers
    return line


def record_from_line(line: Mapping[str, Any]) -> tuple[dict[str, Number], int]:
    """Inverse of :func:`run_log_line`: ``(record, step)``, None read back as nan."""
    def value(v: Any) -> Any:
        return math.nan if v is None else v

    rec: dict[str, Number] = {}
    for k, v in line.items():
        if k == "step":
            continue
        if k == "layers":
            for name, d in v.items():
                rec.update({f"{_LAYERS}{name}/{key}": value(x) for key, x in d.items()})
        else:
            rec[PREFIX + k] = value(v)
    return rec, int(line["step"])


def flatten_line(line: Mapping[str, Any]) -> dict[str, Any]:
    """A run-log line as one CSV row: ``layers`` into ``layers.<name>.<key>`` columns."""
    out = {k: v for k, v in line.items() if k != "layers"}
    for name, d in line.get("layers", {}).items():
        out.update({f"layers.{name}.{k}": v for k, v in d.items()})
    return out


class _File:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> _File:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        pass


class JsonlLogger(_File):
    """One run-log line per :meth:`log` in ``path`` (strict JSON; flushed at once, so a run
    that stops leaves a readable log)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._fh = self.path.open("w")

    def log(self, record: Mapping[str, Number], step: int) -> None:
        self._fh.write(json.dumps(run_log_line(record, step), allow_nan=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


class CsvLogger(_File):
    """One CSV row per :meth:`log` in ``path``, written at once; a record with a column the
    header lacks (``b_noise`` measured from some step on) rewrites the file with the wider
    header, earlier rows getting empty cells."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.fields: list[str] = []
        self.path.write_text("")

    def log(self, record: Mapping[str, Number], step: int) -> None:
        row = flatten_line(run_log_line(record, step))
        new = [k for k in row if k not in self.fields]
        if new:
            with self.path.open(newline="") as fh:
                old = list(csv.DictReader(fh)) if self.fields else []
            self.fields += new
            with self.path.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=self.fields, restval="")
                w.writeheader()
                w.writerows(old)
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields, restval="").writerow(
                {k: "" if v is None else v for k, v in row.items()})


class TensorBoardLogger:
    """Each number of a record as a TensorBoard scalar under its name (``gradstats/b_simple``,
    ``gradstats/layers/<name>/b_simple_ema``, ...) at ``step``: to a new
    ``torch.utils.tensorboard.SummaryWriter(log_dir)``, or to ``writer`` (anything with
    ``add_scalar``, e.g. Lightning's ``TensorBoardLogger.experiment``), which is then not
    closed here."""

    def __init__(self, log_dir: str | Path | None = None, *, writer: Any = None) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardLogger needs exactly one of log_dir= (a directory for "
                             "a new SummaryWriter) or writer= (an existing one)")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must have add_scalar(tag, value, step), got "
                            f"{type(writer).__name__}")
        self._own = writer is None
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"TensorBoardLogger needs tensorboard ({e}); "
                                  "pip install tensorboard") from None
            writer = SummaryWriter(log_dir=str(log_dir))
        self.writer = writer

    def log(self, record: Mapping[str, Number], step: int) -> None:
        for k, v in record.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, float(v), int(step))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self._own:
            self.writer.close()
        else:
            self.writer.flush()


class MultiLogger:
    """Hands each record to every logger in turn."""

    def __init__(self, *loggers: Logger) -> None:
        bad = [type(x).__name__ for x in loggers if not callable(getattr(x, "log", None))]
        if bad:
            raise TypeError(f"loggers must have log(record, step); got {', '.join(bad)}")
        self.loggers: Sequence[Logger] = loggers

    def log(self, record: Mapping[str, Number], step: int) -> None:
        for x in self.loggers:
            x.log(record, step)

    def close(self) -> None:
        for x in self.loggers:
            close = getattr(x, "close", None)
            if close is not None:
                close()


def open_run_log(path: str | Path) -> JsonlLogger | CsvLogger:
    """A :class:`CsvLogger` for a ``.csv`` path, a :class:`JsonlLogger` otherwise."""
    return CsvLogger(path) if Path(path).suffix.lower() == ".csv" else JsonlLogger(path)
