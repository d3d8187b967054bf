"""E1, critical batch: ``B_crit`` from the steps/examples trade-off beside the noise scales
measured online in one run, on the digits (MLP and CNN, SGD) and on the text task (Adam).

Per task: the sweep (:mod:`.search`: best learning rate of a grid at each batch size, every
seed trained to the target) gives runs ``(B, S, E)``; :func:`gradstats.critical.fit_critical_batch`
fits ``(S/S_min - 1)(E/E_min - 1) = 1`` and gives ``B_crit = E_min/S_min`` with a bootstrap
interval. The reference run (:mod:`.measure`) gives ``B_simple`` (online EMA, and of a big
batch) and the Hessian-weighted ``B_noise`` (:class:`~gradstats.CurvatureEstimator`) over
training; each is turned into a predicted ``(S_min, E_min)`` by the progress weighting of
:func:`gradstats.critical.predict_from_b_simple`. For Adam (text) the sign-descent ``B_noise-2``
(:class:`~gradstats.AdamNoiseEstimator`, the Adam counterpart of ``B_crit``) is reported too.
Text batch sizes are in sequences of ``context`` characters and, beside them, in tokens.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..common import num, ratio
from ..plotting import COLORS, log_axis, positive
from .output import figure, frontier_panel, save
from .profiles import ADAM, SGD, prepare

__all__ = ["NAME", "TASKS", "format_result", "optim_for", "plot", "run", "summarise"]

NAME = "e1"
TASKS = ("digits-mlp", "digits-cnn", "text")


def optim_for(task: str):
    return ADAM if task == "text" else SGD


def summarise(sweep: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """E1's numbers for one task from its sweep and reference run."""
    fit, s = sweep["fit"], ref["summary"]
    k = sweep["task"]["tokens_per_example"]
    noise = {"b_simple_progress_weighted_online": s["b_simple_progress_weighted_online"],
             "b_simple_progress_weighted_big_batch": s["b_simple_progress_weighted_big"],
             "b_noise_progress_weighted": s["b_noise_progress_weighted"]}
    if "b_noise2_progress_weighted" in s:
        noise["b_noise2_progress_weighted"] = s["b_noise2_progress_weighted"]
    b_crit = fit.get("b_crit", math.nan)
    compare = {name: {"value": v["b_crit"], "b_crit_over_it": ratio(b_crit, v["b_crit"])}
               for name, v in noise.items()}
    compare["b_simple_online_run_average"] = {
        "value": s["b_simple_online_run_average"],
        "b_crit_over_it": ratio(b_crit, s["b_simple_online_run_average"])}
    compare["b_noise_run_average"] = {"value": s["b_noise_run_average"],
                                      "b_crit_over_it": ratio(b_crit, s["b_noise_run_average"])}
    out = {"task": sweep["task"], "optimizer": sweep["optimizer"], "target": sweep["target"],
           "sweep_key": sweep["key"], "batch_sizes": sweep["batch_sizes"],
           "runs": sweep["runs"], "fit": fit, "reference": {
               "batch_size": ref["spec"]["batch_size"], "lr": ref["spec"]["lr"],
               "steps": ref["steps"], "same_steps_as_sweep": ref["same_steps_as_sweep"]},
           "noise_scales": compare, "predictions": noise, "unit": sweep["task"]["unit"],
           "tokens_per_example": k}
    if k > 1:
        out["in_tokens"] = {"b_crit": b_crit * k,
                            "b_crit_ci": [x * k if x is not None else None
                                          for x in fit.get("b_crit_ci", [None, None])],
                            **{n: v["value"] * k if v["value"] is not None else None
                               for n, v in compare.items()}}
    out["series"] = {"history": [{"step": h["step"], "b_simple_ema": h["b_simple_ema"]}
                                 for h in ref["history"]],
                     "big_batch": ref["big_batch"],
                     "curvature": [{"step": c["step"], "b_noise_ema": c["b_noise_ema"],
                                    "b_noise": c["b_noise"]} for c in ref["curvature"]],
                     "adam": [{"step": a["step"], "b_noise2": a["b_noise2"],
                               "kappa2": a["kappa2"]} for a in ref["adam"]]}
    return out


def run(quick: bool, out: Path, tasks: tuple[str, ...] = TASKS, threads: int = 1,
        corpus: str = "pinned", log: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Runs E1 (sweeps and reference runs are reused from ``out`` when present)."""
    t0 = time.perf_counter()
    entries, rows = {}, []
    for name in tasks:
        spec, sw, ref = prepare(name, optim_for(name), quick, out, threads=threads,
                                corpus=corpus, log=log)
        entries[name] = summarise(sw, ref)
        k = sw["task"]["tokens_per_example"]
        rows += [{"task": name, "optimizer": spec.optim.label, "batch_size": r["batch_size"],
                  "batch_tokens": r["batch_size"] * k, "seed": r["seed"], "lr": r["lr"],
                  "steps": r["steps"], "examples": r["examples"], "tokens": r["examples"] * k}
                 for r in sw["runs"]]
    return {"experiment": "E1 critical batch", "quick": quick, "tasks": entries,
            "wall_s": time.perf_counter() - t0}, rows


_LABELS = {"b_simple_progress_weighted_online": "B_simple online (EMA), progress-weighted",
           "b_simple_progress_weighted_big_batch": "B_simple big batch, progress-weighted",
           "b_noise_progress_weighted": "B_noise (Hessian), progress-weighted",
           "b_noise2_progress_weighted": "Adam B_noise-2, progress-weighted",
           "b_simple_online_run_average": "B_simple online, run average",
           "b_noise_run_average": "B_noise, run average"}


def format_result(result: dict[str, Any]) -> str:
    lines = ["E1, critical batch size against the measured noise scale"]
    for name, e in result["tasks"].items():
        f, u = e["fit"], e["unit"]
        lines += ["", (f"{name}: {e['task']['model']}; {e['optimizer']}; target "
                       f"{e['task']['target_on']} <= {e['target']:g}")]
        lines.append(f"  {'B':>6} {'best lr':>10} {'mean S':>8} {'mean E':>10}")
        for r in e["batch_sizes"]:
            lines.append(f"  {r['batch_size']:>6} {r['lr']:>10.4g} {r['mean_steps']:>8.1f} "
                         f"{r['mean_examples']:>10.0f}")
        if "error" in f:
            lines.append(f"  {f['error']}")
            continue
        lo, hi = f["b_crit_ci"]
        lines.append(f"  B_crit = {num(f['b_crit'])} {u} (95% interval {num(lo)}..{num(hi)}), "
                     f"S_min {num(f['s_min'])}, E_min {num(f['e_min'])}")
        for key, v in e["noise_scales"].items():
            lines.append(f"  {_LABELS[key]:<45} {num(v['value']):>10} {u}   "
                         f"B_crit / it = {num(v['b_crit_over_it'], 3)}")
        if "in_tokens" in e:
            lines.append(f"  in tokens ({e['tokens_per_example']} per sequence): B_crit = "
                         f"{num(e['in_tokens']['b_crit'])}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    tasks = result["tasks"]
    fig, axes = figure(len(tasks), 2)
    for row, (name, e) in zip(axes, tasks.items()):
        ax, ax2 = row
        if "error" in e["fit"]:
            ax.set_title(f"{name}: {e['fit']['error']}", fontsize=8)
            continue
        preds = {_LABELS[k]: (v["s_min"], v["e_min"]) for k, v in e["predictions"].items()}
        frontier_panel(ax, e["runs"], e["fit"], preds, e["unit"],
                       f"{name}: {e['optimizer']}, target {e['target']:g}")
        ser = e["series"]
        for key, rows, label, color in (
                ("b_simple_ema", ser["history"], "B_simple online (EMA)", COLORS["b_simple"]),
                ("b_simple", ser["big_batch"], "B_simple big batch", "black"),
                ("b_noise_ema", ser["curvature"], "B_noise (Hessian), EMA", COLORS["predicted"]),
                ("b_noise2", ser["adam"], "Adam B_noise-2", "tab:olive")):
            pts = [(r["step"], r[key]) for r in rows if positive(r.get(key))]
            if pts:
                ax2.plot(*zip(*pts), color=color, lw=1, label=label)
        f = e["fit"]
        ax2.axhline(f["b_crit"], color=COLORS["fit"], lw=2, label=f"B_crit (fit) {f['b_crit']:.3g}")
        lo, hi = f["b_crit_ci"]
        if positive(lo) and positive(hi):
            ax2.axhspan(lo, hi, color=COLORS["fit"], alpha=0.15, label="95% interval")
        log_axis(ax2)
        ax2.set_xlabel(f"steps of the reference run (B = {e['reference']['batch_size']} "
                       f"{e['unit']})")
        ax2.set_ylabel(f"noise scale ({e['unit']})")
        ax2.set_title(f"{name}: noise scales during training vs B_crit", fontsize=9)
        ax2.legend(fontsize=7)
    save(fig, str(path))
