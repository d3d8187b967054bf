"""E3, closed loop: the batch size set from the measured noise scale while training
(:class:`~gradstats.schedulers.BatchSizeController`: ``B = clip(alpha B_simple, B_min, B_max)``
from the monitor's smoothed ``B_simple`` after every step, the learning rate coupled by the
rule ``"sgd-optimal"``, ``lr(B) = lr(B_min) (1 + B_simple/B_min)/(1 + B_simple/B)``; Adam:
``"adam-optimal"``), trained to E1's target, against

* E1's fitted fixed-batch frontier ``S = S_min + E_min/B``, taken at the examples ``E`` the
  controller used: a fixed batch size needs ``S_fixed(E) = S_min E / (E - E_min)`` steps for
  them (infinitely many when ``E <= E_min``); the saving is ``1 - S / S_fixed(E)``;
* a hand-set ramp: the batch size doubles from ``B_min`` to ``B_max`` at loss thresholds spaced
  geometrically between the initial loss and the target, the learning rate at each size the
  sweep's best one (interpolated in log-log).

``B_min``, ``B_max`` are the sweep's smallest and largest sizes, ``lr(B_min)`` its best learning
rate there. Several seeds (initialisation and data order); the interval of the mean saving is a
bootstrap over the seeds and over E1's runs (the fit redone on each resample).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...critical import fit_critical_batch
from ...monitor import GradStatsMonitor, StepStats
from ...schedulers import BatchSizeController
from ..common import num
from ..plotting import COLORS, log_axis
from ..sweep import _num_threads
from .e1 import optim_for
from .output import figure, finite, frontier_panel, save
from .profiles import prepare
from .runner import train
from .tasks import make_task

__all__ = [
    "DEFAULT_TASKS",
    "NAME",
    "TARGET_SAVING",
    "TASKS",
    "ControllerSchedule",
    "RampSchedule",
    "format_result",
    "frontier_examples",
    "frontier_steps",
    "plot",
    "run",
    "savings_interval",
]

NAME = "e3"
TASKS = ("digits-mlp", "digits-cnn", "text")
DEFAULT_TASKS = ("digits-mlp", "digits-cnn")
TARGET_SAVING = 0.25


def frontier_steps(s_min: float, e_min: float, examples: float) -> float:
    """Steps a fixed batch size needs to reach the target with ``examples`` examples:
    ``S_min E / (E - E_min)``, inf for ``E <= E_min``."""
    return s_min * examples / (examples - e_min) if examples > e_min else math.inf


def frontier_examples(s_min: float, e_min: float, steps: float) -> float:
    """Examples a fixed batch size needs to reach the target in ``steps`` steps:
    ``E_min S / (S - S_min)``, inf for ``S <= S_min``."""
    return e_min * steps / (steps - s_min) if steps > s_min else math.inf


class ControllerSchedule:
    """The controller in a run: reads the smoothed ``B_simple`` after each step."""

    def __init__(self, ctl: BatchSizeController) -> None:
        self.ctl, self.batch_size = ctl, ctl.batch_size
        self.trace: list[tuple[int, float, int, float]] = []

    def after_step(self, step: int, stats: StepStats | None, loss: float | None,
                   optimizer: torch.optim.Optimizer) -> None:
        if self.ctl.optimizer is None:  # the run makes the optimizer; lr ratio is 1 at B_min
            self.ctl.optimizer = optimizer
        b = stats.b_simple_ema if stats is not None else math.nan
        self.batch_size = self.ctl.update(b)
        self.trace.append((step, b, self.batch_size, float(optimizer.param_groups[0]["lr"])))


class RampSchedule:
    """Doubling at loss thresholds, learning rate from a table ``lr_at(B)``."""

    def __init__(self, sizes: list[int], thresholds: list[float], lr_at: Any) -> None:
        self.sizes, self.thresholds, self.lr_at = sizes, thresholds, lr_at
        self.level, self.batch_size = 0, sizes[0]
        self.trace: list[tuple[int, float, int, float]] = []

    def after_step(self, step: int, stats: StepStats | None, loss: float | None,
                   optimizer: torch.optim.Optimizer) -> None:
        while (loss is not None and self.level < len(self.thresholds)
               and loss <= self.thresholds[self.level]):
            self.level += 1
            self.batch_size = self.sizes[self.level]
            for g in optimizer.param_groups:
                g["lr"] = self.lr_at(self.batch_size)
        self.trace.append((step, math.nan, self.batch_size,
                           float(optimizer.param_groups[0]["lr"])))


def _lr_table(rows: list[dict[str, Any]]) -> Any:
    xs = np.log([r["batch_size"] for r in rows])
    ys = np.log([r["lr_run"] for r in rows])
    return lambda b: float(np.exp(np.interp(math.log(b), xs, ys)))


def savings_interval(sweep_runs: list[dict[str, Any]], steps: list[float],
                     examples: list[float], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean over seeds of ``1 - S_i / S_fixed(E_i)`` with a 95% percentile bootstrap over the
    seeds and over the sweep's runs (refit on each resample)."""
    b = np.array([r["batch_size"] for r in sweep_runs], dtype=float)
    s = np.array([r["steps"] for r in sweep_runs], dtype=float)

    def saving(s_min: float, e_min: float, idx: np.ndarray) -> float:
        return float(np.mean([1.0 - steps[i] / frontier_steps(s_min, e_min, examples[i])
                              for i in idx]))

    fit = fit_critical_batch(b, s, n_boot=0)
    point = saving(fit.s_min, fit.e_min, np.arange(len(steps)))
    rng, vals, failed = np.random.default_rng(seed), [], 0
    for _ in range(n_boot):
        ri = rng.integers(0, len(b), len(b))
        try:
            f = fit_critical_batch(b[ri], s[ri], n_boot=0)
        except ValueError:
            failed += 1
            continue
        vals.append(saving(f.s_min, f.e_min, rng.integers(0, len(steps), len(steps))))
    lo, hi = (np.quantile(vals, [0.025, 0.975]).tolist() if vals else [math.nan, math.nan])
    return {"mean": point, "ci": [lo, hi], "resamples": len(vals), "failed_fits": failed,
            "per_seed": [1.0 - steps[i] / frontier_steps(fit.s_min, fit.e_min, examples[i])
                         for i in range(len(steps))]}


def _one(task_name: str, quick: bool, out: Path, threads: int, corpus: str, log: Any,
         seeds: tuple[int, ...], alpha: float, beta: float) -> dict[str, Any]:
    optim = optim_for(task_name)
    spec, sw, _ = prepare(task_name, optim, quick, out, threads=threads, corpus=corpus,
                          log=log, reference=False)
    if "error" in sw["fit"]:
        return {"error": sw["fit"]["error"]}
    task = make_task(spec.task)
    rows = sw["batch_sizes"]
    b_min, b_max = rows[0]["batch_size"], rows[-1]["batch_size"]
    lr_at = _lr_table(rows)
    rule = "sgd-optimal" if optim.name == "sgd" else "adam-optimal"
    fit = sw["fit"]
    runs: dict[str, list[dict[str, Any]]] = {"controller": [], "ramp": []}
    k = round(math.log2(b_max / b_min))
    ramp_sizes = [b_min * 2 ** j for j in range(k + 1)]
    with _num_threads(threads):
        for seed in seeds:
            ctl = BatchSizeController(b_min, b_max, micro_batch_size=1, multiple=b_min,
                                      alpha=alpha, hysteresis=0.1, lr_rule=rule,
                                      base_batch_size=b_min)
            sched = ControllerSchedule(ctl)
            r = train(task, optim, lr_at(b_min), spec.target, seed=seed, schedule=sched,
                      limit=spec.max_steps, monitor=lambda m, s=seed: GradStatsMonitor(
                          m, mode="hooks", loss_reduction="mean", beta=beta,
                          dataset_size=task.n_train, seed=s))
            runs["controller"].append({"seed": seed, **_run_row(r, sched, fit)})
            loss0 = r.initial_loss
            thr = [spec.target * (loss0 / spec.target) ** (1 - j / (k + 1))
                   for j in range(1, k + 1)]
            ramp = RampSchedule(ramp_sizes, thr, lr_at)
            r = train(task, optim, lr_at(b_min), spec.target, seed=seed, schedule=ramp,
                      limit=spec.max_steps)
            runs["ramp"].append({"seed": seed, **_run_row(r, ramp, fit)})
            if log is not None:
                c, h = runs["controller"][-1], runs["ramp"][-1]
                log(f"  {task_name} seed {seed}: controller S={c['steps']} E={c['examples']} "
                    f"({c['status']}); ramp S={h['steps']} E={h['examples']} ({h['status']})")
    out_d: dict[str, Any] = {"task": sw["task"], "optimizer": sw["optimizer"],
                             "target": spec.target, "sweep_key": sw["key"], "fit": fit,
                             "b_min": b_min, "b_max": b_max, "alpha": alpha, "beta": beta,
                             "lr_rule": rule, "base_lr": lr_at(b_min), "ramp_sizes": ramp_sizes,
                             "sweep_runs": sw["runs"], "runs": runs}
    n_boot = 200 if quick else 2000
    for kind, rs in runs.items():
        ok = [r for r in rs if r["status"] == "reached"]
        if len(ok) < len(rs):
            out_d[kind] = {"error": f"{len(rs) - len(ok)} of {len(rs)} runs did not reach the "
                                    "target"}
            continue
        sv = savings_interval(sw["runs"], [r["steps"] for r in ok], [r["examples"] for r in ok],
                              n_boot)
        out_d[kind] = {"savings": sv, "mean_steps": float(np.mean([r["steps"] for r in ok])),
                       "mean_examples": float(np.mean([r["examples"] for r in ok])),
                       "target_met": sv["mean"] >= TARGET_SAVING,
                       "target_met_at_lower_end": finite(sv["ci"][0])
                       and sv["ci"][0] >= TARGET_SAVING}
    return out_d


def _run_row(r: Any, sched: Any, fit: dict[str, Any]) -> dict[str, Any]:
    return {"status": r.status, "steps": r.steps, "examples": r.examples,
            "frontier_steps_at_examples": frontier_steps(fit["s_min"], fit["e_min"], r.examples),
            "frontier_examples_at_steps": frontier_examples(fit["s_min"], fit["e_min"], r.steps),
            "trace": [list(t) for t in sched.trace[:r.steps]]}


def run(quick: bool, out: Path, tasks: tuple[str, ...] = DEFAULT_TASKS, threads: int = 1,
        corpus: str = "pinned", log: Any = None, seeds: tuple[int, ...] = (0, 1, 2),
        alpha: float = 1.0, beta: float = 0.9) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Runs E3 (reusing E1's sweeps from ``out`` when present)."""
    t0 = time.perf_counter()
    entries, rows = {}, []
    for name in tasks:
        e = entries[name] = _one(name, quick, out, threads, corpus, log, seeds, alpha, beta)
        for kind, rs in e.get("runs", {}).items():
            rows += [{"task": name, "schedule": kind, "seed": r["seed"], "status": r["status"],
                      "steps": r["steps"], "examples": r["examples"],
                      "frontier_steps_at_examples": r["frontier_steps_at_examples"],
                      "saving": 1.0 - r["steps"] / r["frontier_steps_at_examples"]}
                     for r in rs]
    return {"experiment": "E3 closed-loop batch size", "quick": quick, "tasks": entries,
            "target_saving": TARGET_SAVING, "wall_s": time.perf_counter() - t0}, rows


def format_result(result: dict[str, Any]) -> str:
    lines = ["E3, closed-loop batch size against the fixed-batch frontier and a hand-set ramp"]
    for name, e in result["tasks"].items():
        if "error" in e:
            lines += ["", f"{name}: {e['error']}"]
            continue
        lines += ["", (f"{name}: B in [{e['b_min']}, {e['b_max']}], lr rule {e['lr_rule']}, "
                       f"target {e['target']:g}")]
        for kind in ("controller", "ramp"):
            v = e[kind]
            if "error" in v:
                lines.append(f"  {kind}: {v['error']}")
                continue
            sv = v["savings"]
            lines.append(f"  {kind:<10} mean S {v['mean_steps']:.1f}, mean E "
                         f"{v['mean_examples']:.0f}: steps saved against a fixed batch with "
                         f"as many examples {num(100 * sv['mean'], 3)}% (95% interval "
                         f"{num(100 * sv['ci'][0], 3)}..{num(100 * sv['ci'][1], 3)}%); target "
                         f"{100 * TARGET_SAVING:.0f}%: {'met' if v['target_met'] else 'MISSED'}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    tasks = {k: v for k, v in result["tasks"].items() if "error" not in v}
    if not tasks:
        return
    fig, axes = figure(len(tasks), 2)
    for (ax, ax2), (name, e) in zip(axes, tasks.items()):
        frontier_panel(ax, e["sweep_runs"], e["fit"], {}, e["task"]["unit"],
                       f"{name}: closed loop vs the fixed-batch frontier")
        for kind, color, marker in (("controller", COLORS["b_simple"], "*"),
                                    ("ramp", COLORS["batch"], "D")):
            rs = [r for r in e["runs"][kind] if r["status"] == "reached"]
            ax.scatter([r["examples"] for r in rs], [r["steps"] for r in rs], marker=marker,
                       s=70, color=color, zorder=4, label=kind)
            for r in e["runs"][kind]:
                tr = r["trace"]
                if tr:
                    ax2.step([t[0] for t in tr], [t[2] for t in tr], where="post", color=color,
                             lw=1, alpha=0.7, label=kind if r["seed"] == e["runs"][kind][0][
                                 "seed"] else None)
        ax.legend(fontsize=7)
        log_axis(ax2)
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel(f"batch size ({e['task']['unit']})")
        ax2.set_title(f"{name}: batch size during the runs", fontsize=9)
        ax2.legend(fontsize=7)
    save(fig, str(path))
