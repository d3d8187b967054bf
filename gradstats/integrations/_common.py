"""What both trainer callbacks share: counting examples, the record of a step, the loggers,
and the batch-size controller's learning-rate ratio applied around each optimizer step."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..logs import PREFIX, Logger, MultiLogger, record_of
from ..provenance import find_batch
from ..schedulers import BatchSizeController
from ..stats import StepStats

__all__ = ["ExampleCounter", "LrRatio", "StepRecorder", "check_controller", "controller_ratio",
           "effective_lr", "mean_loss",
           "restore_state", "saved_state",
           "process_group", "reserved_monitor_args", "world_size"]


def world_size() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def process_group() -> Any:
    """The default group when a process group is running (the statistics are then those of
    the global batch), else None."""
    return torch.distributed.group.WORLD if world_size() > 1 else None


class ExampleCounter:
    """Examples of the training forwards of ``module`` (grad enabled, train mode) since the
    last :meth:`take`, found as the monitor finds them; ``check(args, kwargs)`` sees each such
    call first."""

    def __init__(self, module: nn.Module, batch_dim: int,
                 check: Callable[[tuple, dict], None] | None = None) -> None:
        self.batch_dim, self.check, self.examples, self.forwards = batch_dim, check, 0, 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not (torch.is_grad_enabled() and module.training):
            return
        if self.check is not None:
            self.check(args, kwargs)
        self.examples += find_batch(args, kwargs, self.batch_dim) or 0
        self.forwards += 1

    def take(self) -> tuple[int, int]:
        """``(examples, forwards)`` since the last call; resets both."""
        out = (self.examples, self.forwards)
        self.examples = self.forwards = 0
        return out

    def remove(self) -> None:
        self._handle.remove()


def reserved_monitor_args(monitor_kwargs: Mapping[str, Any], reserved: Sequence[str],
                          trainer: str) -> None:
    """Refuses monitor arguments the callback sets from the trainer itself."""
    bad = sorted(set(monitor_kwargs) & set(reserved))
    if bad:
        raise ValueError(f"{', '.join(bad)}: the callback sets {'these' if len(bad) > 1 else 'this'}"
                         f" from the {trainer} (its accumulation, precision and processes); "
                         "leave it out")


def check_controller(controller: BatchSizeController | None) -> None:
    if controller is None:
        return
    if not isinstance(controller, BatchSizeController):
        raise TypeError(f"controller must be a gradstats.BatchSizeController, got "
                        f"{type(controller).__name__}")
    if controller.optimizer is not None:
        raise ValueError("controller: construct the BatchSizeController without optimizer=; "
                         "the callback applies its learning-rate ratio around each optimizer "
                         "step, so that it composes with the trainer's scheduler")


def controller_ratio(controller: BatchSizeController) -> float:
    """The lr factor of the controller's rule for its current batch size against its base size
    (the controller keeps ``lr_ratio`` up to date only when it owns an optimizer)."""
    return controller.ratio_for(controller.batch_size)


class LrRatio:
    """Multiplies every group's lr by ``ratio()`` for the duration of each ``optimizer.step()``
    (a step pre-hook scales, the post-hook restores the exact values), so the trainer's
    scheduler only ever sees and sets its own values."""

    def __init__(self, optimizer: torch.optim.Optimizer, ratio: Callable[[], float]) -> None:
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate / Lightning
        self.ratio = ratio
        self._saved: list[float] | None = None
        self._handles = [self.optimizer.register_step_pre_hook(self._scale),
                         self.optimizer.register_step_post_hook(self._restore)]

    def _scale(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        r = self.ratio()
        if r != 1.0:
            self._saved = [g["lr"] for g in opt.param_groups]
            for g in opt.param_groups:
                g["lr"] = g["lr"] * r

    def _restore(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._saved is not None:
            for g, lr in zip(opt.param_groups, self._saved):
                g["lr"] = lr
            self._saved = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class StepRecorder:
    """Turns each step's statistics into a :func:`~gradstats.logs.record_of` record (with the
    lr, the batch size, the examples seen) and hands it to the callback's own loggers."""

    def __init__(self, loggers: Logger | Sequence[Logger] | None, layers: bool) -> None:
        if loggers is None:
            loggers = ()
        elif callable(getattr(loggers, "log", None)):
            loggers = (loggers,)
        self.logger = MultiLogger(*loggers)
        self.layers = layers
        self.examples = 0
        self.last: dict[str, Any] | None = None

    def record(self, stats: StepStats, step: int, *, lr: float | None, counted: int,
               loss: float | None = None, extra: Mapping[str, float] | None = None
               ) -> dict[str, Any]:
        """The record of optimizer step ``step`` (1, 2, ...); ``counted`` is the examples the
        callback saw, used when the monitor did not measure the step."""
        n = stats.n if stats.measured and stats.n else counted * world_size()
        self.examples += n
        rec = record_of(stats, lr=lr, batch_size=n, examples=self.examples, loss=loss)
        if not self.layers:
            rec = {k: v for k, v in rec.items() if not k.startswith(PREFIX + "layers/")}
        if extra:
            rec.update(extra)
        self.logger.log(rec, step)
        self.last = rec
        return rec

    def close(self) -> None:
        self.logger.close()


def saved_state(monitor: Any, recorder: StepRecorder, ratio: float,
                controller: BatchSizeController | None) -> dict[str, Any]:
    """What a callback checkpoints: the monitor's smoothed statistics, the examples seen, the
    lr ratio in effect and the controller (plain Python values: JSON and pickle take them)."""
    return {"monitor": monitor.state_dict(), "examples": recorder.examples, "ratio": ratio,
            "controller": None if controller is None else controller.state_dict()}


def restore_state(state: Mapping[str, Any], monitor: Any, recorder: StepRecorder,
                  controller: BatchSizeController | None) -> float:
    """Inverse of :func:`saved_state`; returns the lr ratio in effect."""
    if "monitor" in state:
        monitor.load_state_dict(state["monitor"])
    recorder.examples = int(state.get("examples", 0))
    if controller is not None and state.get("controller") is not None:
        controller.load_state_dict(state["controller"])
    return float(state.get("ratio", 1.0))


def mean_loss(losses: list[torch.Tensor], total: bool = False) -> float | None:
    """The step's loss from its micro-batches' (one host sync): their mean, or their sum when
    each already holds its share of the step's loss (``total``)."""
    if not losses:
        return None
    s = torch.stack([x.to(torch.float64).reshape(()) for x in losses]).sum()
    return float(s) if total else float(s) / len(losses)


def effective_lr(optimizer: Any, ratio: float) -> float | None:
    """The first group's lr times the controller's ratio (what the optimizer steps with)."""
    opt = getattr(optimizer, "optimizer", optimizer)
    groups = getattr(opt, "param_groups", None)
    if not groups:
        return None
    lr = groups[0].get("lr")
    lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
    return lr * ratio if math.isfinite(lr) else lr
