"""nn.Linear: |dW_i|^2 = |sum_t g_t a_t^T|_F^2 through the gradstats kernels, bias |sum_t g_t|^2."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import ContractError
from .base import Factor, Rule, Sink, flat3, needs
from .registry import register_rule


def linear_factors(A: torch.Tensor, G: torch.Tensor, weight: bool, bias: bool
                   ) -> dict[str, Factor]:
    """The factored per-example gradients of a Linear use with input ``A`` and output
    gradient ``G`` (``[B, ..., d]`` each)."""
    B = A.shape[0]
    A, G = flat3(A, B), flat3(G, B)
    out = {}
    if weight:
        out["weight"] = Factor(cols=A, rows=G)
    if bias:
        out["bias"] = Factor(cols=torch.ones_like(G[..., :1]), rows=G)
    return out


def linear_collect(A: torch.Tensor, G: torch.Tensor, sink: Sink, weight: str = "weight",
                   bias: str = "bias") -> None:
    """The Linear maths for any rule that has a Linear inside (attention projections, HF
    Conv1D, the function-level ``linear``): norms and probe of ``weight`` and ``bias``."""
    xw = yw = vb = None
    vw, vbias = sink.vec(weight), sink.vec(bias)
    if vw is not None:
        xw, yw = vw
    if vbias is not None:
        vb = vbias[0]
    ops.linear_collect(A, G, sink.E, sink.P, sink.rows, sink.slot(weight), sink.slot(bias),
                       xw, yw, vb, sink.strategy)


@register_rule(nn.Linear)
class LinearRule(Rule):
    supports_fused = True
    traceable = True
    batch_dim_movable = True

    def collect(self, module, saved, grad_output, sink):
        linear_collect(saved[0], grad_output, sink)

    def factors(self, module, saved, grad_output):
        return linear_factors(saved[0], grad_output, needs(module, "weight"),
                              needs(module, "bias"))

    def fused_forward(self, module: nn.Linear, x: torch.Tensor, sink: Sink | None,
                      on_backward=None, gate=None) -> torch.Tensor:
        """F.linear whose backward computes dW, db and the per-example norms in one op (the
        same autograd node with or without a sink, so activation checkpointing recomputes
        exactly what the first forward saved)."""
        if sink is None and (not torch.is_grad_enabled()
                             or torch._C._functorch.peek_interpreter_stack() is not None):
            return F.linear(x, module.weight, module.bias)
        E = P = rows = xw = yw = vb = None
        slot_w = slot_b = -1
        if sink is not None:
            E, P, rows, slot_w, slot_b = sink.E, sink.P, sink.rows, sink.slot("weight"), sink.slot("bias")
            vw, vbias = sink.vec("weight"), sink.vec("bias")
            if vw is not None:
                xw, yw = vw
            if vbias is not None:
                vb = vbias[0]
        strategy = "auto" if sink is None else sink.strategy
        out = _FusedLinear.apply(x, module.weight, module.bias, E, P, rows, slot_w, slot_b,
                                 xw, yw, vb, strategy)
        if sink is not None and out.grad_fn is not None:
            out.grad_fn.forward_record = sink.forward
            out.grad_fn.on_backward = on_backward
            out.grad_fn.gate = gate
        return out


class _FusedLinear(torch.autograd.Function):
    """F.linear whose backward also writes the per-example norms: dW and the norms from one op.
    A backward with ``create_graph=True`` (gradient penalties) takes differentiable ops instead,
    so it can be differentiated again; a backward while the monitor is paused counts nothing."""

    # forward(ctx, ...) rather than setup_context: with setup_context, Function.apply binds
    # the arguments through inspect.signature on every call (~90 us per layer on this CPU).
    # torch.func transforms need setup_context; fused_forward never applies this under one.
    @staticmethod
    def forward(ctx, x, weight, bias, E, P, rows, slot_w, slot_b, xw, yw, vb, strategy):
        ctx.save_for_backward(x, weight)
        # the accumulators are written by every layer's backward: not saved (no version check)
        ctx.acc = (E, P, rows, xw, yw, vb)
        ctx.has_bias = bias is not None
        ctx.slots = (slot_w, slot_b)
        ctx.strategy = strategy
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        E, P, rows, xw, yw, vb = ctx.acc
        gate = getattr(ctx, "gate", None)  # the monitor's hooks: paused or not
        count = E is not None and not (gate is not None and gate.paused)
        if count:
            if getattr(ctx, "counted", False):
                raise ContractError("backward reached a fused Linear twice for one forward; wrap "
                                    "backward passes that are not training steps in "
                                    "monitor.paused()")
            ctx.counted = True
            record = getattr(ctx, "forward_record", None)
            if record is not None:
                record.seen = True
        slot_w, slot_b = ctx.slots
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        slot_w, slot_b = (slot_w if need_w else -1), (slot_b if need_b else -1)
        grad_x = dW = db = None
        if need_x:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(x.dtype)
        if need_w or need_b:
            if torch.is_grad_enabled() or not count:  # create_graph: differentiable ops
                dW, db = _plain_grads(x, grad_out)
                if count:
                    ops.linear_collect(x.detach(), grad_out.detach(), E, P, rows, slot_w, slot_b,
                                       xw, yw, vb, ctx.strategy)
            else:
                dW, db = _fused_collect(x)(x.detach(), grad_out.detach(), E, P, rows, slot_w,
                                           slot_b, xw, yw, vb, ctx.strategy)
            repeated = getattr(ctx, "on_backward", None)
            if count and repeated is not None and x.shape[0]:  # it may run more than once
                repeated(x.detach(), grad_out.detach())
            dW = dW.to(weight.dtype) if need_w else None
            db = db.to(weight.dtype) if need_b else None
        return grad_x, dW, db, None, None, None, None, None, None, None, None, None


def _fused_collect(x: torch.Tensor):
    """The fused dW + norms op: for CUDA inputs the router of gradstats.kernels (the Triton
    kernel where Triton is available), the C++ op otherwise (Triton is never imported for CPU
    tensors)."""
    global _ROUTER
    if not x.is_cuda:
        return ops.linear_fused_collect
    if _ROUTER is None:
        try:
            from .. import kernels

            _ROUTER = kernels.linear_fused_collect
        except ImportError:
            _ROUTER = ops.linear_fused_collect
    return _ROUTER


_ROUTER = None


def _plain_grads(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g2 = g.reshape(-1, g.shape[-1])
    return g2.t().matmul(x.reshape(-1, x.shape[-1]).to(g2.dtype)), g2.sum(0)
