"""The Adam experiment ("Adam, measured"): the best Adam learning rate of a run against the
batch size on the text task, beside the sign-descent curve predicted from online measurements,
with Adam's default betas and at ``beta1 = beta2 = 0`` (each step ``g / (|g| + eps)``: sign
descent, RMSProp without memory).

Per setting: the sweep (:mod:`.search`; the default betas' sweep is E1's text sweep) gives the
best learning rate ``lr_run(B)`` at 6 batch sizes; the reference run's
:class:`~gradstats.AdamNoiseEstimator` calls at steps ``<= early_fraction * S`` give
``sum |g|``, ``tr H``, ``s^T H s`` and ``kappa^2`` (matched at the reference batch size), hence
the curve ``eta*(B) = l1 beta / (tr H + beta^2 (s^T H s - tr H))``,
``beta = (1 + pi kappa^2/(2B))^(-1/2)`` (:func:`gradstats.scaling.adam_sign_descent_lr`), and
the predicted peak ``B_peak`` (:func:`gradstats.scaling.adam_plateau_batch_size` at ``tol = 0``;
infinite when the curve has none). One constant ``c`` is fitted over ``B`` as in E2.

The grid's peak: the batch size with the largest best learning rate, refined by a parabola in
``log B`` through it and its neighbours when it is inside the range. A surge is reported when
the peak is inside the range and the best learning rate at the largest batch size is below the
peak's by more than one grid step. Shapes are compared apart from ``eta_max``: each curve divided
by its own maximum.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ...scaling import adam_plateau_batch_size, adam_sign_descent_lr
from ..common import num, ratio
from ..plotting import log_axis
from .e2 import fit_constant
from .output import figure, finite, log_grid, lr_panel, save
from .profiles import ADAM, SIGN, prepare
from .search import parabola_vertex

__all__ = [
    "NAME",
    "TASKS",
    "compare_setting",
    "format_result",
    "grid_peak",
    "plot",
    "predicted_curve",
    "run",
]

NAME = "adam"
TASKS = ("text",)
SETTINGS = {"default": ADAM, "beta0": SIGN}


def predicted_curve(m: dict[str, float], sizes: list[float]) -> list[float]:
    """The sign-descent optimum at each size from the early measurements ``m`` (nan where the
    sums are not usable)."""
    out = []
    for b in sizes:
        try:
            out.append(adam_sign_descent_lr(m["l1"], m["tr_h"], m["s_h_s"], m["kappa2"], b))
        except (ValueError, TypeError):
            out.append(math.nan)
    return out


def grid_peak(sizes: list[float], best: list[float], lr_factor: float) -> dict[str, Any]:
    """Where the best learning rate peaks over the grid, and whether it surges (docstring)."""
    i = max(range(len(best)), key=lambda j: best[j])
    inside = 0 < i < len(best) - 1
    peak = float(sizes[i])
    if inside:
        v = parabola_vertex(tuple(math.log(s) for s in sizes[i - 1:i + 2]),
                            tuple(-math.log(b) for b in best[i - 1:i + 2]))
        if v is not None and abs(math.log(sizes[i + 1] / sizes[i]) -
                                 math.log(sizes[i] / sizes[i - 1])) < 1e-9:
            peak = math.exp(v)
    surge = inside and best[-1] < best[i] / lr_factor
    where = "inside" if inside else ("at the largest size (no peak seen)" if i == len(best) - 1
                                     else "at the smallest size")
    return {"b_peak": peak if inside else None, "argmax_size": sizes[i], "where": where,
            "surge": surge, "drop_after_peak": ratio(best[-1], best[i])}


def compare_setting(sweep: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    rows = sweep["batch_sizes"]
    sizes = [r["batch_size"] for r in rows]
    best = [r["lr_run"] for r in rows]
    m = ref["summary"].get("adam_early", {})
    pred = predicted_curve(m, sizes) if m else [math.nan] * len(sizes)
    try:
        b_peak = adam_plateau_batch_size(m["kappa2"], m["off_ratio"], 0.0)
    except (ValueError, TypeError, KeyError):
        b_peak = math.nan
    gp = grid_peak(sizes, best, sweep["spec"]["lr_factor"])
    top = max(best)
    ptop = max((p for p in pred if finite(p)), default=math.nan)
    out = {"optimizer": sweep["optimizer"], "sweep_key": sweep["key"], "sizes": sizes,
           "tokens": [r["tokens"] for r in rows], "best_lr": best,
           "best_grid_lr": [r["lr"] for r in rows], "early": m,
           "reference_batch": ref["spec"]["batch_size"],
           "early_until_step": ref["summary"]["early_until_step"], "predicted": pred,
           "fit": fit_constant(best, pred), "b_peak_predicted": b_peak, "grid": gp,
           "shape": {"measured": [b / top for b in best],
                     "predicted": [p / ptop if finite(p) else math.nan for p in pred]}}
    gb = gp["b_peak"]
    out["b_peak_within_2x"] = (gb is not None and finite(b_peak)
                               and 0.5 <= b_peak / gb <= 2.0)
    return out


def run(quick: bool, out: Path, tasks: tuple[str, ...] = TASKS, threads: int = 1,
        corpus: str = "pinned", log: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Runs the Adam experiment on the text task, both settings."""
    t0 = time.perf_counter()
    settings, rows = {}, []
    for label, optim in SETTINGS.items():
        _, sw, ref = prepare("text", optim, quick, out, threads=threads, corpus=corpus,
                             log=log)
        e = settings[label] = compare_setting(sw, ref)
        e["task"] = sw["task"]
        for i, b in enumerate(e["sizes"]):
            rows.append({"setting": label, "optimizer": optim.label, "batch_size": b,
                         "batch_tokens": e["tokens"][i], "best_lr_run": e["best_lr"][i],
                         "best_grid_lr": e["best_grid_lr"][i], "predicted": e["predicted"][i],
                         "c_predicted": e["fit"]["c"] * e["predicted"][i],
                         "ratio": e["fit"]["ratios"][i],
                         "shape_measured": e["shape"]["measured"][i],
                         "shape_predicted": e["shape"]["predicted"][i]})
    a, z = settings["default"]["shape"]["measured"], settings["beta0"]["shape"]["measured"]
    shape_gap = max(abs(math.log(x / y)) for x, y in zip(a, z))
    return {"experiment": "Adam, measured: best lr against B and the surge", "quick": quick,
            "settings": settings,
            "shape_default_vs_beta0_max_log_ratio": shape_gap, "wall_s": time.perf_counter() - t0
            }, rows


def format_result(result: dict[str, Any]) -> str:
    lines = ["Adam: best learning rate of a run against the sign-descent curve (text task)"]
    for label, e in result["settings"].items():
        g, f = e["grid"], e["fit"]
        lines += ["", (f"{label}: {e['optimizer']}; early measurements kappa^2 "
                       f"{num(e['early'].get('kappa2'))}, off-diagonal ratio "
                       f"{num(e['early'].get('off_ratio'))}, c = {num(f['c'], 3)}"),
                  f"  {'B (seq)':>8} {'tokens':>7} {'best lr':>10} {'c eta*':>10} {'ratio':>7}"]
        for i, b in enumerate(e["sizes"]):
            lines.append(f"  {b:>8} {e['tokens'][i]:>7} {e['best_lr'][i]:>10.4g} "
                         f"{num(f['c'] * e['predicted'][i]):>10} {num(f['ratios'][i], 3):>7}")
        lines.append(f"  grid peak {g['where']} (B = {num(g['b_peak'])}), surge: "
                     f"{'yes' if g['surge'] else 'no'}; predicted B_peak "
                     f"{num(e['b_peak_predicted'])}; within 2x: {e['b_peak_within_2x']}")
    lines.append(f"shape, default vs beta 0 (each over its maximum): largest |log ratio| "
                 f"{num(result['shape_default_vs_beta0_max_log_ratio'], 3)}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    sets = result["settings"]
    fig, axes = figure(1, len(sets) + 1)
    for ax, (label, e) in zip(axes[0], sets.items()):
        xs = log_grid(min(e["sizes"]) / 2, max(e["sizes"]) * 2)
        curves = {}
        if finite(e["fit"]["c"]):
            c = e["fit"]["c"]
            curves[f"c eta*(B), sign descent, measured early (c = {c:.2g})"] = (
                xs, [c * p for p in predicted_curve(e["early"], xs)])
        lr_panel(ax, e["sizes"], e["best_lr"], curves, "sequences",
                 f"{label}: {e['optimizer']}", e["best_grid_lr"])
        if finite(e["b_peak_predicted"]):
            ax.axvline(e["b_peak_predicted"], ls=":", color="tab:purple",
                       label="predicted B_peak")
        if e["grid"]["b_peak"] is not None:
            ax.axvline(e["grid"]["b_peak"], ls="--", color="tab:red", label="grid's B_peak")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for label, e in sets.items():
        pred = [math.nan if v is None else v for v in e["shape"]["predicted"]]  # JSON null
        ax.plot(e["sizes"], e["shape"]["measured"], marker="o", label=f"{label}: best lr / max")
        ax.plot(e["sizes"], pred, ls="--", label=f"{label}: predicted / max")
    log_axis(ax, "x")
    ax.set_xlabel("batch size B (sequences)")
    ax.set_ylabel("learning rate / its maximum over B")
    ax.set_title("shape apart from eta_max", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, str(path))
