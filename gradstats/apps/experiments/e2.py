"""E2, best learning rate: the best SGD learning rate of a whole run at each batch size against
McCandlish et al.'s ``eta*(B) = eta_max / (1 + B_noise/B)`` with ``eta_max = |G|^2/(G^T H G)``
and ``B_noise = tr(H Sigma)/(G^T H G)`` measured online by
:class:`~gradstats.CurvatureEstimator` early in training (:mod:`.measure`).

``eta*`` is the greedy optimum of one step; the best constant learning rate of a whole run
differs from it by a factor, so one constant ``c`` is fitted over all ``B`` (least squares in
``log``: ``log c = mean_B log(lr_run(B) / eta*(B))``), and the test is whether ``c eta*(B)`` is
within 30% of the best learning rate at every ``B``: only the *shape* ``1/(1 + B_noise/B)`` is
predicted. The best learning rate of the run is the sweep's (:mod:`.search`, the same runs as
E1): the grid point with the fewest steps to the target, refined by a parabola in
``log(lr)``. For comparison: the same with ``B_noise`` and ``eta_max`` averaged over the whole
run, and a two-parameter fit of ``eta_max / (1 + B_noise/B)`` to the best learning rates
(what ``B_noise`` the data themselves ask for).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...scaling import sgd_optimal_lr
from ..common import num
from .output import figure, finite, log_grid, lr_panel, save
from .profiles import SGD, prepare

__all__ = [
    "NAME",
    "TASKS",
    "TOLERANCE",
    "compare",
    "fit_constant",
    "fit_curve",
    "format_result",
    "plot",
    "run",
]

NAME = "e2"
TASKS = ("digits-mlp", "digits-cnn")
TOLERANCE = 0.3


def fit_constant(best: Sequence[float], predicted: Sequence[float]) -> dict[str, Any]:
    """``c = exp(mean log(best/predicted))``, ``ratio_B = c predicted_B / best_B`` and whether
    every ratio is within :data:`TOLERANCE` of 1."""
    pairs = [(b, p) for b, p in zip(best, predicted) if finite(p) and p > 0 and b > 0]
    if len(pairs) != len(best) or not pairs:
        return {"c": math.nan, "ratios": [math.nan] * len(best), "max_deviation": math.nan,
                "within_tolerance": False, "reason": "prediction undefined at some batch size"}
    c = math.exp(sum(math.log(b / p) for b, p in pairs) / len(pairs))
    ratios = [c * p / b for b, p in pairs]
    dev = max(abs(r - 1.0) for r in ratios)
    return {"c": c, "ratios": ratios, "max_deviation": dev,
            "within_tolerance": dev <= TOLERANCE, "reason": None}


def fit_curve(sizes: Sequence[float], best: Sequence[float]) -> dict[str, float]:
    """Least-squares fit of ``log lr = log eta_max - log(1 + B_noise/B)`` to the best learning
    rates: ``B_noise`` on a log grid (``1e-3 .. 1e3`` times the sizes' range, refined twice),
    ``eta_max`` in closed form at each."""
    logs = [math.log(b) for b in best]

    def sse(bn: float) -> tuple[float, float]:
        r = [y + math.log(1.0 + bn / s) for y, s in zip(logs, sizes)]
        m = sum(r) / len(r)
        return sum((x - m) ** 2 for x in r), math.exp(m)

    lo, hi = min(sizes) * 1e-3, max(sizes) * 1e3
    for _ in range(3):
        grid = log_grid(lo, hi, 61)
        i = min(range(len(grid)), key=lambda j: sse(grid[j])[0])
        lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    bn = grid[i]
    err, eta = sse(bn)
    return {"b_noise": bn, "eta_max": eta, "rms_log_residual": math.sqrt(err / len(sizes))}


def compare(sweep: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """E2's numbers for one task (module docstring)."""
    s = ref["summary"]
    rows = sweep["batch_sizes"]
    sizes = [r["batch_size"] for r in rows]
    best = [r["lr_run"] for r in rows]
    out: dict[str, Any] = {"task": sweep["task"], "optimizer": sweep["optimizer"],
                           "target": sweep["target"], "sweep_key": sweep["key"],
                           "reference_batch": ref["spec"]["batch_size"],
                           "early_until_step": s["early_until_step"],
                           "reference_steps": ref["steps"], "sizes": sizes, "best_lr": best,
                           "best_grid_lr": [r["lr"] for r in rows],
                           "parabola_used": [r["lr_parabola"] is not None for r in rows],
                           "lr_factor": sweep["spec"]["lr_factor"], "predictions": {}}
    for label, eta, bn in (("early", s["eta_max_early"], s["b_noise_early"]),
                           ("run_average", s["eta_max_run_average"], s["b_noise_run_average"])):
        ok = finite(eta) and eta > 0 and finite(bn) and bn >= 0
        pred = [sgd_optimal_lr(eta, bn, b) if ok else math.nan for b in sizes]
        out["predictions"][label] = {"eta_max": eta, "b_noise": bn, "eta_star": pred,
                                     **fit_constant(best, pred)}
    out["free_fit"] = fit_curve(sizes, best)
    out["target_met"] = out["predictions"]["early"]["within_tolerance"]
    return out


def run(quick: bool, out: Path, tasks: tuple[str, ...] = TASKS, threads: int = 1,
        corpus: str = "pinned", log: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Runs E2 (reusing E1's sweeps and reference runs from ``out`` when present)."""
    t0 = time.perf_counter()
    entries, rows = {}, []
    for name in tasks:
        _, sw, ref = prepare(name, SGD, quick, out, threads=threads, corpus=corpus, log=log)
        e = entries[name] = compare(sw, ref)
        early = e["predictions"]["early"]
        for i, b in enumerate(e["sizes"]):
            rows.append({"task": name, "batch_size": b, "best_lr_run": e["best_lr"][i],
                         "best_grid_lr": e["best_grid_lr"][i],
                         "parabola": e["parabola_used"][i], "eta_star": early["eta_star"][i],
                         "c": early["c"], "c_eta_star": early["c"] * early["eta_star"][i],
                         "ratio": early["ratios"][i]})
    return {"experiment": "E2 best SGD learning rate", "quick": quick, "tasks": entries,
            "tolerance": TOLERANCE, "wall_s": time.perf_counter() - t0}, rows


def format_result(result: dict[str, Any]) -> str:
    lines = ["E2, best SGD learning rate of a run against c eta_max / (1 + B_noise/B)"]
    for name, e in result["tasks"].items():
        p = e["predictions"]["early"]
        lines += ["", (f"{name}: eta_max {num(p['eta_max'])}, B_noise {num(p['b_noise'])} "
                       f"(measured at steps <= {e['early_until_step']:.0f} of "
                       f"{e['reference_steps']}), c = {num(p['c'], 3)}"),
                  f"  {'B':>6} {'best lr':>10} {'c eta*':>10} {'ratio':>7}"]
        for i, b in enumerate(e["sizes"]):
            lines.append(f"  {b:>6} {e['best_lr'][i]:>10.4g} "
                         f"{num(p['c'] * p['eta_star'][i]):>10} {num(p['ratios'][i], 3):>7}")
        verdict = "met" if p["within_tolerance"] else "MISSED"
        lines.append(f"  target (within {100 * TOLERANCE:.0f}% at every B): {verdict}, largest "
                     f"deviation {num(100 * p['max_deviation'], 3)}%")
        ff = e["free_fit"]
        lines.append(f"  the data's own fit: eta_max {num(ff['eta_max'])}, B_noise "
                     f"{num(ff['b_noise'])} (rms log residual {num(ff['rms_log_residual'], 2)})")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    tasks = result["tasks"]
    fig, axes = figure(1, len(tasks))
    for ax, (name, e) in zip(axes[0], tasks.items()):
        xs = log_grid(min(e["sizes"]) / 2, max(e["sizes"]) * 2)
        curves = {}
        for label, p in e["predictions"].items():
            if finite(p["c"]):
                curves[f"c eta*(B), {label.replace('_', ' ')}: c = {p['c']:.2g}, B_noise = "
                       f"{p['b_noise']:.3g}"] = (
                    xs, [p["c"] * sgd_optimal_lr(p["eta_max"], p["b_noise"], b) for b in xs])
        ff = e["free_fit"]
        curves[f"fit to the best lrs: B_noise = {ff['b_noise']:.3g}"] = (
            xs, [sgd_optimal_lr(ff["eta_max"], ff["b_noise"], b) for b in xs])
        lr_panel(ax, e["sizes"], e["best_lr"], curves, e["task"]["unit"],
                 f"{name}: best SGD lr vs the measured eta*(B)", e["best_grid_lr"])
    save(fig, str(path))
