"""nn.Linear: |dW_i|^2 = |sum_t g_t a_t^T|_F^2 through the gradstats kernels, bias |sum_t g_t|^2."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .. import _ops
from . import register_rule
from .base import Factor, Rule, factored_probe, summed_probe


def _needs(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return p is not None and p.requires_grad


@register_rule(nn.Linear)
class LinearRule(Rule):
    supports_fused = True
    batch_dim_movable = True

    def factors(self, module, saved, grad_output):
        B = saved.shape[0]
        A = saved.reshape(B, -1, saved.shape[-1])
        G = grad_output.reshape(B, -1, grad_output.shape[-1])
        out = {}
        if _needs(module, "weight"):
            out["weight"] = Factor(cols=A, rows=G)
        if _needs(module, "bias"):
            out["bias"] = Factor(cols=torch.ones_like(G[..., :1]), rows=G)
        return out

    def norms(self, module, saved, grad_output):
        w, b = _ops.linear_norms(saved, grad_output)
        out = {}
        if _needs(module, "weight"):
            out["weight"] = w
        if _needs(module, "bias"):
            out["bias"] = b
        return out

    def probe(self, module, saved, grad_output, vectors):
        G = grad_output.reshape(-1, grad_output.shape[-1])
        out = {}
        if "weight" in vectors:
            out["weight"] = factored_probe(G, saved.reshape(-1, saved.shape[-1]),
                                           *vectors["weight"])
        if "bias" in vectors:
            out["bias"] = summed_probe(G, vectors["bias"][0])
        return out

    def fused_forward(self, module: nn.Module, begin) -> Any:
        """A forward for ``module`` whose backward computes dW, db and the per-example norms in
        one op. ``begin(module, requires_grad)`` returns the callback the backward reports
        ``(saved_input, grad_output, norms)`` to, or None when this call is not counted."""

        def forward(x: torch.Tensor) -> torch.Tensor:
            needs = module.weight.requires_grad or (module.bias is not None
                                                    and module.bias.requires_grad)
            report = begin(module, needs and torch.is_grad_enabled())
            if report is None:
                return F.linear(x, module.weight, module.bias)
            return _FusedLinear.apply(x, module.weight, module.bias, report)

        return forward


class _FusedLinear(torch.autograd.Function):
    """F.linear whose backward also yields the per-example norms (not twice differentiable:
    measure double-backward passes in hooks mode, or run them under monitor.paused())."""

    @staticmethod
    def forward(ctx, x, weight, bias, report):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.report = report
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = dW = db = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            dW, db, nw, nb = _ops.linear_fused(x.detach(), grad_out)
            norms = {}
            if ctx.needs_input_grad[1]:
                norms["weight"] = nw
                dW = dW.to(weight.dtype)
            else:
                dW = None
            if ctx.has_bias and ctx.needs_input_grad[2]:
                norms["bias"] = nb
                db = db.to(weight.dtype)
            else:
                db = None
            ctx.report(x.detach(), grad_out, norms)
        return grad_x, dW, db, None
