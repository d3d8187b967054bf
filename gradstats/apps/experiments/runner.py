"""One training run to a target loss, on any task, with a fixed or a changing batch size.

The learning rate is constant (no warm-up, no decay: the best learning rate of a run is then one
number). The run stops when the target is reached, when the loss blows up (non-finite or above
``blowup`` times the initial loss), or after ``limit`` steps. The loss is evaluated every
``task.eval_every(B)`` steps (every step on digits); the steps to the target ``S`` are the first
step after which the loss is ``<= target``, found between two evaluations by linear
interpolation of the loss and rounded up, so with an evaluation after every step it is exactly
the first such step (as :func:`gradstats.apps.sweep.train_to_target` counts). ``E`` is the
number of examples the first ``S`` steps used.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ...monitor import GradStatsMonitor, StepStats
from .tasks import Batch, Stream, Task

__all__ = ["Optim", "RunResult", "Schedule", "crossing", "train"]


@dataclass(frozen=True)
class Optim:
    """``"sgd"`` (no momentum, as the theory) or ``"adam"`` with ``beta1``, ``beta2``, ``eps``
    (``beta1 = beta2 = 0`` is sign descent with ``eps``: RMSProp-like without memory)."""

    name: str = "sgd"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def make(self, params: Any, lr: float) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.0)
        if self.name == "adam":
            return torch.optim.Adam(params, lr=lr, betas=(self.beta1, self.beta2), eps=self.eps)
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.name!r}")

    @property
    def label(self) -> str:
        if self.name == "sgd":
            return "sgd"
        return f"adam-b{self.beta1:g}-{self.beta2:g}"

    def describe(self) -> str:
        if self.name == "sgd":
            return "plain SGD (no momentum), constant learning rate"
        return (f"Adam (beta1 {self.beta1:g}, beta2 {self.beta2:g}, eps {self.eps:g}), constant "
                "learning rate")


@dataclass(frozen=True)
class RunResult:
    """``status``: ``"reached"``, ``"diverged"`` or ``"stopped"`` (``limit`` steps). ``steps``
    and ``examples``: to the target when reached, else what was run. ``curve``: the evaluations
    ``(step, examples, loss, batch_size)``."""

    status: str
    steps: int
    examples: int
    steps_run: int
    initial_loss: float
    final_loss: float
    wall_s: float
    curve: tuple[tuple[int, int, float, int], ...] = ()

    @property
    def reached(self) -> bool:
        return self.status == "reached"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["curve"] = [list(c) for c in self.curve]
        return d


class Schedule(Protocol):
    """What changes the batch size (and the learning rate) during a run (closed-loop runs)."""

    batch_size: int

    def after_step(self, step: int, stats: StepStats | None, loss: float | None,
                   optimizer: torch.optim.Optimizer) -> None: ...


def crossing(s0: int, l0: float, s1: int, l1: float, target: float) -> int:
    """The first step after which the loss is ``<= target``, between an evaluation at ``s0``
    (loss ``l0 > target``) and one at ``s1`` (``l1 <= target``), by linear interpolation in the
    loss, rounded up: ``ceil(s0 + (s1 - s0)(l0 - target)/(l0 - l1))``, in ``(s0, s1]``."""
    frac = (l0 - target) / (l0 - l1) if l0 > l1 else 1.0
    return min(s1, max(s0 + 1, math.ceil(s0 + (s1 - s0) * frac - 1e-9)))


OnStep = Callable[[int, nn.Module, torch.optim.Optimizer, Batch | None], None]


def train(task: Task, optim: Optim, lr: float, target: float, *, seed: int,
          batch_size: int | None = None, schedule: Schedule | None = None, limit: int = 5000,
          monitor: Callable[[nn.Module], GradStatsMonitor] | None = None,
          on_step: OnStep | None = None, on_stats: Callable[[int, StepStats], None] | None = None,
          blowup: float = 2.0) -> RunResult:
    """Trains ``task.model(seed)`` on ``task.stream(seed)`` to ``target`` (module docstring).

    The batch size is ``batch_size``, or ``schedule.batch_size`` read before every step (with
    ``schedule.after_step`` called after it). ``monitor`` (a factory) is attached for the run;
    its statistics go to ``on_stats(step, stats)`` and to the schedule. ``on_step(step, model,
    optimizer, batch)`` is called before training (step 0, batch None) and after every optimizer
    step (with that step's batch), at the parameters the next step starts from."""
    if (batch_size is None) == (schedule is None):
        raise ValueError("give exactly one of batch_size and schedule")
    model = task.model(seed)
    opt = optim.make(model.parameters(), lr)
    stream: Stream = task.stream(seed)
    mon = monitor(model) if monitor is not None else None
    t0 = time.perf_counter()
    loss0 = task.eval_loss(model)
    curve = [(0, 0, loss0, 0)]
    if on_step is not None:
        on_step(0, model, opt, None)
    step, examples, status, last_eval = 0, 0, None, (0, loss0)
    seen = [0]  # examples after each step
    next_eval = 0
    try:
        while status is None:
            b = batch_size if schedule is None else schedule.batch_size
            batch = stream.next(b)
            task.loss(model, batch).backward()
            st = mon.step() if mon is not None else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            examples += b
            seen.append(examples)
            if st is not None and on_stats is not None:
                on_stats(step, st)
            if on_step is not None:
                on_step(step, model, opt, batch)
            if next_eval == 0:
                next_eval = task.eval_every(b)
            next_eval -= 1
            loss = None
            if next_eval == 0 or step >= limit:
                loss = task.eval_loss(model)
                curve.append((step, examples, loss, b))
                if not math.isfinite(loss) or loss > blowup * loss0:
                    status = "diverged"
                elif loss <= target:
                    status = "reached"
                    step_hit = crossing(last_eval[0], last_eval[1], step, loss, target)
                elif step >= limit:
                    status = "stopped"
                last_eval = (step, loss)
            if schedule is not None and status is None:
                schedule.after_step(step, st, loss, opt)
    finally:
        if mon is not None:
            mon.detach()
    wall = time.perf_counter() - t0
    final = curve[-1][2]
    if status == "reached":
        return RunResult(status, step_hit, seen[step_hit], step, loss0, final, wall, tuple(curve))
    return RunResult(status, step, examples, step, loss0, final, wall, tuple(curve))
