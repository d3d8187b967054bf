"""Critical batch size from runs at several batch sizes.

Source: McCandlish et al. 2018, "An Empirical Model of Large-Batch Training".

Each run trained at batch size ``B`` and reached a fixed target after ``S`` steps, ``E = B S``
examples. The model ``(S/S_min - 1)(E/E_min - 1) = 1`` is, with ``E = B S``, the line

    S = S_min + E_min / B                      (linear in x = 1/B)

so ``(S_min, E_min)`` come from a linear least-squares fit and ``B_crit = E_min / S_min``. For
SGD ``B_crit ~ B_noise``; for Adam (mean-field sign descent) ``B_crit ~ B_noise-2``, see
:func:`gradstats.scaling.adam_peak_from_b_noise2`.
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

__all__ = ["CriticalBatchFit", "Runs", "fit_critical_batch", "load_runs", "save_runs"]


class Runs(NamedTuple):
    batch_sizes: np.ndarray
    steps: np.ndarray


@dataclass(frozen=True)
class CriticalBatchFit:
    """Fit of ``S = S_min + E_min / B``; ``*_ci`` are (low, high) bootstrap percentile intervals
    (nan when ``n_boot == 0``)."""

    s_min: float
    e_min: float
    b_crit: float
    s_min_ci: tuple[float, float]
    e_min_ci: tuple[float, float]
    b_crit_ci: tuple[float, float]
    confidence: float
    n_boot: int  # bootstrap resamples actually used (those with >= 2 distinct batch sizes)
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
    Confidence intervals: nonparametric bootstrap over runs -- ``n_boot`` resamples of the runs
    with replacement (those with < 2 distinct batch sizes are dropped), the fit repeated on each,
    and the ``(1 -/+ confidence)/2`` percentiles of each parameter taken (percentile method).
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
    cis, used = [nan2, nan2, nan2], 0
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, b.size, size=(int(n_boot), b.size))
        bb = b[idx]
        ok = (bb != bb[:, :1]).any(axis=1)
        idx = idx[ok]
        used = int(idx.shape[0])
        if used:
            a, c = _wls(x[idx], s[idx], w[idx])
            with np.errstate(divide="ignore", invalid="ignore"):
                bc = np.where(a > 0, c / a, np.nan)
            q = [50 * (1 - confidence), 50 * (1 + confidence)]
            cis = [tuple(float(v) for v in np.nanpercentile(p, q)) for p in (a, c, bc)]
    return CriticalBatchFit(
        s_min, e_min, e_min / s_min, cis[0], cis[1], cis[2], confidence, used, b, s
    )


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
