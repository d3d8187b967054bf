"""``gradstats critical-batch``: the critical batch size of the demo model, measured by a sweep.

McCandlish et al. (2018): train at several batch sizes ``B``, each with its own best learning
rate, until a fixed target; record the steps ``S`` and examples ``E = B S`` it took. The runs lie
on ``(S/S_min - 1)(E/E_min - 1) = 1``, i.e. ``S = S_min + E_min/B``, and the critical batch size
is ``B_crit = E_min/S_min``: below it doubling the batch halves the steps, above it the extra
examples are wasted. For SGD the theory says ``B_crit ~ B_noise``, which the monitor's
``B_simple = tr(Sigma)/|G|^2`` stands in for, so the sweep also measures ``B_simple`` during one
reference run and reports the two side by side.

What is trained: the demo's MLP (:func:`gradstats.demo.make_model`) on the digits
(:func:`gradstats.demo.load_data`), plain SGD (no momentum, as in the theory), mean
cross-entropy. Each (batch size, learning rate) is trained a few times (``repeats``), repeat
``r`` always with the same initialisation and the same shuffled data order, whatever the batch
size and learning rate (shuffled epochs, the last partial batch dropped so every step has exactly
``B`` examples). The target is the cross-entropy over the whole training split, evaluated after
every step: ``S`` is the first step after which it is ``<= target``. Each repeat of a batch
size's best learning rate is one point of the fit (:func:`gradstats.critical.fit_critical_batch`,
bootstrap intervals over the runs).

Learning rate per batch size: a log-spaced grid (factor ``2**(1/4)``) around the SGD rule of thumb
``eta(B) = eta_max / (1 + B_guess/B)`` (:func:`gradstats.scaling.sgd_optimal_lr`); the learning
rate reaching the target in the fewest steps wins (ties: the first tried). When the winner is at
an end of the grid, the grid is extended that way while the steps keep falling, so the guesses
only set where the search starts. A candidate is stopped as soon as its steps (summed over the
repeats) reach the best so far (it cannot win), or when its loss blows up (non-finite or above
twice the initial loss).

``B_simple``: the best run at the reference batch size is repeated with a
:class:`~gradstats.GradStatsMonitor` attached (hooks mode, so the arithmetic and the step count
are unchanged), giving the online reading -- the EMA at the target and the run average. The
parameters of every step are also saved and ``B_simple`` of the whole training split computed at
each (exact: no sampling noise). Applying McCandlish et al.'s model step by step to that
trajectory predicts ``S_min``, ``E_min`` and ``B_crit`` from the one run
(:func:`predict_from_b_simple`), which the report puts beside the sweep's fit.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cli import UsageError, positive_float, positive_int
from .critical import CriticalBatchFit, fit_critical_batch
from .demo import ConfigError, Data, MissingDependency, load_data, make_model, write_json
from .monitor import GradStatsMonitor
from .scaling import sgd_optimal_lr

__all__ = ["HELP", "SweepConfig", "QUICK", "SweepError", "RunResult", "Trial",
           "train_to_target", "search_lr", "whole_split_b_simple", "predict_from_b_simple",
           "run_sweep", "format_result", "write_runs_csv", "save_outputs", "save_plot",
           "add_arguments", "config_from_args", "run_cli"]

HELP = ("measure the critical batch size B_crit = E_min/S_min of the demo model by training to a "
        "target loss at several batch sizes (each with its best learning rate), and compare it "
        "with the measured gradient noise scale B_simple")

Log = Callable[[str], None]


class SweepError(RuntimeError):
    """The sweep could not produce a result (no learning rate reached the target, or the runs
    show no steps/examples trade-off to fit)."""


@dataclass(frozen=True)
class SweepConfig:
    """What the sweep trains and how it searches.

    Each (batch size, learning rate) is trained ``repeats`` times, repeat ``r`` with seed
    ``seed + 1000 r`` for the initialisation and the data order (the same for every batch size
    and learning rate); the learning rate with the fewest steps summed over the repeats wins, and
    each of its repeats is one point of the fit. ``eta_max`` and ``b_guess`` only place the
    learning-rate grid: its centre at batch ``B`` is ``eta_max / (1 + b_guess/B)``; the grid has
    ``lr_candidates`` values ``lr_factor`` apart (offsets ``-(n-1)//2 .. n//2`` in powers of
    ``lr_factor``) and grows by up to ``max_extend`` values past an end that wins.
    ``reference_batch`` (default: the middle of the sorted batch sizes) is the batch of the run
    during which ``B_simple`` is measured, with the monitor's EMA factor ``beta``; the whole
    training split's ``B_simple`` is also computed at every step of that run (every
    ``ceil(S/whole_split_points)``-th step of a longer run).
    """

    batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
    target_loss: float = 0.01
    seed: int = 0
    repeats: int = 3
    eta_max: float = 3.0
    b_guess: float = 100.0
    lr_candidates: int = 5
    lr_factor: float = 2.0 ** 0.25
    max_extend: int = 6
    max_steps: int = 5000
    reference_batch: int | None = None
    beta: float = 0.9
    whole_split_points: int = 500
    n_boot: int = 2000
    confidence: float = 0.95
    hidden: int = 128
    threads: int = 1
    test_fraction: float = 0.2

    def check(self, n_train: int | None = None) -> None:
        """Raises :class:`~gradstats.demo.ConfigError` naming the first field out of range."""
        b = self.batch_sizes
        if len(b) < 2 or len(set(b)) != len(b):
            raise ConfigError("batch_sizes", f"must be at least two distinct sizes, got {list(b)}")
        if any(not isinstance(x, int) or x < 2 for x in b):
            raise ConfigError("batch_sizes", f"must be integers >= 2, got {list(b)}")
        if n_train is not None and max(b) > n_train:
            raise ConfigError("batch_sizes", f"must be <= the {n_train} training examples, got "
                                             f"{max(b)}")
        if not (0.0 < self.target_loss < math.inf):
            raise ConfigError("target_loss", f"must be a positive finite number, got "
                                             f"{self.target_loss}")
        for name in ("eta_max", "b_guess"):
            v = getattr(self, name)
            if not (0.0 < v < math.inf):
                raise ConfigError(name, f"must be a positive finite number, got {v}")
        if not (1.0 < self.lr_factor < math.inf):
            raise ConfigError("lr_factor", f"must be > 1, got {self.lr_factor}")
        for name, lo in (("repeats", 1), ("lr_candidates", 1), ("max_extend", 0),
                         ("max_steps", 1), ("whole_split_points", 1),
                         ("n_boot", 0), ("hidden", 1), ("threads", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise ConfigError(name, f"must be an integer >= {lo}, got {v!r}")
        if self.reference_batch is not None and self.reference_batch not in b:
            raise ConfigError("reference_batch", f"must be one of the batch sizes {list(b)}, got "
                                                 f"{self.reference_batch}")
        if not (0.0 <= self.beta < 1.0):
            raise ConfigError("beta", f"must satisfy 0 <= beta < 1, got {self.beta}")
        if not (0.0 < self.confidence < 1.0):
            raise ConfigError("confidence", f"must lie in (0, 1), got {self.confidence}")
        if not (0.0 < self.test_fraction < 1.0):
            raise ConfigError("test_fraction", f"must lie in (0, 1), got {self.test_fraction}")

    @property
    def reference(self) -> int:
        """The batch size of the ``B_simple`` reference run."""
        if self.reference_batch is not None:
            return self.reference_batch
        s = sorted(self.batch_sizes)
        return s[(len(s) - 1) // 2]

    def center_lr(self, batch_size: int) -> float:
        """The rule-of-thumb learning rate the grid is centred on."""
        return sgd_optimal_lr(self.eta_max, self.b_guess, batch_size)

    def lr(self, batch_size: int, k: int) -> float:
        """Grid point ``k`` (``center_lr * lr_factor**k``)."""
        return self.center_lr(batch_size) * self.lr_factor ** k


#: ``--quick``: three sizes, two learning rates each (plus extensions), a looser target.
QUICK = SweepConfig(batch_sizes=(8, 32, 128), target_loss=0.1, repeats=1, lr_candidates=2,
                    lr_factor=math.sqrt(2.0), max_extend=1, max_steps=1500, n_boot=500,
                    whole_split_points=100)


@dataclass(frozen=True)
class RunResult:
    """One training run: ``status`` is ``"reached"`` (the target, after ``steps`` steps),
    ``"diverged"`` (non-finite loss or above twice the initial loss), or ``"stopped"`` (``limit``
    steps without reaching the target)."""

    status: str
    steps: int
    final_loss: float
    wall_s: float

    @property
    def reached(self) -> bool:
        return self.status == "reached"


@dataclass(frozen=True)
class Trial:
    """One learning rate at one batch size, over the repeats (data orders and initialisations).
    ``status``: ``"reached"`` (every repeat reached the target; ``steps`` per repeat),
    ``"diverged"`` (a repeat blew up), ``"stopped"`` (its total steps reached the best total so
    far at this batch size, so it could not win) or ``"cap"`` (a repeat ran ``max_steps`` without
    reaching the target). ``steps`` holds the repeats run, the last one possibly unfinished."""

    batch_size: int
    lr: float
    grid_index: int
    status: str
    steps: tuple[int, ...]
    final_loss: float
    wall_s: float

    @property
    def reached(self) -> bool:
        return self.status == "reached"

    @property
    def total_steps(self) -> int:
        return sum(self.steps)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _classes(data: Data) -> int:
    return int(data.y_train.max()) + 1


def train_to_target(data: Data, batch_size: int, lr: float, target: float, *, seed: int = 0,
                    hidden: int = 128, limit: int = 5000,
                    monitor: Callable[[torch.nn.Module], GradStatsMonitor] | None = None,
                    on_step: Callable[[int, torch.nn.Module, float], None] | None = None,
                    ) -> tuple[RunResult, list[dict[str, Any]]]:
    """Trains the demo model (initialised from ``seed``; batches from shuffled epochs drawn with
    ``seed``, the last partial batch dropped) with plain SGD at ``(batch_size, lr)`` until the
    full training-split loss is ``<= target``, the loss blows up, or ``limit`` steps.

    With ``monitor`` (a factory called with the model), the monitor's statistics of every step
    are returned as the history (else an empty list). ``on_step(step, model, loss)`` is called
    at step 0 and after every optimizer step with the training-split loss at that point."""
    x_all, y_all = data.x_train, data.y_train
    n = len(y_all)
    model = make_model(hidden, seed, x_all.shape[1], _classes(data))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    gen = torch.Generator().manual_seed(seed)
    mon = monitor(model) if monitor is not None else None
    pause = mon.paused if mon is not None else contextlib.nullcontext
    history: list[dict[str, Any]] = []
    loss = _loss(model, x_all, y_all)
    blowup = 2.0 * loss
    if on_step is not None:
        on_step(0, model, loss)
    step, status, t0 = 0, None, time.perf_counter()
    try:
        while status is None:
            for idx in torch.randperm(n, generator=gen).split(batch_size):
                if len(idx) < batch_size:
                    break
                F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
                st = mon.step() if mon is not None else None
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                with pause():
                    loss = _loss(model, x_all, y_all)
                if st is not None:
                    lo, hi = st.b_simple_interval
                    history.append({"step": step, "loss": loss, "tr_sigma": st.tr_sigma,
                                    "g2": st.g2, "b_simple": st.b_simple,
                                    "b_simple_ema": st.b_simple_ema, "b_simple_lo": lo,
                                    "b_simple_hi": hi})
                if on_step is not None:
                    on_step(step, model, loss)
                if not math.isfinite(loss) or loss > blowup:
                    status = "diverged"
                elif loss <= target:
                    status = "reached"
                elif step >= limit:
                    status = "stopped"
                if status is not None:
                    break
    finally:
        if mon is not None:
            mon.detach()
    return RunResult(status, step, loss, time.perf_counter() - t0), history


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block (the tiny MLP gains nothing from
    more than one, and on a shared machine spinning threads can cost far more than they give)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _repeat_seed(seed: int, repeat: int) -> int:
    return seed + 1000 * repeat


def search_lr(data: Data, cfg: SweepConfig, batch_size: int, log: Log | None = None,
              ) -> tuple[Trial, list[Trial]]:
    """The learning rate reaching ``cfg.target_loss`` in the fewest steps (summed over
    ``cfg.repeats``) at ``batch_size``: returns the winning trial and all trials in the order
    run. Trains with ``cfg.threads`` torch threads."""
    with _num_threads(cfg.threads):
        return _search_lr(data, cfg, batch_size, log)


def _search_lr(data: Data, cfg: SweepConfig, batch_size: int, log: Log | None,
               ) -> tuple[Trial, list[Trial]]:
    n = cfg.lr_candidates
    grid = list(range(-((n - 1) // 2), n // 2 + 1))
    # centre first, then alternately above and below, so a good bound comes early
    order = sorted(grid, key=lambda k: (abs(k), -k))
    trials: dict[int, Trial] = {}
    best: Trial | None = None

    def attempt(k: int) -> None:
        nonlocal best
        lr = cfg.lr(batch_size, k)
        steps: list[int] = []
        status, loss, wall = "reached", math.nan, 0.0
        for r in range(cfg.repeats):
            remaining = None if best is None else best.total_steps - sum(steps)
            limit = cfg.max_steps if remaining is None else min(cfg.max_steps, remaining)
            if limit < 1:
                status = "stopped"
                break
            res, _ = train_to_target(data, batch_size, lr, cfg.target_loss,
                                     seed=_repeat_seed(cfg.seed, r), hidden=cfg.hidden,
                                     limit=limit)
            steps.append(res.steps)
            loss, wall = res.final_loss, wall + res.wall_s
            if not res.reached:
                if res.status == "diverged":
                    status = "diverged"
                elif remaining is not None and remaining <= cfg.max_steps:
                    status = "stopped"
                else:
                    status = "cap"
                break
        t = Trial(batch_size, lr, k, status, tuple(steps), loss, wall)
        trials[k] = t
        if t.reached and (best is None or t.total_steps < best.total_steps):
            best = t
        if log is not None:
            log(f"  B={batch_size:<5} lr={lr:<9.4g} {status:<8} steps "
                f"{'+'.join(map(str, steps)) or '-'} (loss {loss:.4g}, {wall:.1f} s)")

    for k in order:
        attempt(k)
    for direction in (+1, -1):
        for _ in range(cfg.max_extend):
            edge = max(trials) if direction > 0 else min(trials)
            if best is not None and best.grid_index != edge:
                break
            # nothing reached yet: only smaller learning rates can help if the top blew up
            if best is None and direction > 0:
                break
            attempt(edge + direction)
    if best is None:
        tried = ", ".join(f"{t.lr:.4g} ({t.status})" for t in trials.values())
        raise SweepError(f"no learning rate reached training loss {cfg.target_loss:g} at batch "
                         f"size {batch_size} within {cfg.max_steps} steps; tried {tried}")
    return best, list(trials.values())


def whole_split_b_simple(data: Data, states: Sequence[tuple[int, float, dict]], hidden: int,
                         seed: int = 0) -> list[dict[str, Any]]:
    """``B_simple`` of the whole training split at saved parameters: for each
    ``(step, loss, state_dict)``, one backward over all ``M`` training examples with a fresh
    monitor (``dataset_size=M``), so ``|G|^2`` is the exact full-batch gradient norm and
    ``tr(Sigma)`` the unbiased per-example variance over the split -- no sampling noise."""
    x_all, y_all = data.x_train, data.y_train
    model = make_model(hidden, seed, x_all.shape[1], _classes(data))
    out = []
    mon = GradStatsMonitor(model, mode="hooks", loss_reduction="mean", beta=0.0,
                           dataset_size=len(y_all), seed=seed)
    try:
        for step, loss, state in states:
            model.load_state_dict(state)
            F.cross_entropy(model(x_all), y_all).backward()
            st = mon.step()
            model.zero_grad(set_to_none=True)
            out.append({"step": step, "loss": loss, "tr_sigma": st.tr_sigma, "g2": st.g2,
                        "b_simple": st.b_simple})
    finally:
        mon.detach()
    return out


def _online_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The monitor's online reading: its EMA at the last step (the target) with the interval,
    and the run's mean ``tr(Sigma)`` over its mean ``|G|^2`` (per-step unbiased estimates)."""
    last = history[-1]
    tr = [h["tr_sigma"] for h in history if math.isfinite(h["tr_sigma"])]
    g2 = [h["g2"] for h in history if math.isfinite(h["g2"])]
    avg = _ratio(sum(tr) / len(tr), sum(g2) / len(g2)) if tr and g2 else math.nan
    return {"at_target": last["b_simple_ema"],
            "at_target_interval": [last["b_simple_lo"], last["b_simple_hi"]],
            "run_average": avg}


def _fit_dict(fit: CriticalBatchFit) -> dict[str, Any]:
    return {"s_min": fit.s_min, "e_min": fit.e_min, "b_crit": fit.b_crit,
            "s_min_ci": list(fit.s_min_ci), "e_min_ci": list(fit.e_min_ci),
            "b_crit_ci": list(fit.b_crit_ci), "confidence": fit.confidence,
            "n_boot": fit.n_boot, "relative": True,
            "model": "S = S_min + E_min/B: least squares in x = 1/B with weights 1/S^2 "
                     "(gradstats.critical.fit_critical_batch), one point per run"}


def _reference_run(data: Data, cfg: SweepConfig, batch_size: int, lr: float,
                   expect_steps: int) -> dict[str, Any]:
    """Repeats the first repeat's run at ``(batch_size, lr)`` with a monitor attached (hooks
    mode: the training arithmetic is unchanged, so it must reach the target at the same step),
    saving the parameters at ~``cfg.whole_split_points`` steps for :func:`whole_split_b_simple`.
    """
    n_train = len(data.y_train)
    stride = max(1, math.ceil(expect_steps / cfg.whole_split_points))
    states: list[tuple[int, float, dict]] = []
    last: list[Any] = [None]

    def on_step(step: int, model: torch.nn.Module, loss: float) -> None:
        snap = (step, loss, {k: v.detach().clone() for k, v in model.state_dict().items()})
        last[0] = snap
        if step % stride == 0:
            states.append(snap)

    res, history = train_to_target(
        data, batch_size, lr, cfg.target_loss, seed=_repeat_seed(cfg.seed, 0), hidden=cfg.hidden,
        limit=cfg.max_steps, on_step=on_step,
        monitor=lambda m: GradStatsMonitor(m, mode="hooks", loss_reduction="mean", beta=cfg.beta,
                                           dataset_size=n_train, seed=cfg.seed))
    if states[-1][0] != last[0][0]:
        states.append(last[0])
    whole = whole_split_b_simple(data, states, cfg.hidden, cfg.seed)
    tr = [w["tr_sigma"] for w in whole[:-1]]
    g2 = [w["g2"] for w in whole[:-1]]
    return {"batch_size": batch_size, "lr": lr, "beta": cfg.beta, "steps": res.steps,
            "reached": res.reached,
            "same_steps_as_sweep": res.reached and res.steps == expect_steps,
            "online": _online_summary(history),
            "whole_split": {"at_target": whole[-1]["b_simple"],
                            "at_start": whole[0]["b_simple"],
                            "run_average": _ratio(sum(tr) / len(tr), sum(g2) / len(g2)),
                            "points": len(whole), "stride": stride},
            "predicted": predict_from_b_simple(whole, batch_size, res.steps),
            "history": history, "whole_split_history": whole}


def predict_from_b_simple(points: Sequence[dict[str, Any]], batch_size: int,
                          steps: int) -> dict[str, Any]:
    """``S_min``, ``E_min`` and ``B_crit`` that McCandlish et al.'s model predicts from the noise
    scale measured along one run, with ``B_simple`` standing in for ``B_noise``.

    A step at batch ``B`` taken where the noise scale is ``b`` makes the progress of
    ``1/(1 + b/B)`` steps at an unlimited batch, and at a vanishing batch that progress costs
    ``b`` examples per step-of-progress, so over the run's steps ``t = 1..S`` (``b_t`` at the
    parameters step ``t`` starts from)::

        S_min = sum_t 1/(1 + b_t/B),    E_min = sum_t b_t/(1 + b_t/B),    B_crit = E_min/S_min

    -- a progress-weighted average of the noise scale. ``points`` are ``{"step", "b_simple"}``
    at steps ``0, k, 2k, ...``; each stands for the steps up to the next point (or ``steps``).
    """
    pts = [p for p in points if p["step"] < steps]
    s_min = e_min = 0.0
    for i, p in enumerate(pts):
        span = (pts[i + 1]["step"] if i + 1 < len(pts) else steps) - p["step"]
        b = p["b_simple"]
        if b is None or not (math.isfinite(b) and b > 0):
            continue
        w = span / (1.0 + b / batch_size)
        s_min += w
        e_min += w * b
    return {"s_min": s_min, "e_min": e_min, "b_crit": _ratio(e_min, s_min),
            "formula": "S_min = sum_t 1/(1 + B_simple_t/B), E_min = sum_t B_simple_t/(1 + "
                       "B_simple_t/B) over the reference run's steps"}


def run_sweep(cfg: SweepConfig | None = None, *, data: Data | None = None,
              log: Log | None = None) -> dict[str, Any]:
    """Runs the sweep and returns the result (JSON-able once non-finite floats are nulled).

    Raises :class:`SweepError` when a batch size finds no learning rate reaching the target, or
    when the fit finds no trade-off (``S_min`` or ``E_min`` <= 0)."""
    cfg = cfg or SweepConfig()
    cfg.check()
    data = data or load_data(cfg.seed, cfg.test_fraction)
    n_train = len(data.y_train)
    cfg.check(n_train)
    t0 = time.perf_counter()
    with _num_threads(cfg.threads):
        init = max(_loss(make_model(cfg.hidden, _repeat_seed(cfg.seed, r), data.x_train.shape[1],
                                    _classes(data)), data.x_train, data.y_train)
                   for r in range(cfg.repeats))
        if cfg.target_loss >= init:
            raise ConfigError("target_loss", f"must be below the initial training loss "
                                             f"{init:.4g}, got {cfg.target_loss:g}")
        sizes, runs, trials = [], [], []
        for b in sorted(cfg.batch_sizes):
            if log is not None:
                log(f"batch size {b}: rule-of-thumb lr {cfg.center_lr(b):.4g}")
            best, tried = search_lr(data, cfg, b, log)
            trials += tried
            ks = [t.grid_index for t in tried]
            sizes.append({"batch_size": b, "lr": best.lr, "steps": list(best.steps),
                          "mean_steps": best.total_steps / len(best.steps),
                          "mean_examples": b * best.total_steps / len(best.steps),
                          "lr_at_grid_edge": best.grid_index in (min(ks), max(ks)),
                          "lrs_tried": len(tried)})
            runs += [{"batch_size": b, "repeat": r, "steps": s, "examples": b * s, "lr": best.lr}
                     for r, s in enumerate(best.steps)]
        try:
            fit = fit_critical_batch([r["batch_size"] for r in runs], [r["steps"] for r in runs],
                                     n_boot=cfg.n_boot, seed=cfg.seed, confidence=cfg.confidence)
        except ValueError as e:
            raise SweepError(f"no critical-batch fit: {e}") from None
        ref = next(r for r in sizes if r["batch_size"] == cfg.reference)
        if log is not None:
            log(f"reference run with the monitor: B={ref['batch_size']} lr={ref['lr']:.4g}")
        b_simple = _reference_run(data, cfg, ref["batch_size"], ref["lr"], ref["steps"][0])
    return {
        "config": asdict(cfg),
        "model": f"MLP {data.x_train.shape[1]}-{cfg.hidden}-{cfg.hidden}-{_classes(data)} "
                 "(GELU), plain SGD, mean cross-entropy",
        "data": {"name": "sklearn digits", "n_train": n_train, "n_test": len(data.y_test)},
        "target": f"training-split cross-entropy <= {cfg.target_loss:g}, checked every step",
        "initial_loss": init,
        "batch_sizes": sizes,
        "runs": runs,
        "trials": [{**asdict(t), "steps": list(t.steps)} for t in trials],
        "fit": _fit_dict(fit),
        "b_simple": b_simple,
        "wall_s": time.perf_counter() - t0,
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "threads": cfg.threads,
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- output
def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _ci(ci: Sequence[float | None]) -> str:
    return f"[{_num(ci[0])}, {_num(ci[1])}]"


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.nan
    return a / b


def format_result(result: dict[str, Any]) -> str:
    """The terminal report: per-batch table, fit with intervals, B_simple beside B_crit."""
    f, bs, cfg = result["fit"], result["b_simple"], result["config"]
    on, whole, pred = bs["online"], bs["whole_split"], bs["predicted"]
    pct = f"{100 * f['confidence']:g}%"
    rep = cfg["repeats"]
    out = [f"gradstats critical-batch: {result['model']}",
           f"data: {result['data']['name']}, {result['data']['n_train']} training examples; "
           f"target: {result['target']}; {rep} run{'s' * (rep != 1)} per batch size "
           "(data orders and initialisations)",
           "",
           f"  {'batch':>6} {'best lr':>9} {'steps':>8} {'examples':>9} {'lrs tried':>9}  "
           "steps per run"]
    for r in result["batch_sizes"]:
        edge = "  (best lr at the grid's end)" if r["lr_at_grid_edge"] else ""
        out.append(f"  {r['batch_size']:>6} {r['lr']:>9.4g} {r['mean_steps']:>8.1f} "
                   f"{r['mean_examples']:>9.0f} {r['lrs_tried']:>9}  "
                   f"{' '.join(map(str, r['steps']))}{edge}")
    out += ["",
            f"fit (S/S_min - 1)(E/E_min - 1) = 1 over {len(result['runs'])} runs, {pct} "
            f"bootstrap intervals ({f['n_boot']} resamples):",
            f"  S_min  = {_num(f['s_min'])} steps     {_ci(f['s_min_ci'])}",
            f"  E_min  = {_num(f['e_min'])} examples  {_ci(f['e_min_ci'])}",
            f"  B_crit = E_min/S_min = {_num(f['b_crit'])}  {_ci(f['b_crit_ci'])}",
            "",
            f"B_simple = tr(Sigma)/|G|^2 during the reference run (batch {bs['batch_size']}, "
            f"lr {bs['lr']:.4g}, {bs['steps']} steps):",
            f"  monitor, online, at the target (EMA, beta {bs['beta']:g}): "
            f"{_num(on['at_target'])}  95% interval {_ci(on['at_target_interval'])}",
            f"  monitor, online, run average (mean tr(Sigma) / mean |G|^2): "
            f"{_num(on['run_average'])}",
            f"  whole training split (exact), at the start {_num(whole['at_start'])}, at the "
            f"target {_num(whole['at_target'])}, run average {_num(whole['run_average'])}",
            "  the model step by step (S_min = sum 1/(1 + B_simple/B), E_min = sum "
            "B_simple/(1 + B_simple/B)):",
            f"    S_min {_num(pred['s_min'])}, E_min {_num(pred['e_min'])}, "
            f"B_crit {_num(pred['b_crit'])}   (fit: {_num(f['b_crit'])}, ratio fit/predicted "
            f"{_num(_ratio(f['b_crit'], pred['b_crit']), 3)})",
            "",
            f"wall time {result['wall_s']:.1f} s ({result['device']}, {result['threads']} "
            f"thread{'s' * (result['threads'] != 1)}, torch {result['torch']})"]
    if not bs["same_steps_as_sweep"]:
        out.append("warning: the monitored reference run did not reach the target at the same "
                   "step as the sweep's run")
    return "\n".join(out)


def write_runs_csv(result: dict[str, Any], path: str | Path) -> None:
    """One row per run (each batch size's best learning rate, each repeat): batch_size, steps,
    examples, lr, repeat -- readable by :func:`gradstats.critical.load_runs`."""
    with Path(path).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["batch_size", "steps", "examples", "lr", "repeat"])
        w.writeheader()
        for r in result["runs"]:
            w.writerow({"batch_size": r["batch_size"], "steps": r["steps"],
                        "examples": r["examples"], "lr": repr(float(r["lr"])),
                        "repeat": r["repeat"]})


def save_outputs(result: dict[str, Any], out: str | Path, plot: bool = True) -> list[str]:
    """Writes ``runs.csv``, ``result.json`` and (with matplotlib) ``critical_batch.png`` under
    ``out``; returns the messages to show (what was written, or why the plot was skipped)."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    write_runs_csv(result, d / "runs.csv")
    write_json(result, str(d / "result.json"))
    msgs = [f"wrote {d / 'runs.csv'} and {d / 'result.json'}"]
    if plot:
        why = save_plot(result, d / "critical_batch.png")
        msgs.append(f"wrote {d / 'critical_batch.png'}" if why is None else why)
    return msgs


def save_plot(result: dict[str, Any], path: str | Path) -> str | None:
    """S against E (log-log) with the fitted hyperbola and its asymptotes, and B_simple over
    the reference run beside B_crit; returns why it was skipped, or None when written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed (pip install 'gradstats[plot]'): no plot written"
    f, runs, bs = result["fit"], result["runs"], result["b_simple"]
    s_min, e_min, b_crit = f["s_min"], f["e_min"], f["b_crit"]
    fig = Figure(figsize=(12, 5), tight_layout=True)
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    sizes = [r["batch_size"] for r in result["batch_sizes"]]
    lo_b, hi_b = min(sizes) / 4, max(sizes) * 4
    grid = [lo_b * (hi_b / lo_b) ** (i / 199) for i in range(200)]
    ax.plot([b * s_min + e_min for b in grid], [s_min + e_min / b for b in grid],
            color="tab:blue", label="fit: (S/S_min - 1)(E/E_min - 1) = 1")
    ax.axhline(s_min, color="tab:blue", ls=":", lw=0.8)
    ax.axvline(e_min, color="tab:blue", ls=":", lw=0.8)
    ax.scatter([r["examples"] for r in runs], [r["steps"] for r in runs], s=12, color="tab:red",
               alpha=0.5, zorder=3, label="runs (best lr per batch size)")
    ax.scatter([r["mean_examples"] for r in result["batch_sizes"]],
               [r["mean_steps"] for r in result["batch_sizes"]], marker="_", s=200,
               color="tab:red", zorder=3, label="mean per batch size")
    for r in result["batch_sizes"]:
        ax.annotate(f"B={r['batch_size']}", (r["mean_examples"], r["mean_steps"]), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")
    ax.scatter([2 * e_min], [2 * s_min], marker="*", s=160, color="tab:green", zorder=4,
               label=f"B = B_crit = {_num(b_crit, 3)}: (2 E_min, 2 S_min)")
    pred = bs["predicted"]
    ps, pe = pred["s_min"], pred["e_min"]
    if ps is not None and pe is not None and ps > 0 and pe > 0:
        ax.plot([b * ps + pe for b in grid], [ps + pe / b for b in grid], color="tab:purple",
                ls="--", label=f"predicted from B_simple of one run (B_crit {_num(pe / ps, 3)})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples E to reach the target")
    ax.set_ylabel("steps S to reach the target")
    ax.set_title(f"{result['data']['name']}, training loss <= "
                 f"{result['config']['target_loss']:g}; S_min = {_num(s_min, 3)}, "
                 f"E_min = {_num(e_min, 3)}")
    ax.legend(fontsize=8, loc="upper right")

    def finite_pos(v: Any) -> bool:
        return v is not None and math.isfinite(v) and v > 0

    h = [r for r in bs["history"] if finite_pos(r["b_simple_ema"])]
    if h:
        ax2.plot([r["step"] for r in h], [r["b_simple_ema"] for r in h], color="tab:purple",
                 lw=1, label=f"monitor, online (EMA, beta {bs['beta']:g})")
    w = [r for r in bs["whole_split_history"] if finite_pos(r["b_simple"])]
    if w:
        ax2.plot([r["step"] for r in w], [r["b_simple"] for r in w], color="black", lw=1.5,
                 label="whole training split")
    ax2.axhline(b_crit, color="tab:green", label=f"B_crit = {_num(b_crit, 3)} (fit)")
    if pred["b_crit"] is not None and math.isfinite(pred["b_crit"]):
        ax2.axhline(pred["b_crit"], color="tab:purple", ls="--",
                    label=f"progress-weighted B_simple = {_num(pred['b_crit'], 3)}")
    seen = ([r["b_simple_ema"] for r in h] + [r["b_simple"] for r in w]
            + [v for v in (b_crit, pred["b_crit"]) if finite_pos(v)])
    ymin, ymax = min(seen) / 2, max(seen) * 2
    lo, hi = f["b_crit_ci"]
    if finite_pos(lo) and finite_pos(hi):
        ax2.axhspan(max(lo, ymin), min(hi, ymax), color="tab:green", alpha=0.15,
                    label=f"{100 * f['confidence']:g}% interval of B_crit")
    ax2.set_yscale("log")
    ax2.set_ylim(ymin, ymax)
    ax2.set_xlabel(f"step of the reference run (batch {bs['batch_size']}, lr {bs['lr']:.3g})")
    ax2.set_ylabel("B_simple = tr(Sigma)/|G|^2")
    ax2.set_title("B_simple during training vs B_crit")
    ax2.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=120)
    return None


# ----------------------------------------------------------------------------- command line
def _batch_sizes(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers >= 2, got {text!r}") from None
    if len(sizes) < 2 or len(set(sizes)) != len(sizes) or min(sizes) < 2:
        raise argparse.ArgumentTypeError(
            f"must be at least two distinct integers >= 2, got {text!r}")
    return tuple(sorted(sizes))


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SweepConfig()
    p.add_argument("--out", metavar="DIR",
                   help="write runs.csv, result.json and critical_batch.png there")
    p.add_argument("--batch-sizes", type=_batch_sizes, metavar="B1,B2,...",
                   help="batch sizes to sweep (default "
                        f"{','.join(map(str, d.batch_sizes))}; --quick: "
                        f"{','.join(map(str, QUICK.batch_sizes))})")
    p.add_argument("--target-loss", type=positive_float, metavar="L",
                   help=f"training-split cross-entropy to reach (default {d.target_loss:g}; "
                        f"--quick: {QUICK.target_loss:g})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="split, initialisation, shuffling and bootstrap seed")
    p.add_argument("--quick", action="store_true",
                   help="a fast, rough sweep (fewer sizes and learning rates, looser target)")
    p.add_argument("--repeats", type=positive_int, metavar="N",
                   help=f"runs per (batch size, learning rate), each with its own "
                        f"initialisation and data order (default {d.repeats}; --quick: "
                        f"{QUICK.repeats})")
    p.add_argument("--lr-candidates", type=positive_int, metavar="N",
                   help=f"learning rates per batch size before any extension (default "
                        f"{d.lr_candidates}; --quick: {QUICK.lr_candidates})")
    p.add_argument("--max-steps", type=positive_int, metavar="N",
                   help=f"give up on a run after N steps (default {d.max_steps}; --quick: "
                        f"{QUICK.max_steps})")
    p.add_argument("--reference-batch", type=positive_int, metavar="B",
                   help="batch size of the run that measures B_simple (default: the middle one)")
    p.add_argument("--n-boot", type=int, metavar="N",
                   help=f"bootstrap resamples for the intervals (default {d.n_boot}; --quick: "
                        f"{QUICK.n_boot})")
    p.add_argument("--threads", type=positive_int, default=d.threads, metavar="N",
                   help=f"torch intra-op threads while training (default {d.threads})")
    p.add_argument("--no-plot", action="store_true", help="do not write critical_batch.png")
    p.add_argument("--quiet", action="store_true", help="no progress lines and no report")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    base = QUICK if args.quick else SweepConfig()
    over: dict[str, Any] = {"seed": args.seed, "threads": args.threads}
    for name in ("batch_sizes", "target_loss", "repeats", "lr_candidates", "max_steps",
                 "reference_batch", "n_boot"):
        v = getattr(args, name)
        if v is not None:
            over[name] = v
    return replace(base, **over)


def run_cli(args: argparse.Namespace) -> int:
    """``gradstats critical-batch``."""
    cfg = config_from_args(args)

    def flag(e: ConfigError) -> UsageError:
        return UsageError(f"argument --{e.field.replace('_', '-')}: {e.message}")

    try:
        cfg.check()
        data = load_data(cfg.seed, cfg.test_fraction)
        cfg.check(len(data.y_train))
    except MissingDependency as e:
        print(f"gradstats critical-batch: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        raise flag(e) from None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        result = run_sweep(cfg, data=data, log=None if args.quiet else log)
    except ConfigError as e:
        raise flag(e) from None
    except SweepError as e:
        print(f"gradstats critical-batch: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(format_result(result))
    if args.out:
        for msg in save_outputs(result, args.out, plot=not args.no_plot):
            if not args.quiet or not msg.startswith("wrote"):
                print(msg, file=sys.stdout if msg.startswith("wrote") else sys.stderr)
    return 0
