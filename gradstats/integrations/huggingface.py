"""Hugging Face ``Trainer``: ``GradStatsCallback().attach(trainer)`` measures the gradient
noise scale of the run and puts it in the Trainer's logs.

Where it hooks in (transformers 5.x, ``Trainer._run_epoch``): after the last micro-batch's
backward the Trainer clips (``max_grad_norm > 0``) or, with clipping off, computes the norm
through ``accelerator.clip_grad_norm_(..., inf)`` (which also unscales an fp16 GradScaler), then
calls ``on_pre_optimizer_step``, then ``optimizer.step()``. At ``on_pre_optimizer_step`` the
gradients are therefore already clipped, and clipping changes ``p.grad`` (the monitor's contract
check would refuse the step). So the callback takes clipping over: it sets
``args.max_grad_norm = 0`` for the run (restored at the end), calls ``monitor.step()`` and then
clips with the same norm itself; the logged ``grad_norm`` is the norm before clipping, as before.

Units (what each example's gradient is divided by), ``loss_units``:

* ``"num_items_in_batch"``: when the model takes loss kwargs and the batch has ``labels`` the
  Trainer counts the valid labels of all micro-batches of the optimizer step
  (``num_items_in_batch``), the model's loss is the token *sum* divided by it and the Trainer does
  *not* divide by the accumulation count: every example's weight is ``1/num_items_in_batch``,
  a count that changes from step to step. The callback reads it from each forward's keyword
  arguments and checks that it equals the valid labels the step's micro-batches hold;
* ``"token_mean"``: the model's own mean over the micro-batch's valid (shifted) labels, divided
  by the number of micro-batches of the step;
* ``"mean"``: a mean over the micro-batch's examples, divided likewise;
* ``"auto"`` (default): the first when the Trainer passes loss kwargs to the model (its
  ``model_accepts_loss_kwargs``), else ``"token_mean"`` for a causal-LM loss, else ``"mean"``.
  Every forward is checked against the choice (a ``num_items_in_batch`` keyword present or not).

Mixed precision: ``fp16`` runs the accelerator's GradScaler, which the monitor is given
(``attach`` is needed for that); ``bf16`` needs nothing. The monitor's and the controller's state
are saved in the checkpoint's ``trainer_state.json`` (``ExportableState``) and restored from it by
the callback itself when training resumes (leave ``restore_callback_states_from_checkpoint``
False: with True the Trainer would rebuild the callback from no arguments).
"""
from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..contract import ContractError
from ..logs import PREFIX, Logger
from ..monitor import GradStatsMonitor
from ..schedulers import BatchSizeController
from ..stats import StepStats
from ._common import (ExampleCounter, LrRatio, StepRecorder, check_controller, controller_ratio,
                      effective_lr, mean_loss, process_group, reserved_monitor_args,
                      restore_state, saved_state, world_size)

__all__ = ["GradStatsCallback"]

_UNITS = ("auto", "num_items_in_batch", "token_mean", "mean")
_KEY = "gradstats"


def _shifts_labels(model: Any, trainer: Any) -> tuple[bool, bool]:
    """Whether the model's own loss shifts the labels by one position (the causal-LM loss), and
    whether the Trainer counts ``num_items_in_batch`` over shifted labels. The two can differ:
    the Trainer looks the model's ``loss_type`` up, the model falls back to the causal-LM loss
    when it has none (GPT-2)."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # older transformers
        lm = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        return lm, lm
    enc_dec = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    own = getattr(model, "loss_function", None) is ForCausalLMLoss and not enc_dec
    counted = getattr(trainer, "_loss_shifts_labels", None)
    if counted is None:
        counted = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss \
            and not enc_dec
    return own, bool(counted)


def _accepts_loss_kwargs(model: Any) -> bool:
    """The Trainer's rule for passing ``num_items_in_batch`` to the model."""
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    return any(p.kind == inspect.Parameter.VAR_KEYWORD
               for p in inspect.signature(model.forward).parameters.values())


class GradStatsCallback(TrainerCallback, ExportableState):
    """Attaches a :class:`~gradstats.GradStatsMonitor` to the Trainer's model, calls
    ``monitor.step()`` at every optimizer step, and adds the latest step's
    :func:`gradstats.logs.record_of` record to the Trainer's ``logs`` (so every ``report_to``
    integration and ``trainer.state.log_history`` get it at each ``logging_steps``), and hands
    every step's record to ``loggers`` (e.g. a :class:`gradstats.logs.JsonlLogger` for
    ``gradstats plot``).

    Use ``cb.attach(trainer)``: it puts the callback first among the Trainer's callbacks (its
    values then reach the reporters, which run after it) and gives it the Trainer's
    accelerator (the fp16 GradScaler) and optimizer (the controller's lr). Passing it in
    ``Trainer(callbacks=[...])`` works for fp32/bf16 without a controller.

    Args:
        loss_units: see the module docstring.
        loggers: extra :class:`~gradstats.logs.Logger` (s) given every step's record.
        layers: include the per-layer keys in the records.
        layers_in_trainer_logs: put the per-layer keys in the Trainer's logs too (off by default:
            the Trainer's progress bar prints every log line it gets).
        controller: a :class:`~gradstats.BatchSizeController` (without ``optimizer=``) updated
            with the smoothed ``B_simple`` every measured step. Its batch size is applied as
            ``args.gradient_accumulation_steps = controller.accumulation_steps`` at the start of
            each epoch (the Trainer's loop fixes the count within an epoch), and the optimizer
            steps with every group's lr times the ratio its rule gives for the batch size in
            effect; the Trainer's scheduler keeps setting its own values. Needs ``attach``.
        take_over_clipping: see the module docstring; False raises instead when
            ``max_grad_norm > 0``.
        **monitor_kwargs: passed to :class:`~gradstats.GradStatsMonitor` (``mode``, ``beta``,
            ``unsupported``, ...); not the units, ``scaler`` or ``process_group``.
    """

    def __init__(self, *, loss_units: str = "auto",
                 loggers: Logger | Sequence[Logger] | None = None, layers: bool = True,
                 layers_in_trainer_logs: bool = False,
                 controller: BatchSizeController | None = None, take_over_clipping: bool = True,
                 _rebuilt_by_trainer: bool = False, **monitor_kwargs: Any) -> None:
        if _rebuilt_by_trainer:
            raise ValueError(
                "restore_callback_states_from_checkpoint=True: the Trainer rebuilds callbacks "
                "from their arguments alone and would lose this one's; leave it False, "
                "GradStatsCallback restores its statistics from the checkpoint by itself")
        if loss_units not in _UNITS:
            raise ValueError(f"loss_units must be one of {_UNITS}, got {loss_units!r}")
        reserved_monitor_args(monitor_kwargs, ("accumulation", "scaler", "process_group",
                                               "loss_reduction", "token_counts"), "Trainer")
        check_controller(controller)
        self.loss_units, self.controller = loss_units, controller
        self.take_over_clipping, self.monitor_kwargs = take_over_clipping, monitor_kwargs
        self.layers_in_trainer_logs = layers_in_trainer_logs
        self.recorder = StepRecorder(loggers, layers)
        self.monitor: GradStatsMonitor | None = None
        self.last_stats: StepStats | None = None
        self.units: str | None = None
        self._trainer: weakref.ref | None = None
        self._clip: float | None = None
        self._counter: ExampleCounter | None = None
        self._lr: LrRatio | None = None
        self._ratio = 1.0
        self._merged = -1

    @property
    def last_record(self) -> dict[str, Any] | None:
        return self.recorder.last

    def attach(self, trainer: Any) -> GradStatsCallback:
        """Adds the callback to ``trainer`` as its first callback; returns it."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._trainer = weakref.ref(trainer)
        return self

    # ------------------------------------------------------------------------- set-up
    def _choose_units(self, model: Any, trainer: Any) -> str:
        if self.loss_units != "auto":
            return self.loss_units
        accepts = (trainer.model_accepts_loss_kwargs if trainer is not None
                   else _accepts_loss_kwargs(model))
        if accepts:
            return "num_items_in_batch"
        return "token_mean" if self._shift_own else "mean"

    @staticmethod
    def _labels(kwargs: dict, shift: bool) -> torch.Tensor | None:
        if kwargs.get("shift_labels") is not None:
            return kwargs["shift_labels"]
        labels = kwargs.get("labels")
        if labels is None:
            return None
        return labels[..., 1:] if shift else labels

    def _check_call(self, args: tuple, kwargs: dict) -> None:
        """Each training forward agrees with the chosen units; counts its valid labels."""
        passed = kwargs.get("num_items_in_batch") is not None
        if passed != (self.units == "num_items_in_batch"):
            raise ContractError(
                f"GradStatsCallback(loss_units={self.loss_units!r}) chose {self.units!r} units "
                f"but the Trainer {'passed' if passed else 'did not pass'} num_items_in_batch "
                "to the model: pass loss_units='num_items_in_batch' when it does (token sum "
                "over the step's labels), else 'token_mean' or 'mean' (the model's own mean, "
                "divided by the accumulation count)")
        labels = self._labels(kwargs, self._shift_counted)
        if labels is not None:  # tensors: compared once per step, no sync per forward
            self._step_labels = self._step_labels + (labels != -100).sum()
        if passed:
            self._step_items = kwargs["num_items_in_batch"]

    def _count(self, args: tuple, kwargs: dict) -> Any:
        if self.units == "num_items_in_batch":
            return kwargs["num_items_in_batch"] / self._items_scale
        labels = self._labels(kwargs, self._shift_own)
        if labels is None:
            raise ValueError("loss_units='token_mean' needs labels= in the batch")
        return (labels != -100).sum()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        trainer = self._trainer() if self._trainer is not None else None
        if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
            import transformers

            raise ImportError(f"GradStatsCallback needs the Trainer's on_pre_optimizer_step "
                              f"event, which transformers {transformers.__version__} lacks; "
                              "upgrade transformers")
        if args.n_gpu > 1:
            raise ValueError("GradStatsCallback does not support nn.DataParallel (n_gpu > 1); "
                             "run one process per GPU (torchrun, accelerate launch)")
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        if args.fp16 and trainer is None:
            raise ValueError("fp16: the monitor needs the Trainer's GradScaler; add the callback "
                             "with GradStatsCallback(...).attach(trainer)")
        if self.controller is not None and trainer is None:
            raise ValueError("controller: add the callback with .attach(trainer), which gives "
                             "it the optimizer whose lr it couples")
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            if not self.take_over_clipping:
                raise ValueError(
                    f"max_grad_norm={args.max_grad_norm}: the Trainer clips before "
                    "on_pre_optimizer_step, so the monitor would see clipped gradients; set "
                    "max_grad_norm=0, or take_over_clipping=True (the callback clips after "
                    "measuring)")
            self._clip, args.max_grad_norm = float(args.max_grad_norm), 0.0
        self._shift_own, self._shift_counted = _shifts_labels(model, trainer)
        self.units = self._choose_units(model, trainer)
        # the Trainer multiplies the loss by the number of processes when it averages the
        # token count across them (DDP then averages the gradients back)
        self._items_scale = world_size() if getattr(args, "average_tokens_across_devices", False) \
            else 1
        reduction = {"num_items_in_batch": ("token_mean", "sum"),
                     "token_mean": ("token_mean", "mean"), "mean": ("mean", "mean")}[self.units]
        self.monitor = GradStatsMonitor(
            model, loss_reduction=reduction[0], accumulation=reduction[1], scaler=scaler,
            token_counts=self._count if reduction[0] == "token_mean" else None,
            process_group=process_group(), **self.monitor_kwargs)
        self._counter = ExampleCounter(model, self.monitor.batch_dim, check=self._check_call)
        self._losses: list[torch.Tensor] = []
        self._loss_hook = model.register_forward_hook(self._on_output)
        self._step_labels, self._step_items = 0, None
        if self.controller is not None:
            self._lr = LrRatio(trainer.optimizer, lambda: self._ratio)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[-1] if isinstance(saved, list) else saved
        if saved and saved.get("attributes", {}).get(_KEY):
            self._restore(saved["attributes"][_KEY])

    def _on_output(self, module: Any, args: tuple, output: Any) -> None:
        loss = getattr(output, "loss", None)
        if loss is not None and module.training and torch.is_grad_enabled():
            self._losses.append(loss.detach())

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.controller is not None:
            args.gradient_accumulation_steps = self.controller.accumulation_steps
            self._ratio = controller_ratio(self.controller)

    # --------------------------------------------------------------------------- step
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              **kwargs: Any) -> None:
        counted, forwards = self._counter.take()
        if self.units == "num_items_in_batch" and world_size() == 1 and \
                self._step_items is not None and int(self._step_items) != int(self._step_labels):
            raise ContractError(
                f"num_items_in_batch={int(self._step_items)} but this step's {forwards} "
                f"micro-batches hold {int(self._step_labels)} valid labels: the loss is not the "
                "token sum over the step divided by num_items_in_batch; pass loss_units=")
        self._step_labels, self._step_items = 0, None
        stats = self.monitor.step()
        self.last_stats = stats
        if self._clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self._clip)
        extra = {}
        if self.controller is not None:
            if stats.measured:
                self.controller.update(stats.b_simple_ema)
            extra[PREFIX + "batch_size_next"] = float(self.controller.batch_size)
        trainer = self._trainer() if self._trainer is not None else None
        optimizer = getattr(trainer, "optimizer", None) or kwargs.get("optimizer")
        # the step's loss as the Trainer sums it: shares of the step (num_items_in_batch), or
        # micro-batch means, each divided by the micro-batch count
        loss = mean_loss(self._losses, total=self.units == "num_items_in_batch")
        self._losses = []
        self.recorder.record(stats, state.global_step + 1,
                             lr=effective_lr(optimizer, self._ratio), counted=counted,
                             loss=loss, extra=extra)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        """Adds the latest step's record to a training log (the one with ``loss``)."""
        rec = self.recorder.last
        if rec is None or logs is None or "loss" not in logs or self._merged == state.global_step:
            return
        if not self.layers_in_trainer_logs:
            rec = {k: v for k, v in rec.items() if not k.startswith(PREFIX + "layers/")}
        logs.update(rec)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(rec)
        self._merged = state.global_step

    # --------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """For ``trainer_state.json``; the arguments make a Trainer-side rebuild refuse."""
        attrs: dict[str, Any] = {}
        if self.monitor is not None:
            attrs[_KEY] = saved_state(self.monitor, self.recorder, self._ratio, self.controller)
        return {"args": {"_rebuilt_by_trainer": True}, "attributes": attrs}

    def _restore(self, saved: dict) -> None:
        self._ratio = restore_state(saved, self.monitor, self.recorder, self.controller)

    # ------------------------------------------------------------------------ tear-down
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._clip is not None:
            args.max_grad_norm, self._clip = self._clip, None
        for part in (self._counter, self._lr, getattr(self, "_loss_hook", None)):
            if part is not None:
                part.remove()
        self._counter = self._lr = self._loss_hook = None
        if self.monitor is not None:
            self.monitor.detach()
        self.recorder.close()
