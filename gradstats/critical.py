"""Critical batch size from runs at several batch sizes, and from the noise scale of one run.

Source: McCandlish et al. 2018, "An Empirical Model of Large-Batch Training".

Each run trained at batch size ``B`` and reached a fixed target after ``S`` steps, ``E = B S``
examples. The model ``(S/S_min - 1)(E/E_min - 1) = 1`` is, with ``E = B S``, the line

    S = S_min + E_min / B                      (linear in x = 1/B)

so ``(S_min, E_min)`` come from a linear least-squares fit and ``B_crit = E_min / S_min``. For
SGD ``B_crit ~ B_noise``; for Adam (mean-field sign descent) ``B_crit ~ B_noise-2``, see
:func:`gradstats.scaling.adam_peak_from_b_noise2`. :func:`predict_from_b_simple` predicts the
same three numbers from the noise scale measured along one run (the progress-weighted
``B_simple``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["CriticalBatchFit", "Bootstrap", "NoiseScalePrediction", "Runs",
           "fit_critical_batch", "predict_from_b_simple", "load_runs", "save_runs"]


class Runs(NamedTuple):
    batch_sizes: np.ndarray
    steps: np.ndarray


@dataclass(frozen=True)
class Bootstrap:
    """How the bootstrap intervals of a :class:`CriticalBatchFit` came about.

    Every one of the ``resamples`` holds at least two distinct batch sizes (``redrawn`` draws
    that held one only were drawn again). ``usable`` of them give ``S_min > 0`` and
    ``E_min > 0``, a positive finite ``B_crit``; in the others ``S_min <= 0``
    (``s_min_nonpositive``: the steps fall like ``1/B`` or faster, ``B_crit`` lies above the
    runs) or ``E_min <= 0`` (``e_min_nonpositive``: the steps do not fall with ``B``, ``B_crit``
    lies below them), or both. Those are not thrown away: they count as lying beyond the end of
    the interval they point to, and an end beyond which more than ``max_beyond`` of the
    resamples lie is not resolved by the runs; ``undefined`` maps each quantity whose interval
    is therefore undefined to the reason.
    """

    resamples: int
    redrawn: int
    usable: int
    s_min_nonpositive: int
    e_min_nonpositive: int
    max_beyond: float
    undefined: dict[str, str] = field(default_factory=dict)

    def describe(self, confidence: float, n_runs: int) -> str:
        """What the intervals are and how many resamples made them, in words."""
        if self.resamples == 0:
            return "no bootstrap intervals (0 resamples asked for)"
        pct, edge = f"{100 * confidence:g}%", f"{100 * self.max_beyond:g}%"
        text = (f"{pct} intervals: percentile bootstrap on the log scale -- the fit repeated on "
                f"{self.resamples} resamples of the {n_runs} runs drawn with replacement, the "
                f"interval holding the middle {pct} of the refitted values")
        if self.redrawn:
            text += (f" ({self.redrawn} draw{'s' * (self.redrawn != 1)} holding a single batch "
                     "size, which fits no line, drawn again)")
        text += f". {self.usable} of the {self.resamples} resamples give a positive finite B_crit"
        bad = self.resamples - self.usable
        if bad:
            why = [f"S_min <= 0 in {self.s_min_nonpositive}: steps falling like 1/B or faster"
                   ] if self.s_min_nonpositive else []
            if self.e_min_nonpositive:
                why.append(f"E_min <= 0 in {self.e_min_nonpositive}: steps not falling with B")
            text += (f"; {bad} do not ({'; '.join(why)}) and count as lying beyond the end "
                     "they point to")
        text += (f". An end with more than {edge} of the resamples beyond it is not resolved by "
                 "these runs, and its interval is reported as undefined.")
        if n_runs < 10:
            text += (f" With only {n_runs} runs the resamples take few distinct values: read the "
                     "intervals as a rough guide.")
        return text


@dataclass(frozen=True)
class CriticalBatchFit:
    """Fit of ``S = S_min + E_min / B``; ``*_ci`` are (low, high) bootstrap percentile intervals
    (nan, nan when ``n_boot == 0`` or when ``bootstrap.undefined`` names the quantity). Every
    interval of these positive quantities has a positive lower end."""

    s_min: float
    e_min: float
    b_crit: float
    s_min_ci: tuple[float, float]
    e_min_ci: tuple[float, float]
    b_crit_ci: tuple[float, float]
    confidence: float
    n_boot: int  # bootstrap resamples drawn, each holding >= 2 distinct batch sizes
    bootstrap: Bootstrap
    batch_sizes: np.ndarray = field(repr=False)
    steps: np.ndarray = field(repr=False)

    def predict_steps(self, batch_size: float | np.ndarray) -> float | np.ndarray:
        """``S(B) = S_min + E_min / B``."""
        b = np.asarray(batch_size, dtype=np.float64)
        if np.any(~(b > 0)):
            raise ValueError("batch_size must be > 0")
        out = self.s_min + self.e_min / b
        return float(out) if out.ndim == 0 else out

    def predict_examples(self, batch_size: float | np.ndarray) -> float | np.ndarray:
        """``E(B) = B S(B) = E_min + S_min B``."""
        return np.asarray(batch_size, dtype=np.float64) * self.predict_steps(batch_size)

    def describe_intervals(self) -> str:
        """The intervals explained in words (see :meth:`Bootstrap.describe`)."""
        return self.bootstrap.describe(self.confidence, self.batch_sizes.size)


def _check(
    batch_sizes: Sequence[float], steps: Sequence[float], min_distinct: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(batch_sizes, dtype=np.float64).ravel()
    s = np.asarray(steps, dtype=np.float64).ravel()
    if b.shape != s.shape:
        raise ValueError(
            f"batch_sizes and steps must have the same length, got {b.size} and {s.size}"
        )
    for name, v in (("batch_sizes", b), ("steps", s)):
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(f"{name} must be finite and > 0, got {v.tolist()}")
    if np.unique(b).size < min_distinct:
        raise ValueError(f"need runs at >= 2 distinct batch sizes, got {np.unique(b).tolist()}")
    return b, s


def _wls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted LS of ``y = a + c x`` along the last axis; returns (a, c)."""
    sw = w.sum(-1)
    mx = (w * x).sum(-1) / sw
    my = (w * y).sum(-1) / sw
    dx = x - mx[..., None]
    sxx = (w * dx * dx).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (w * dx * (y - my[..., None])).sum(-1) / sxx
    return my - c * mx, c


def _resample(b: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``n_boot`` rows of run indices drawn with replacement, each row holding >= 2 distinct
    batch sizes (rows that do not are drawn again); returns the rows and the redraw count."""
    idx = rng.integers(0, b.size, size=(n_boot, b.size))
    redrawn = 0
    while True:
        bb = b[idx]
        bad = ~(bb != bb[:, :1]).any(axis=1)
        k = int(bad.sum())
        if k == 0:
            return idx, redrawn
        redrawn += k
        idx[bad] = rng.integers(0, b.size, size=(k, b.size))


def _log_percentiles(v: np.ndarray, confidence: float) -> tuple[float, float, str | None]:
    """Percentile interval of ``exp(v)`` from log values ``v`` in which ``-inf`` lies below and
    ``+inf`` above every finite value, and ``nan`` beyond both ends (counted against each).
    Returns (lo, hi, None), or (nan, nan, the end that is not resolved: "lower" or "upper")."""
    q = (1.0 - confidence) / 2
    fin = v[np.isfinite(v)]
    share = fin.size / v.size
    neg, nan = float(np.mean(v == -np.inf)), float(np.mean(np.isnan(v)))
    if share == 0.0:
        return math.nan, math.nan, "lower" if neg + nan > q else "upper"
    # quantile p of the whole sample = quantile (p - share below the finite ones) / share of them
    lo_level, hi_level = (q - neg - nan) / share, (1.0 - q - neg) / share
    if lo_level < -1e-12:
        return math.nan, math.nan, "lower"
    if hi_level > 1.0 + 1e-12:
        return math.nan, math.nan, "upper"
    lo, hi = np.quantile(fin, np.clip([lo_level, hi_level], 0.0, 1.0))
    return math.exp(lo), math.exp(hi), None


#: why an end of each quantity's interval is not resolved, by end
_UNRESOLVED = {
    ("s_min", "lower"): "S_min <= 0 in {k} of {n} resamples: the steps fall like 1/B or faster",
    ("e_min", "lower"): "E_min <= 0 in {k} of {n} resamples: the steps do not fall with B",
    ("b_crit", "lower"): "E_min <= 0 in {k} of {n} resamples: the steps do not fall with B, so "
                         "B_crit may lie below the batch sizes run",
    ("b_crit", "upper"): "S_min <= 0 in {k} of {n} resamples: the steps still fall like 1/B, so "
                         "B_crit may lie above the batch sizes run",
}


def _intervals(a: np.ndarray, c: np.ndarray, confidence: float
               ) -> tuple[list[tuple[float, float]], dict[str, str]]:
    """Log-scale percentile intervals of ``S_min = a``, ``E_min = c`` and ``B_crit = c/a`` over
    the resamples, and the reason for each one that is undefined."""
    pos_a, pos_c = a > 0, c > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = {"s_min": np.where(pos_a, np.log(np.abs(a)), -np.inf),
                "e_min": np.where(pos_c, np.log(np.abs(c)), -np.inf),
                "b_crit": np.select([pos_a & pos_c, pos_c, pos_a],
                                    [np.log(np.abs(c / a)), np.inf, -np.inf], np.nan)}
    counts = {("s_min", "lower"): ~pos_a, ("e_min", "lower"): ~pos_c,
              ("b_crit", "lower"): ~pos_c, ("b_crit", "upper"): ~pos_a}
    cis, undefined = [], {}
    pct = f"{100 * (1 - confidence) / 2:g}%"
    for name, v in logs.items():
        lo, hi, end = _log_percentiles(v, confidence)
        cis.append((lo, hi))
        if end is not None:
            why = _UNRESOLVED[(name, end)].format(k=int(counts[(name, end)].sum()), n=a.size)
            undefined[name] = (f"undefined: not resolved by these runs ({why}; more than {pct} "
                               f"beyond its {end} end)")
    return cis, undefined


def fit_critical_batch(
    batch_sizes: Sequence[float],
    steps: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    relative: bool = True,
) -> CriticalBatchFit:
    """Fit ``S = S_min + E_min / B`` by least squares in ``x = 1/B``; ``B_crit = E_min/S_min``.

    ``relative=True`` minimises ``sum_i ((S_i - S_min - E_min/B_i) / S_i)^2`` (suits
    multiplicative noise in S); ``False`` is ordinary least squares.

    Intervals: nonparametric bootstrap over runs -- ``n_boot`` resamples of the runs drawn with
    replacement (a draw holding a single batch size is drawn again), the fit repeated on each,
    and the ``(1 -/+ confidence)/2`` percentiles of ``log S_min``, ``log E_min`` and
    ``log B_crit`` taken. A resample with ``S_min <= 0`` or ``E_min <= 0`` has no positive
    finite value of some of them; it counts as lying beyond the end it points to
    (``E_min <= 0``: below every ``B_crit``; ``S_min <= 0``: above), and when more than
    ``(1 - confidence)/2`` of the resamples lie beyond an end, that interval is undefined
    (nan, nan; the reason is in ``fit.bootstrap.undefined``). :class:`Bootstrap` holds the
    counts.

    Raises ValueError when the fitted ``S_min`` or ``E_min`` is <= 0 (the data show no
    steps/examples trade-off of this form).
    """
    b, s = _check(batch_sizes, steps)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if int(n_boot) != n_boot or n_boot < 0:
        raise ValueError(f"n_boot must be an integer >= 0, got {n_boot!r}")
    x = 1.0 / b
    w = 1.0 / s**2 if relative else np.ones_like(s)
    s_min, e_min = (float(v) for v in _wls(x, s, w))
    if not (s_min > 0 and e_min > 0):
        raise ValueError(
            f"fitted S_min = {s_min:.6g}, E_min = {e_min:.6g}: both must be > 0 for the model "
            "S = S_min + E_min/B (steps must fall with B, and level off)"
        )
    nan2 = (math.nan, math.nan)
    cis: list[tuple[float, float]] = [nan2, nan2, nan2]
    boot = Bootstrap(0, 0, 0, 0, 0, (1.0 - confidence) / 2)
    if n_boot > 0:
        idx, redrawn = _resample(b, int(n_boot), np.random.default_rng(seed))
        a, c = _wls(x[idx], s[idx], w[idx])
        cis, undefined = _intervals(a, c, confidence)
        boot = Bootstrap(int(n_boot), redrawn, int(np.sum((a > 0) & (c > 0))),
                         int(np.sum(a <= 0)), int(np.sum(c <= 0)), (1.0 - confidence) / 2,
                         undefined)
    return CriticalBatchFit(
        s_min, e_min, e_min / s_min, cis[0], cis[1], cis[2], confidence, int(n_boot), boot, b, s
    )


# --------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class NoiseScalePrediction:
    """``S_min``, ``E_min`` and ``B_crit = E_min/S_min`` predicted from the noise scale measured
    along one run: ``b_crit`` is the progress-weighted ``B_simple``. ``steps`` is the number of
    steps counted, ``skipped_steps`` those left out because ``B_simple`` was undefined there."""

    s_min: float
    e_min: float
    b_crit: float
    steps: float
    skipped_steps: float

    FORMULA = ("S_min = sum_t 1/(1 + B_simple_t/B_t), E_min = sum_t B_simple_t/(1 + "
               "B_simple_t/B_t) over the run's steps t; progress-weighted B_simple = E_min/S_min")


def predict_from_b_simple(b_simple: Sequence[float | None], batch_size: float | Sequence[float],
                          span: Sequence[float] | None = None) -> NoiseScalePrediction:
    """What McCandlish et al.'s model predicts from the noise scale along one run, with
    ``B_simple`` standing in for ``B_noise``.

    A step at batch ``B`` taken where the noise scale is ``b`` makes the progress of
    ``1/(1 + b/B)`` steps at an unlimited batch, and at a vanishing batch that progress costs
    ``b`` examples per step of progress, so over the run's steps ``t``::

        S_min = sum_t 1/(1 + b_t/B_t),    E_min = sum_t b_t/(1 + b_t/B_t),    B_crit = E_min/S_min

    -- the progress-weighted average of the noise scale. Entry ``i`` of ``b_simple`` (with batch
    ``batch_size[i]``, or one batch size for all) stands for ``span[i]`` steps (default 1);
    entries that are None, non-finite or ``<= 0`` (undefined) are skipped.
    """
    n = len(b_simple)
    bs = np.broadcast_to(np.asarray(batch_size, dtype=np.float64), (n,))
    sp = np.ones(n) if span is None else np.asarray(span, dtype=np.float64)
    if sp.shape != (n,) or np.any(~(sp >= 0)):
        raise ValueError(f"span must hold {n} values >= 0, got {np.asarray(span).tolist()}")
    if np.any(~(bs > 0)):
        raise ValueError(f"batch_size must be > 0, got {bs.tolist()}")
    b = np.array([math.nan if v is None else float(v) for v in b_simple], dtype=np.float64)
    ok = np.isfinite(b) & (b > 0)
    w = sp[ok] / (1.0 + b[ok] / bs[ok])
    s_min, e_min = float(w.sum()), float((w * b[ok]).sum())
    return NoiseScalePrediction(s_min, e_min, e_min / s_min if s_min > 0 else math.nan,
                                float(sp[ok].sum()), float(sp[~ok].sum()))


# --------------------------------------------------------------------------- files
def _runs_from_records(rows: list[dict], path: Path) -> Runs:
    if not rows:
        raise ValueError(f"{path}: no runs")
    keys = set().union(*rows)
    if "batch_size" not in keys or not ({"steps", "examples"} & keys):
        raise ValueError(
            f"{path}: need columns batch_size and steps (or examples), got {sorted(keys)}"
        )

    def col(k: str) -> np.ndarray | None:
        if k not in keys:
            return None
        try:
            return np.array([float(r[k]) for r in rows])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad or missing value in column {k!r}: {e}") from None

    b, s, e = col("batch_size"), col("steps"), col("examples")
    if s is None:
        s = e / b
    elif e is not None and not np.allclose(e, b * s, rtol=1e-6):
        raise ValueError(f"{path}: column examples must equal batch_size * steps")
    return Runs(*_check(b, s, min_distinct=1))


def load_runs(path: str | Path) -> Runs:
    """Read runs from CSV (header ``batch_size,steps[,examples]``) or JSON (a list of objects
    with those keys); ``examples`` alone is accepted (``steps = examples / batch_size``), both
    must agree."""
    p = Path(path)
    text = p.read_text()
    if p.suffix.lower() == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{p}: JSON must be a list of objects")
    else:
        rows = list(csv.DictReader(text.splitlines()))
    return _runs_from_records(rows, p)


def save_runs(path: str | Path, batch_sizes: Sequence[float], steps: Sequence[float]) -> None:
    """Write runs as CSV or JSON (by suffix) with columns batch_size, steps, examples."""
    p = Path(path)
    rows = [
        {"batch_size": float(b), "steps": float(s), "examples": float(b) * float(s)}
        for b, s in zip(batch_sizes, steps, strict=True)
    ]
    if p.suffix.lower() == ".json":
        p.write_text(json.dumps(rows, indent=1))
    else:
        with p.open("w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["batch_size", "steps", "examples"])
            wr.writeheader()
            wr.writerows({k: repr(v) for k, v in r.items()} for r in rows)
