"""The batch-size sweep behind ``gradstats critical-batch`` (:mod:`.critical_batch`): training
to a target loss, the learning-rate search, and the noise scale of one reference run.

McCandlish et al. (2018): train at several batch sizes ``B``, each with its own best learning
rate, until a fixed target; record the steps ``S`` and examples ``E = B S`` it took. The runs lie
on ``(S/S_min - 1)(E/E_min - 1) = 1``, i.e. ``S = S_min + E_min/B``, and the critical batch size
is ``B_crit = E_min/S_min``: below it doubling the batch halves the steps, above it the extra
examples are wasted. For SGD the theory says ``B_crit ~ B_noise``, which the monitor's
``B_simple = tr(Sigma)/|G|^2`` stands in for, so the sweep also measures ``B_simple`` during one
reference run and reports the two side by side.

What is trained: the demo's MLP (:func:`gradstats.apps.models.make_mlp`) on the digits
(:func:`gradstats.apps.data.load_digits`), plain SGD (no momentum, as in the theory), mean
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
(:func:`gradstats.critical.predict_from_b_simple`: the progress-weighted ``B_simple``), which the
report puts beside the sweep's fit.
"""
from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..critical import CriticalBatchFit, fit_critical_batch, predict_from_b_simple
from ..monitor import GradStatsMonitor
from ..scaling import sgd_optimal_lr
from .common import ConfigError, ratio
from .data import Data, load_digits
from .models import make_mlp

__all__ = ["SweepConfig", "QUICK", "SweepError", "RunResult", "Trial", "train_to_target",
           "search_lr", "whole_split_b_simple", "run_sweep"]

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
        """Raises :class:`~gradstats.apps.common.ConfigError` naming the first field out of
        range."""
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
    model = make_mlp(hidden, seed, x_all.shape[1], data.n_classes)
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
    model = make_mlp(hidden, seed, x_all.shape[1], data.n_classes)
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
    avg = ratio(sum(tr) / len(tr), sum(g2) / len(g2)) if tr and g2 else math.nan
    return {"at_target": last["b_simple_ema"],
            "at_target_interval": [last["b_simple_lo"], last["b_simple_hi"]],
            "run_average": avg}


def _fit_dict(fit: CriticalBatchFit) -> dict[str, Any]:
    boot = fit.bootstrap
    return {"s_min": fit.s_min, "e_min": fit.e_min, "b_crit": fit.b_crit,
            "s_min_ci": list(fit.s_min_ci), "e_min_ci": list(fit.e_min_ci),
            "b_crit_ci": list(fit.b_crit_ci), "confidence": fit.confidence,
            "n_boot": fit.n_boot, "relative": True,
            "bootstrap": {"resamples": boot.resamples, "redrawn": boot.redrawn,
                          "usable": boot.usable, "s_min_nonpositive": boot.s_min_nonpositive,
                          "e_min_nonpositive": boot.e_min_nonpositive,
                          "max_beyond": boot.max_beyond, "undefined": dict(boot.undefined),
                          "explanation": fit.describe_intervals()},
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
                            "run_average": ratio(sum(tr) / len(tr), sum(g2) / len(g2)),
                            "points": len(whole), "stride": stride},
            "predicted": _predict(whole, batch_size, res.steps),
            "history": history, "whole_split_history": whole}


def _predict(points: Sequence[dict[str, Any]], batch_size: int, steps: int) -> dict[str, Any]:
    """:func:`gradstats.critical.predict_from_b_simple` over the reference run: ``points`` are
    ``{"step", "b_simple"}`` at steps ``0, k, 2k, ...`` (``b_simple`` at the parameters those
    steps start from), each standing for the steps up to the next point (or ``steps``)."""
    pts = [p for p in points if p["step"] < steps]
    ends = [p["step"] for p in pts[1:]] + [steps]
    pred = predict_from_b_simple([p["b_simple"] for p in pts], batch_size,
                                 span=[e - p["step"] for p, e in zip(pts, ends)])
    return {"s_min": pred.s_min, "e_min": pred.e_min, "b_crit": pred.b_crit,
            "formula": pred.FORMULA + " (the reference run; B_simple_t of the whole training "
                                      "split)"}


def run_sweep(cfg: SweepConfig | None = None, *, data: Data | None = None,
              log: Log | None = None) -> dict[str, Any]:
    """Runs the sweep and returns the result (JSON-able once non-finite floats are nulled).

    Raises :class:`SweepError` when a batch size finds no learning rate reaching the target, or
    when the fit finds no trade-off (``S_min`` or ``E_min`` <= 0)."""
    cfg = cfg or SweepConfig()
    cfg.check()
    data = data or load_digits(cfg.seed, cfg.test_fraction)
    n_train = len(data.y_train)
    cfg.check(n_train)
    t0 = time.perf_counter()
    with _num_threads(cfg.threads):
        init = max(_loss(make_mlp(cfg.hidden, _repeat_seed(cfg.seed, r), data.x_train.shape[1],
                                    data.n_classes), data.x_train, data.y_train)
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
        "model": f"MLP {data.x_train.shape[1]}-{cfg.hidden}-{cfg.hidden}-{data.n_classes} "
                 "(GELU), plain SGD, mean cross-entropy",
        "data": {"name": data.name, "n_train": n_train, "n_test": len(data.y_test)},
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


