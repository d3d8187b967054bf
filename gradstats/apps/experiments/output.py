"""What every experiment writes: ``result.json`` (everything), a CSV of its table and a PNG, under
``OUT/NAME/``; and the shared figure pieces (the style is :mod:`gradstats.apps.plotting`'s)."""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..common import DEMO_EXTRA, write_json
from ..plotting import COLORS, log_axis, new_figure, positive, require_matplotlib, save

__all__ = ["figure", "frontier_panel", "lr_panel", "write_outputs"]


def write_outputs(result: dict[str, Any], rows: Sequence[dict[str, Any]], out: Path,
                  name: str, plot: Any = None) -> list[Path]:
    """``out/name/result.json``, ``out/name/<name>.csv`` (``rows``) and, with ``plot`` (a
    function of the result and a path), ``out/name/<name>.png``; returns the paths."""
    d = Path(out) / name
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / "result.json", d / f"{name}.csv"]
    write_json(result, str(paths[0]))
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with paths[1].open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(float(v)) if isinstance(v, float) else v)
                        for k, v in r.items()})
    if plot is not None:
        require_matplotlib(f"{name}.png", DEMO_EXTRA)
        paths.append(d / f"{name}.png")
        plot(result, paths[-1])
    return paths


def figure(rows: int, cols: int, width: float = 6.0, height: float = 4.6) -> tuple[Any, Any]:
    return new_figure(rows, cols, (width * cols, height * rows))


def frontier_panel(ax: Any, runs: Sequence[dict[str, Any]], fit: dict[str, Any],
                   predictions: dict[str, tuple[float, float]], unit: str,
                   title: str) -> None:
    """Steps against examples (log-log): the runs, the fitted hyperbola
    ``S = S_min + E_min/B`` and hyperbolas predicted by ``(S_min, E_min)`` pairs."""
    sizes = sorted({r["batch_size"] for r in runs})
    lo, hi = sizes[0] / 4, sizes[-1] * 4
    grid = [lo * (hi / lo) ** (i / 199) for i in range(200)]
    ax.scatter([r["examples"] for r in runs], [r["steps"] for r in runs], s=14,
               color=COLORS["runs"], alpha=0.6, zorder=3, label="runs (best lr per batch size)")
    if positive(fit.get("s_min")) and positive(fit.get("e_min")):
        s, e = fit["s_min"], fit["e_min"]
        ax.plot([b * s + e for b in grid], [s + e / b for b in grid], color=COLORS["fit"],
                label=f"fit: B_crit = {fit['b_crit']:.3g} {unit}")
    colors = [COLORS["b_simple"], "black", COLORS["predicted"], "tab:olive", "tab:brown"]
    for (label, (s, e)), color in zip(predictions.items(), colors):
        if positive(s) and positive(e):
            ax.plot([b * s + e for b in grid], [s + e / b for b in grid], ls="--", color=color,
                    lw=1, label=f"predicted from {label}: B = {e / s:.3g} {unit}")
    for b in sizes:
        pts = [r for r in runs if r["batch_size"] == b]
        ax.annotate(f"B={b}", (pts[0]["examples"], pts[0]["steps"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    log_axis(ax, "x")
    log_axis(ax, "y")
    ax.set_xlabel(f"{unit} to reach the target, E ({unit})")
    ax.set_ylabel("optimizer steps to reach the target, S (steps)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def lr_panel(ax: Any, sizes: Sequence[float], best: Sequence[float],
             curves: dict[str, tuple[Sequence[float], Sequence[float]]], unit: str,
             title: str, grid_best: Sequence[float] | None = None) -> None:
    """Best learning rate against the batch size (log-log) with predicted curves."""
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label)
    ax.scatter(sizes, best, color=COLORS["runs"], zorder=3, label="best lr of the run")
    if grid_best is not None:
        ax.scatter(sizes, grid_best, marker="_", s=120, color="black", zorder=3,
                   label="best grid point")
    log_axis(ax, "x")
    v = [y for y in best if positive(y)] + [y for _, ys in curves.values() for y in ys
                                            if positive(y)]
    if v and max(v) / min(v) > 3:
        log_axis(ax, "y")
    else:
        ax.set_yscale("log")
    ax.set_xlabel(f"batch size B ({unit})")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def log_grid(lo: float, hi: float, n: int = 100) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


__all__ += ["finite", "log_grid", "save"]
