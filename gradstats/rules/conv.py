"""nn.Conv1d / Conv2d / Conv3d through the unfold (im2col) view.

For an example ``i`` let ``X_i`` be its padded input and, for group ``h`` of ``groups``,
``A_ih`` the ``[L, C_in/groups * prod(k)]`` matrix whose row ``l`` holds the input patch that
output position ``l`` sees (stride and dilation applied), and ``G_ih`` the ``[L, C_out/groups]``
gradient of the group's output channels. The weight of group ``h`` flattened to
``[C_out/groups, C_in/groups * prod(k)]`` then has the per-example gradient ``G_ih^T A_ih``, so

    |dW_i|^2 = sum_h || G_ih^T A_ih ||_F^2          (a Linear layer with T = L, per group)
    |db_i|^2 = sum_c (sum_l g_icl)^2

computed by :func:`gradstats.ops.linear_norms` (Gram or direct by its cost model) with the
groups folded into the batch dimension. Every ``padding_mode`` is handled by padding the input
as the module does (``F.pad``) before unfolding. ConvTranspose layers have no rule.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .base import PROBES, Factor, Rule, needs
from .registry import register_rule

#: the unfolded input is built this many elements at a time at most (in example chunks), so
#: that large layers do not allocate one huge im2col buffer per step
_UNFOLD_CHUNK_ELEMS = 1 << 23

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}


def _spatial_dims(module: nn.Module) -> int:
    return len(module.kernel_size)


def _pad_amounts(module: nn.Module) -> list[int]:
    """Padding as ``F.pad`` takes it (last spatial dim first, ``[left, right]`` each), for the
    module's ``padding`` (ints, a tuple, ``"valid"`` or ``"same"``). ``"same"`` puts
    ``total // 2`` on the left and the rest on the right, as torch's convolution does."""
    n = _spatial_dims(module)
    pad = module.padding
    if pad == "valid":
        per_dim = [(0, 0)] * n
    elif pad == "same":
        per_dim = []
        for d, k in zip(module.dilation, module.kernel_size):
            total = d * (k - 1)
            per_dim.append((total // 2, total - total // 2))
    else:
        per_dim = [(p, p) for p in pad]
    return [p for lr in reversed(per_dim) for p in lr]


def _batched(module: nn.Module, x: torch.Tensor, g: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds the batch dim to an unbatched input ``[C, *spatial]`` (a batch of one example)."""
    if x.dim() == _spatial_dims(module) + 1:
        return x.unsqueeze(0), g.unsqueeze(0)
    return x, g


def _padded(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    pads = _pad_amounts(module)
    if not any(pads):
        return x
    if module.padding_mode == "zeros":
        return F.pad(x, pads)
    return F.pad(x, pads, mode=module.padding_mode)


def _unfold_groups(module: nn.Module, xp: torch.Tensor) -> torch.Tensor:
    """``[B * groups, L, C_in/groups * prod(k)]`` patches of the padded input ``xp``, columns in
    the order of ``weight[o].flatten()`` (channel, then kernel dims)."""
    n, g = _spatial_dims(module), module.groups
    B, C = xp.shape[:2]
    v = xp.reshape(B, g, C // g, *xp.shape[2:])
    for d, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        v = v.unfold(3 + d, dil * (k - 1) + 1, s)  # window appended as the last dim
        if dil > 1:
            v = v[..., ::dil]
    # v: [B, g, C/g, *L, *k] -> [B, g, *L, C/g, *k]
    v = v.permute(0, 1, *range(3, 3 + n), 2, *range(3 + n, 3 + 2 * n))
    L = math.prod(v.shape[2:2 + n])
    return v.reshape(B * g, L, -1)


def _bias_norms(grad: torch.Tensor) -> torch.Tensor:
    """``|db_i|^2 = sum_c (sum_l g_icl)^2`` for the output gradient ``[B, C_out, *L]``."""
    dt = torch.promote_types(grad.dtype, torch.float32)
    return grad.reshape(grad.shape[0], grad.shape[1], -1).sum(2, dtype=dt).square().sum(1)


def _grad_groups(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """``[B * groups, L, C_out/groups]`` view of the output gradient ``[B, C_out, *L]``."""
    B, C = grad.shape[:2]
    g = module.groups
    return grad.reshape(B, g, C // g, -1).transpose(2, 3).reshape(B * g, -1, C // g)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    """Per-example norms of a convolution's weight and bias (any padding, padding_mode,
    stride, dilation and groups)."""

    def collect(self, module, saved, grad_output, sink):
        x, grad = _batched(module, saved[0], grad_output)
        if needs(module, "weight"):
            sink.add("weight", self.weight_norms(module, x, grad))
        if needs(module, "bias"):
            sink.add("bias", _bias_norms(grad))
        if sink.probing:
            for k, v in self._probe(module, x, grad, sink).items():
                sink.probe(k, v)

    def weight_norms(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor,
                     route: str | None = None) -> torch.Tensor:
        """``|dW_i|^2`` by ``route``: ``"grouped"`` (each example's weight gradient from the
        convolution weight-gradient kernel, the batch folded into the groups) or ``"unfold"``
        (the im2col view as a Linear layer with T = output positions, Gram or direct); None:
        grouped where the Linear cost model picks direct, unfold where it picks Gram (few
        positions)."""
        patch = (x.shape[1] // module.groups) * math.prod(module.kernel_size)
        positions = math.prod(grad.shape[2:])
        if route is None:
            direct = ops.linear_strategy(positions, patch, grad.shape[1] // module.groups)
            route = "grouped" if direct == "direct" else "unfold"
        if route == "grouped":
            return self._direct_norms(module, x, grad)
        return self._unfolded_norms(module, x, grad, patch * module.groups * positions)

    def _unfolded_norms(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor,
                        per_example: int) -> torch.Tensor:
        """Through the unfold (im2col) view as a Linear layer with T = output positions, in
        chunks of examples that bound the patch buffer."""
        B, g = x.shape[0], module.groups
        step = max(1, _UNFOLD_CHUNK_ELEMS // max(1, per_example))
        parts = []
        for lo in range(0, B, step):
            A = _unfold_groups(module, _padded(module, x[lo:lo + step]))
            w, _ = ops.linear_norms(A, _grad_groups(module, grad[lo:lo + step]))
            parts.append(w.view(-1, g).sum(1))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _weight_grads(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor
                      ) -> Iterator[torch.Tensor]:
        """Each example's weight gradient ``[b, C_out, C_in/groups * prod(k)]``, chunk by chunk
        of examples (bounding the ``[chunk, P]`` buffer), from the convolution weight-gradient
        kernel run with the batch folded into the groups (no patch buffer)."""
        B, g, n = x.shape[0], module.groups, _spatial_dims(module)
        dt = torch.promote_types(torch.promote_types(x.dtype, grad.dtype), torch.float32)
        step = max(1, _UNFOLD_CHUNK_ELEMS // max(1, module.weight.numel()))
        for lo in range(0, B, step):
            xp = _padded(module, x[lo:lo + step].to(dt))
            gc = grad[lo:lo + step].to(dt)
            b = xp.shape[0]
            dw = _WEIGHT_GRAD[n](
                xp.reshape(1, b * xp.shape[1], *xp.shape[2:]),
                (b * module.out_channels, module.in_channels // g, *module.kernel_size),
                gc.reshape(1, b * gc.shape[1], *gc.shape[2:]),
                stride=module.stride, padding=0, dilation=module.dilation, groups=b * g)
            yield dw.reshape(b, module.out_channels, -1)

    def _direct_norms(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor
                      ) -> torch.Tensor:
        """``|dW_i|^2`` from each example's weight gradient."""
        return torch.cat([dw.square().sum((1, 2)) for dw in self._weight_grads(module, x, grad)])

    def factors(self, module, saved, grad_output):
        """For a convolution called more than once per forward (a shared tower): the
        per-example gradients themselves, ``dW_i`` ``[C_out, C_in/groups * prod(k)]`` as the
        columns of ``C_out`` unit rows (``[B, C_out, C_out]``), and ``db_i`` as one row. This
        forms the ``B x P`` per-example weight gradients, for shared layers only."""
        x, grad = _batched(module, saved[0], grad_output)
        B, C_out = grad.shape[0], grad.shape[1]
        dt = torch.promote_types(torch.promote_types(x.dtype, grad.dtype), torch.float32)
        out = {}
        if needs(module, "weight"):
            dW = torch.cat(list(self._weight_grads(module, x, grad)))
            eye = torch.eye(C_out, dtype=dt, device=grad.device).expand(B, C_out, C_out)
            out["weight"] = Factor(cols=dW, rows=eye)
        if needs(module, "bias"):
            db = grad.reshape(B, C_out, -1).sum(2, dtype=dt)
            out["bias"] = Factor(cols=db.new_ones(B, 1, 1), rows=db[:, None])
        return out

    def _probe(self, module, x, grad, sink):
        """``<x y^T, dW> = sum_{i,h,l} (G_ihl . x_h)(A_ihl . y)``: ``A . y`` for every position is
        a convolution with ``y`` as the kernel of each group, run in the input's precision (at
        least float32: its rounding is far inside the probe's tolerance, and a float64
        convolution has no fast kernel); the sums over positions are float64."""
        B, C_out, g = grad.shape[0], grad.shape[1], module.groups
        dt = torch.promote_types(torch.promote_types(x.dtype, grad.dtype), torch.float32)
        G = grad.to(dt).reshape(B, g, C_out // g, -1)  # [B, g, C_out/g, L]
        out = {}
        if sink.vec("weight") is not None:
            vx, vy = sink.vec("weight")
            xp = _padded(module, x.to(dt))
            n = _spatial_dims(module)
            ky = vy.t().to(dt).reshape(PROBES, -1, *module.kernel_size).repeat(g, *[1] * (1 + n))
            ay = _CONV_FNS[n](xp, ky, stride=module.stride, dilation=module.dilation,
                              groups=g).double().reshape(B, g, PROBES, -1)
            gx = torch.einsum("bgol,gop->bgpl", G, vx.to(dt).reshape(g, C_out // g, PROBES))
            # the bound sums the products' absolute values: the scale of the float64 sums
            prod = gx.double() * ay
            out["weight"] = torch.cat([prod.sum((0, 1, 3)), prod.abs().sum((0, 1, 3))])
        if sink.vec("bias") is not None:
            v = sink.vec("bias")[0]
            gv = torch.einsum("bol,op->bpl", G.reshape(B, C_out, -1), v.to(dt)).double()
            out["bias"] = torch.cat([gv.sum((0, 2)), gv.abs().sum((0, 2))])
        return out

    def capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        x = inputs[0]
        n = _spatial_dims(module)
        if x.dim() not in (n + 1, n + 2):
            raise ValueError(f"{type(module).__name__}: expected a [B, C, *spatial] input with "
                             f"{n} spatial dims, got shape {tuple(x.shape)}")
        return (x.detach(),)
