"""The online measurements of one reference run: the run at one batch size with its best
learning rate (seed 0), repeated with every estimator attached.

* :class:`~gradstats.GradStatsMonitor` (hooks mode: the training arithmetic is unchanged):
  ``B_simple = tr(Sigma)/|G|^2`` each step and its EMA.
* ``B_simple`` of a big batch (the whole training split for digits, ``big_batch`` fresh windows
  for text) at ``big_points`` evenly spaced steps: a low-noise view of the same quantity.
* :class:`~gradstats.CurvatureEstimator` every ``curvature_every`` steps, on a fresh batch of
  ``meas_batch`` examples split in halves, ``H`` taken on another independent batch of the same
  size: ``B_noise = tr(H Sigma)/(G^T H G)`` and ``eta_max = |G|^2/(G^T H G)``.
* Adam runs: :class:`~gradstats.AdamNoiseEstimator` every ``adam_every`` steps on a fresh batch
  of ``meas_batch`` examples (``groups`` jackknife groups), ``kappa^2`` matched at the run's
  batch size: ``l1``, ``tr H``, ``s^T H s``, ``beta_noise``, ``B_peak``, ``B_noise-2``.

Every estimator runs inside ``monitor.paused()`` and draws its batches from its own stream, so
the run takes the same steps as the sweep's run with that seed. "Early in training" means the
measurements at steps ``<= early_fraction * S`` (``S`` the reference run's steps), combined as a
ratio of means of the unbiased sums (``B_noise = mean tr(H Sigma) / mean G^T H G``).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...adam import AdamNoiseEstimator
from ...critical import predict_from_b_simple
from ...curvature import CurvatureEstimator
from ...monitor import GradStatsMonitor, StepStats
from ..common import ratio, write_json
from ..sweep import _num_threads
from .runner import Optim, train
from .tasks import TaskConfig, make_task

__all__ = ["MeasureSpec", "early_mean", "get_reference", "progress_weighted", "reference_run"]


@dataclass(frozen=True)
class MeasureSpec:
    """What the reference run measures and how often (module docstring)."""

    task: TaskConfig
    optim: Optim
    batch_size: int
    lr: float
    target: float
    expect_steps: int
    seed: int = 0
    beta: float = 0.9
    meas_batch: int = 128
    curvature_points: int = 40
    adam_points: int = 8
    groups: int = 8
    big_points: int = 20
    big_batch: int = 512
    early_fraction: float = 0.2
    max_steps: int = 5000
    threads: int = 1

    def every(self, points: int) -> int:
        return max(1, math.ceil(self.expect_steps / points))


def _mean(xs: Sequence[float]) -> float:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan


def early_mean(rows: Sequence[dict[str, Any]], num: str, den: str, until: float) -> float:
    """``mean(num) / mean(den)`` over the rows with ``step <= until``."""
    sel = [r for r in rows if r["step"] <= until]
    return ratio(_mean([r[num] for r in sel]), _mean([r[den] for r in sel]))


def progress_weighted(rows: Sequence[dict[str, Any]], key: str, batch_size: float,
                      steps: int) -> dict[str, float]:
    """:func:`gradstats.critical.predict_from_b_simple` over ``rows`` (each ``{"step", key}``
    standing for the steps up to the next row, the last up to ``steps``)."""
    pts = [r for r in rows if r["step"] < steps]
    if not pts:
        return {"s_min": math.nan, "e_min": math.nan, "b_crit": math.nan}
    ends = [r["step"] for r in pts[1:]] + [steps]
    p = predict_from_b_simple([r[key] for r in pts], batch_size,
                              span=[e - r["step"] for r, e in zip(pts, ends)])
    return {"s_min": p.s_min, "e_min": p.e_min, "b_crit": p.b_crit}


def _est(e: Any) -> tuple[float, float]:
    return e.value, e.stderr


def reference_run(spec: MeasureSpec) -> dict[str, Any]:
    """Runs the reference run with the estimators (module docstring); JSON-able result."""
    task = make_task(spec.task)
    gen_seed = 7919 + 1000 * spec.seed
    meas = task.stream(gen_seed)
    hist: list[dict[str, Any]] = []
    curv_rows: list[dict[str, Any]] = []
    adam_rows: list[dict[str, Any]] = []
    big_rows: list[dict[str, Any]] = []
    state: dict[str, Any] = {}
    n_m = spec.meas_batch if task.n_train is None else min(spec.meas_batch, task.n_train // 2)

    def monitor(model: nn.Module) -> GradStatsMonitor:
        mon = GradStatsMonitor(model, mode="hooks", loss_reduction="mean", beta=spec.beta,
                               dataset_size=task.n_train, seed=spec.seed)
        state["mon"] = mon
        state["curv"] = CurvatureEstimator(model, task.loss, beta=0.9, monitor=mon)
        if spec.optim.name == "adam":
            state["adam"] = AdamNoiseEstimator(model, task.loss, batch_size=spec.batch_size,
                                               groups=spec.groups, monitor=mon,
                                               dataset_size=task.n_train, seed=spec.seed)
        return mon

    def on_stats(step: int, st: StepStats) -> None:
        lo, hi = st.b_simple_interval
        hist.append({"step": step, "tr_sigma": st.tr_sigma, "g2": st.g2,
                     "b_simple": st.b_simple, "b_simple_ema": st.b_simple_ema,
                     "b_simple_lo": lo, "b_simple_hi": hi})

    def on_step(step: int, model: nn.Module, opt: torch.optim.Optimizer, batch: Any) -> None:
        if step % spec.every(spec.curvature_points) == 0:
            a, h = meas.next(n_m), meas.next(n_m)
            r = state["curv"].update(a, hessian_batch=h)
            curv_rows.append({"step": step, "tr_h_sigma": r.tr_h_sigma, "gHg": r.gHg,
                              "g2": r.g2, "b_noise": r.b_noise, "eta_max": r.eta_max,
                              "b_noise_ema": r.b_noise_ema, "eta_max_ema": r.eta_max_ema,
                              "method": r.method})
        if "adam" in state and step % spec.every(spec.adam_points) == 0:
            r = state["adam"].update(meas.next(n_m), optimizer=opt if step > 0 else None)
            row = {"step": step}
            for k in ("l1", "kappa2", "b_simple", "tr_h", "s_h_s", "off_ratio", "beta_noise",
                      "eta_max", "b_peak", "b_noise2", "inv_b_peak"):
                row[k], row[k + "_se"] = _est(getattr(r, k))
            adam_rows.append(row)
        if step % spec.every(spec.big_points) == 0:
            # a copy of the model with its own monitor (beta 0): one monitor per model
            x = task.big_batch(spec.big_batch, 31 + step)
            twin, bm = state["twin"]
            twin.load_state_dict(model.state_dict())
            task.loss(twin, x).backward()
            st = bm.step()
            twin.zero_grad(set_to_none=True)
            big_rows.append({"step": step, "b_simple": st.b_simple, "tr_sigma": st.tr_sigma,
                             "g2": st.g2, "n": int(x[0].shape[0])})

    twin = task.model(spec.seed)
    state["twin"] = (twin, GradStatsMonitor(twin, mode="hooks", loss_reduction="mean", beta=0.0,
                                            dataset_size=task.n_train, seed=spec.seed))
    try:
        with _num_threads(spec.threads):
            res = train(task, spec.optim, spec.lr, spec.target, seed=spec.seed,
                        batch_size=spec.batch_size, limit=spec.max_steps, monitor=monitor,
                        on_step=on_step, on_stats=on_stats)
    finally:
        state["twin"][1].detach()
    S, B = res.steps, spec.batch_size
    until = spec.early_fraction * S
    out = {"spec": asdict(spec), "run": res.to_dict(), "steps": S,
           "same_steps_as_sweep": res.reached and S == spec.expect_steps,
           "history": hist, "curvature": curv_rows, "adam": adam_rows, "big_batch": big_rows,
           "summary": {
               "b_simple_online_run_average": ratio(_mean([h["tr_sigma"] for h in hist]),
                                                    _mean([h["g2"] for h in hist])),
               "b_simple_online_at_target": hist[-1]["b_simple_ema"] if hist else math.nan,
               "b_simple_progress_weighted_online": progress_weighted(
                   [{"step": h["step"] - 1, "v": h["b_simple_ema"]} for h in hist], "v", B, S),
               "b_simple_progress_weighted_big": progress_weighted(big_rows, "b_simple", B, S),
               "b_noise_progress_weighted": progress_weighted(curv_rows, "b_noise_ema", B, S),
               "b_noise_early": early_mean(curv_rows, "tr_h_sigma", "gHg", until),
               "eta_max_early": early_mean(curv_rows, "g2", "gHg", until),
               "b_noise_run_average": early_mean(curv_rows, "tr_h_sigma", "gHg", S),
               "eta_max_run_average": early_mean(curv_rows, "g2", "gHg", S),
               "early_until_step": until}}
    if adam_rows:
        sel = [r for r in adam_rows if r["step"] <= until] or adam_rows[:1]
        out["summary"]["adam_early"] = {k: _mean([r[k] for r in sel]) for k in
                                        ("l1", "kappa2", "tr_h", "s_h_s", "off_ratio",
                                         "b_noise2", "inv_b_peak")}
        out["summary"]["b_noise2_progress_weighted"] = progress_weighted(adam_rows, "b_noise2",
                                                                         B, S)
    return out


def get_reference(spec: MeasureSpec, out: str | Path, log: Any = None) -> dict[str, Any]:
    """:func:`reference_run`, kept under ``out/reference/`` and reused when run before."""
    d = asdict(replace(spec, threads=1))
    key = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(out) / "reference" / f"{spec.task.name}-{spec.optim.label}-B{spec.batch_size}-" \
                                     f"{key}.json"
    if path.is_file():
        if log is not None:
            log(f"reusing {path}")
        return json.loads(path.read_text())
    if log is not None:
        log(f"reference run with the estimators: {spec.task.name} {spec.optim.label} "
            f"B={spec.batch_size} lr={spec.lr:.4g}")
    result = reference_run(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, str(path))
    return result
