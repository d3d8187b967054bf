"""Runs one drawn training setup the way a user's training loop would, and records what the
reference needs: the weights before each step, the ``.grad`` after backward, what
``monitor.step()`` returned, and any error with where it was raised."""
from __future__ import annotations

import contextlib
import copy as copy_module
import dis
import os
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .models import Net, build, example_losses
from .spec import Case, Chunk, call, step_data

_GRADSTATS_DIR: str | None = None


def _gradstats_dir() -> str:
    global _GRADSTATS_DIR
    if _GRADSTATS_DIR is None:
        import gradstats

        _GRADSTATS_DIR = os.path.dirname(os.path.abspath(gradstats.__file__))
    return _GRADSTATS_DIR


@dataclass
class ErrorInfo:
    phase: str          # "construct" | "train" | "step"
    step: int
    type: str
    message: str
    named: bool         # a ValueError/RuntimeError (ContractError included)
    raised_in_gradstats: bool  # by a ``raise`` statement in gradstats' own code
    where: str          # the raising frame, file:line

    @classmethod
    def of(cls, e: BaseException, phase: str, step: int) -> ErrorInfo:
        last = traceback.extract_tb(e.__traceback__)[-1]
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        # a torch op failing inside gradstats also ends in a gradstats frame: a refusal is a
        # ``raise`` statement there (read from the bytecode: the source may have changed since)
        deliberate = (os.path.abspath(last.filename).startswith(_gradstats_dir())
                      and dis.opname[tb.tb_frame.f_code.co_code[tb.tb_lasti]] == "RAISE_VARARGS")
        return cls(phase, step, type(e).__name__, str(e), isinstance(e, (ValueError, RuntimeError)),
                   deliberate, f"{last.filename}:{last.lineno}")


@dataclass
class StepRecord:
    step: int
    weights: dict[str, torch.Tensor]             # state_dict before the forward
    trainable: tuple[str, ...]                   # parameter names that needed grad
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    stats: dict[str, Any] | None = None
    copy_weights: dict[str, torch.Tensor] | None = None
    copy_trainable: tuple[str, ...] = ()
    copy_grads: dict[str, torch.Tensor | None] | None = None


@dataclass
class RankRecord:
    rank: int
    steps: list[StepRecord] = field(default_factory=list)
    errors: list[ErrorInfo] = field(default_factory=list)
    stopped: bool = False


def _stats_dict(s) -> dict[str, Any]:
    layers = {k: (v.tr_sigma, v.g2, v.b_simple, v.defined) for k, v in s.layers.items()}
    pe = s.per_example_sq_norms
    return {"n": s.n, "tr": s.tr_sigma, "g2": s.g2, "b": s.b_simple, "defined": s.defined,
            "reason": s.reason, "measured": s.measured, "skipped": s.skipped,
            "skip_reason": s.skip_reason,
            "per_example": None if pe is None else pe.detach().double().cpu().clone(),
            "layers": layers}


def named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {k: None if p.grad is None else p.grad.detach().cpu().clone()
            for k, p in named_params(model).items()}


def make_model(case: Case) -> Net:
    model = build(case.model).to(case.dtype)
    model.train(case.train)
    if case.freeze is not None and case.freeze[2]:  # unfrozen mid-run: frozen at the start
        model.blocks[case.freeze[1]].requires_grad_(False)
    return model


def _perturbed_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of the watched model (an EMA or teacher copy) with its own weights."""
    twin = copy_module.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    return twin


def _copy_pass(case: Case, twin: nn.Module, chunk: Chunk, rec: StepRecord) -> None:
    rec.copy_weights = _weights(twin)
    rec.copy_trainable = tuple(k for k, p in named_params(twin).items() if p.requires_grad)
    twin.zero_grad(set_to_none=True)
    with _autocast(case):
        loss = example_losses(case.model, call(twin, case, chunk), chunk.target,
                              case.seq_reduce).mean()
    loss.backward()
    rec.copy_grads = _grads(twin)


def _autocast(case: Case):
    if case.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=case.autocast)


def _loss(case: Case, losses: torch.Tensor, b: int) -> torch.Tensor:
    if case.loss_reduction == "mean":
        loss = losses.mean() if b else losses.sum()  # an empty rank contributes nothing
    else:
        loss = losses.sum()
    return loss / case.k if case.accumulation == "mean" else loss


def run(case: Case, *, rank: int = 0, world: int = 1, with_monitor: bool = True) -> RankRecord:
    """One rank's run of ``case`` (under DDP when ``world > 1``; the process group exists).
    Warnings are silenced: what the outcome rests on is in the statistics, skip reasons and
    errors."""
    record = RankRecord(rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(case, rank, world, with_monitor, record)
    return record


def _run(case: Case, rank: int, world: int, with_monitor: bool, record: RankRecord) -> None:
    torch.manual_seed(case.data_seed)
    model = make_model(case)
    wrapped: nn.Module = model
    if world > 1:
        # reentrant checkpointing under DDP needs static_graph (DDP's documented condition for
        # parameters used more than once or recomputed in backward)
        wrapped = nn.parallel.DistributedDataParallel(
            model, static_graph=case.model.checkpoint == "reentrant")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = None
    if with_monitor:
        import gradstats

        try:
            monitor = gradstats.GradStatsMonitor(
                wrapped, mode=case.mode, loss_reduction=case.loss_reduction,
                accumulation=case.accumulation, unsupported=case.unsupported,
                dataset_size=case.dataset_size)
        except Exception as e:  # noqa: BLE001 - every error is classified by the checker
            record.errors.append(ErrorInfo.of(e, "construct", 0))
            record.stopped = True
            return
    twin = _perturbed_copy(model) if case.copy != "none" else None
    try:
        for s in range(case.steps):
            if not _one_step(case, s, model, wrapped, opt, monitor, twin, rank, record):
                record.stopped = True
                break
    finally:
        if monitor is not None:
            monitor.detach()


def _one_step(case: Case, s: int, model: Net, wrapped: nn.Module, opt: torch.optim.Optimizer,
              monitor: Any, twin: nn.Module | None, rank: int, record: RankRecord) -> bool:
    """Step ``s``: forwards and backwards of this rank's micro-batches (and the deepcopy's pass
    where the case puts it), ``monitor.step()``, the optimizer step. False stops the run."""
    if case.freeze is not None and case.freeze[0] == s:
        model.blocks[case.freeze[1]].requires_grad_(case.freeze[2])
    chunks = [c for c in step_data(case, s) if c.rank == rank]
    rec = StepRecord(s, _weights(model),
                     tuple(k for k, p in named_params(model).items() if p.requires_grad))
    record.steps.append(rec)
    try:
        if twin is not None and case.copy == "before":
            _copy_pass(case, twin, chunks[0], rec)
        for j, chunk in enumerate(chunks):
            sync = contextlib.nullcontext()
            # no_sync under static_graph trips an internal assert in DDP's reducer (torch
            # 2.14): there every micro-batch all-reduces, which gives the same .grad
            if case.ddp and j < len(chunks) - 1 and case.model.checkpoint != "reentrant":
                sync = wrapped.no_sync()
            with sync:
                with _autocast(case):
                    losses = example_losses(case.model, call(wrapped, case, chunk),
                                            chunk.target, case.seq_reduce)
                    loss = _loss(case, losses, len(chunk))
                if twin is not None and case.copy == "between" and j == 0:
                    _copy_pass(case, twin, chunk, rec)
                loss.backward()
        if twin is not None and case.copy == "after":
            _copy_pass(case, twin, chunks[0], rec)
    except Exception as e:  # noqa: BLE001
        record.errors.append(ErrorInfo.of(e, "train", s))
        return False
    rec.grads = _grads(model)
    if monitor is not None:
        try:
            rec.stats = _stats_dict(monitor.step())
        except Exception as e:  # noqa: BLE001
            err = ErrorInfo.of(e, "step", s)
            record.errors.append(err)
            opt.zero_grad()
            return case.freeze is not None and case.freeze[0] == s and err.named
    opt.step()
    opt.zero_grad()
    return True
