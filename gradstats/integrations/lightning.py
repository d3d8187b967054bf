"""Lightning: ``Trainer(callbacks=[GradStatsCallback()])`` measures the gradient noise scale of
the run and logs it through the trainer's loggers.

Where it hooks in: ``on_before_optimizer_step``, which Lightning calls once per optimizer step,
after the backward passes of all ``accumulate_grad_batches`` micro-batches and after the AMP
GradScaler's ``unscale_``, and before gradient clipping (``gradient_clip_val``) and the optimizer
step: exactly where ``monitor.step()`` belongs.

Units: Lightning divides every micro-batch loss by ``accumulate_grad_batches`` (also in the
shorter last window of an epoch), so each example's weight is ``r_i / accumulate_grad_batches``
with ``r_i`` the reduction of ``training_step``'s loss (``loss_reduction``); the callback hands
the monitor exactly that, read at each forward. Under ``precision="16-mixed"`` on a GPU it passes
Lightning's GradScaler (``trainer.precision_plugin.scaler``) to the monitor; on CPU Lightning
runs ``bf16-mixed`` instead and there is no scaler.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn

from ..logs import PREFIX, Logger
from ..monitor import GradStatsMonitor
from ..provenance import find_batch
from ..schedulers import BatchSizeController
from ..stats import StepStats
from ..units import hf_token_counts
from ._common import (ExampleCounter, LrRatio, StepRecorder, check_controller, controller_ratio,
                      effective_lr, mean_loss, process_group, reserved_monitor_args,
                      restore_state, saved_state)

__all__ = ["GradStatsCallback"]

_REDUCTIONS = ("mean", "sum", "token_mean")


class GradStatsCallback(pl.Callback):
    """Attaches a :class:`~gradstats.GradStatsMonitor` to the LightningModule (or to its
    submodule ``module``, the one ``training_step`` calls with the batch), calls
    ``monitor.step()`` at every optimizer step and logs :func:`gradstats.logs.record_of`'s
    record through ``pl_module.log_dict`` (every trainer logger: TensorBoard, CSV, W&B,
    MLflow) and through ``loggers`` (e.g. a :class:`gradstats.logs.JsonlLogger` for
    ``gradstats plot``).

    Args:
        module: name of the submodule to watch (``pl_module.get_submodule(module)``); None
            watches the LightningModule itself (``training_step`` calls ``self(...)``).
        loss_reduction: how ``training_step``'s loss reduces a micro-batch: ``"mean"`` over
            its examples, ``"sum"``, or ``"token_mean"`` (with ``token_counts``, default the
            ``labels`` entries other than -100).
        token_counts: for ``"token_mean"``, ``f(args, kwargs) -> count`` of the watched
            module's call.
        loggers: extra :class:`~gradstats.logs.Logger` (s) given every step's record.
        log_to_trainer: also ``pl_module.log_dict`` the record (on step, not on epoch).
        layers: include the per-layer keys.
        controller: a :class:`~gradstats.BatchSizeController` (built without ``optimizer=``)
            updated with the smoothed ``B_simple`` every measured step. Its batch size is
            applied as ``trainer.accumulate_grad_batches = controller.accumulation_steps`` at
            the start of each epoch (Lightning groups micro-batches by their index in the
            epoch, so the count cannot change inside one), and the optimizer steps with every
            group's lr times the ratio its rule gives for the batch size in effect; the
            trainer's scheduler keeps setting its own values. ``micro_batch_size`` must be the
            dataloader's batch size (times the number of processes).
        **monitor_kwargs: passed to :class:`~gradstats.GradStatsMonitor` (``mode``, ``beta``,
            ``unsupported``, ``measure_every``, ...); not ``accumulation``, ``scaler`` or
            ``process_group``, which come from the trainer.

    ``monitor``, ``last_stats`` and ``last_record`` hold the monitor (detached when the fit
    ends) and the latest step's statistics and record. The callback's ``state_dict`` (the monitor's smoothed statistics,
    the controller, the examples seen) goes into Lightning's checkpoints, so a run resumed
    with ``ckpt_path=`` continues its statistics.
    """

    def __init__(self, *, module: str | None = None, loss_reduction: str = "mean",
                 token_counts: Callable[[tuple, dict], Any] | None = None,
                 loggers: Logger | Sequence[Logger] | None = None, log_to_trainer: bool = True,
                 layers: bool = True, controller: BatchSizeController | None = None,
                 **monitor_kwargs: Any) -> None:
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_REDUCTIONS}, got "
                             f"{loss_reduction!r}")
        if token_counts is not None and loss_reduction != "token_mean":
            raise ValueError("token_counts is for loss_reduction='token_mean'")
        reserved_monitor_args(monitor_kwargs, ("accumulation", "scaler", "process_group",
                                               "loss_reduction", "token_counts"), "Trainer")
        check_controller(controller)
        self.module, self.loss_reduction, self.token_counts = module, loss_reduction, token_counts
        self.log_to_trainer, self.controller = log_to_trainer, controller
        self.monitor_kwargs = monitor_kwargs
        self.recorder = StepRecorder(loggers, layers)
        self.monitor: GradStatsMonitor | None = None
        self.last_stats: StepStats | None = None
        self._counter: ExampleCounter | None = None
        self._lr: LrRatio | None = None
        self._ratio = 1.0  # the controller's lr ratio for the batch size in effect
        self._pending: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None
        self._attached = False
        self._losses: list[Any] = []

    @property
    def last_record(self) -> dict[str, Any] | None:
        return self.recorder.last

    # ------------------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._attached:
            return
        if not pl_module.automatic_optimization:
            raise ValueError("GradStatsCallback needs automatic optimization (Lightning then "
                             "owns backward, accumulation and the optimizer step); with manual "
                             "optimization call gradstats.GradStatsMonitor.step() yourself "
                             "after your manual_backward calls")
        watched = pl_module if self.module is None else pl_module.get_submodule(self.module)
        self._trainer = trainer
        self._watched = watched
        self._base = self._base_count(watched)
        self.monitor = GradStatsMonitor(
            watched, loss_reduction="token_mean", accumulation="sum",
            token_counts=self._count, scaler=getattr(trainer.precision_plugin, "scaler", None),
            process_group=process_group(), **self.monitor_kwargs)
        self._counter = ExampleCounter(watched, self.monitor.batch_dim)
        self._attached = True
        if self._pending is not None:
            self._restore(self._pending)

    def _base_count(self, watched: nn.Module) -> Callable[[tuple, dict], Any]:
        if self.loss_reduction == "sum":
            return lambda args, kwargs: 1
        if self.loss_reduction == "token_mean":
            return self.token_counts or hf_token_counts(watched)
        batch_dim = self.monitor_kwargs.get("batch_dim", 0)
        return lambda args, kwargs: find_batch(args, kwargs, batch_dim) or 0

    def _count(self, args: tuple, kwargs: dict) -> Any:
        """The divisor of an example's gradient in this forward's loss: the reduction's count
        times ``accumulate_grad_batches`` (Lightning divides every micro-batch loss by it)."""
        return self._base(args, kwargs) * self._trainer.accumulate_grad_batches

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.controller is None:
            return
        if len(trainer.optimizers) != 1:
            raise ValueError(f"controller: the callback couples the lr of one optimizer, the "
                             f"trainer has {len(trainer.optimizers)}")
        self._lr = LrRatio(trainer.optimizers[0], lambda: self._ratio)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.controller is not None:
            trainer.accumulate_grad_batches = self.controller.accumulation_steps
            self._ratio = controller_ratio(self.controller)

    # --------------------------------------------------------------------------- step
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: Any) -> None:
        """Keeps each micro-batch's own loss (Lightning hands it over divided by
        ``accumulate_grad_batches``) for the step's record."""
        self._losses.append(loss.detach() * trainer.accumulate_grad_batches)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        counted, forwards = self._counter.take()
        if forwards == 0:
            raise RuntimeError(
                f"GradStatsCallback saw no training forward of "
                f"{'the LightningModule' if self.module is None else repr(self.module)} in this "
                "step: training_step must call the module the callback watches (name the "
                "submodule it calls: GradStatsCallback(module='net'))")
        stats = self.monitor.step()
        self.last_stats = stats
        extra = {}
        if self.controller is not None:
            if stats.measured:
                self.controller.update(stats.b_simple_ema)
            extra[PREFIX + "batch_size_next"] = float(self.controller.batch_size)
        loss, self._losses = mean_loss(self._losses), []
        rec = self.recorder.record(stats, trainer.global_step + 1,
                                   lr=effective_lr(optimizer, self._ratio), counted=counted,
                                   loss=loss, extra=extra)
        if self.log_to_trainer and trainer.loggers:
            pl_module.log_dict(rec, on_step=True, on_epoch=False,
                               batch_size=max(int(rec[PREFIX + "batch_size"]), 1))

    # --------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.monitor is None:
            return dict(self._pending or {})
        return saved_state(self.monitor, self.recorder, self._ratio, self.controller)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.monitor is None:
            self._pending = dict(state_dict)
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        self._ratio = restore_state(state, self.monitor, self.recorder, self.controller)
        self._pending = None

    # ------------------------------------------------------------------------ tear-down
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self._attached:
            return
        for part in (self._counter, self._lr):
            if part is not None:
                part.remove()
        self.monitor.detach()
        self.recorder.close()
        self._counter = self._lr = None
        self._attached = False
