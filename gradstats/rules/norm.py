"""Normalisation layers with an elementwise affine: LayerNorm, RMSNorm, GroupNorm, affine
InstanceNorm1d/2d/3d and BatchNorm in eval mode.

Each computes ``y = xhat * gamma (+ beta)`` with ``xhat`` the normalised input and ``gamma``,
``beta`` indexed by ``k`` (the normalized_shape elements, or the channels). Arranging the
example's positions so that ``r`` runs over everything ``gamma`` is shared across,

    dgamma_i[k] = sum_r g_irk xhat_irk          dbeta_i[k] = sum_r g_irk

and the per-example squared norms are ``|dgamma_i|^2`` and ``|dbeta_i|^2``. ``xhat`` is
recomputed from the saved input in the backward hook (float32, float64 for float64 inputs) with
the module's eps:

- LayerNorm: mean and biased variance over the last ``len(normalized_shape)`` dims;
- RMSNorm: ``x / sqrt(mean(x^2) + eps)`` over the same dims (eps None: float32's, or float64's
  machine epsilon, as torch uses);
- GroupNorm: mean and variance over each group of channels and all positions;
- InstanceNorm: per example and channel over positions, or the running statistics when
  ``track_running_stats`` and eval mode;
- BatchNorm (eval mode only, with running statistics): ``(x - running_mean) /
  sqrt(running_var + eps)`` per channel. In training mode the batch statistics mix the examples
  and per-example gradients are not defined: refused.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import register_rule
from .base import PROBES, Factor, Rule
from .linear import _needs


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class _AffineNormRule(Rule):
    """Shared maths. Subclasses implement :meth:`layout`: the gradient and ``xhat`` as
    ``[B, R, K]`` (``reduce_dim=1``) or ``[B, K, R]`` (``reduce_dim=2``)."""

    def layout(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        raise NotImplementedError

    def _per_example(self, module, saved, grad_output) -> dict[str, torch.Tensor]:
        """Each example's dgamma and dbeta, ``[B, K]``, in the input's precision (>= float32)."""
        g, xhat, rd = self.layout(module, saved, grad_output, _compute_dtype(saved))
        out = {}
        if _needs(module, "weight"):
            out["weight"] = (g * xhat).sum(rd)
        if _needs(module, "bias"):
            out["bias"] = g.sum(rd)
        return out

    def norms(self, module, saved, grad_output):
        return {k: v.square().sum(1) for k, v in
                self._per_example(module, saved, grad_output).items()}

    def collect(self, module, saved, grad_output, vectors):
        """Norms and probe from one pass: the probe projects the per-example gradients (small
        ``[B, K]`` tensors) in float64; its bound sums their absolute values."""
        per = self._per_example(module, saved, grad_output)
        norms = {k: v.square().sum(1) for k, v in per.items()}
        probes = {}
        for k, (v,) in (vectors or {}).items():
            d = per[k].double()
            probes[k] = torch.cat([d.sum(0) @ v, d.abs().sum(0) @ v.abs()])
        return norms, probes

    def factors(self, module, saved, grad_output):
        """The per-example gradients themselves (``[B, 1, K]`` rows, unit columns): these
        parameters are small, and this serves modules called more than once per forward."""
        g, xhat, rd = self.layout(module, saved, grad_output, _compute_dtype(saved))
        out = {}
        ones = g.new_ones(g.shape[0], 1, 1)
        if _needs(module, "weight"):
            out["weight"] = Factor(cols=ones, rows=(g * xhat).sum(rd)[:, None])
        if _needs(module, "bias"):
            out["bias"] = Factor(cols=ones, rows=g.sum(rd)[:, None])
        return out

    def probe_vectors(self, name, param, gen):
        # Full directions: these parameters are small.
        return (torch.randn(param.numel(), PROBES, generator=gen,
                            dtype=torch.float64).to(param.device),)

    def probe_grad(self, name, grad, vectors):
        return grad.double().reshape(-1) @ vectors[0]

    def probe(self, module, saved, grad_output, vectors):
        g, xhat, rd = self.layout(module, saved, grad_output, torch.float64)
        dims = (0, rd)
        out = {}
        if "weight" in vectors:
            v = vectors["weight"][0]
            prod = g * xhat
            out["weight"] = torch.cat([prod.sum(dims) @ v, prod.abs().sum(dims) @ v.abs()])
        if "bias" in vectors:
            v = vectors["bias"][0]
            out["bias"] = torch.cat([g.sum(dims) @ v, g.abs().sum(dims) @ v.abs()])
        return out


def _last_dims(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, R, K]`` views over the trailing ``normalized_shape`` (dim 0 is the batch; an input
    with no dims before them is one example)."""
    shape = tuple(module.normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"{type(module).__name__}: input shape {tuple(x.shape)} does not end "
                         f"with normalized_shape {shape}")
    K = math.prod(shape)
    B = x.shape[0] if x.dim() > len(shape) else 1
    return x.to(dtype).reshape(B, -1, K), grad.to(dtype).reshape(B, -1, K)


@register_rule(nn.LayerNorm)
class LayerNormRule(_AffineNormRule):
    """LayerNorm over any ``normalized_shape``, with or without bias."""

    batch_dim_movable = True

    def layout(self, module, x, grad, dtype):
        x, g = _last_dims(module, x, grad, dtype)
        var, mean = torch.var_mean(x, dim=2, unbiased=False, keepdim=True)
        return g, (x - mean) * torch.rsqrt(var + module.eps), 1


@register_rule(nn.RMSNorm)
class RMSNormRule(_AffineNormRule):
    """RMSNorm over any ``normalized_shape``."""

    batch_dim_movable = True

    def layout(self, module, x, grad, dtype):
        eps = module.eps
        if eps is None:
            eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
        x, g = _last_dims(module, x, grad, dtype)
        return g, x * torch.rsqrt(x.square().mean(2, keepdim=True) + eps), 1


def _channels(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype,
              unbatched_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, R]`` views of a channels-first input (``unbatched_dim``: the input rank that
    means a single example without its batch dim)."""
    if unbatched_dim is not None and x.dim() == unbatched_dim:
        x, grad = x.unsqueeze(0), grad.unsqueeze(0)
    if x.dim() < 2:
        raise ValueError(f"{type(module).__name__}: expected a [B, C, ...] input, got shape "
                         f"{tuple(x.shape)}")
    B, C = x.shape[:2]
    return x.to(dtype).reshape(B, C, -1), grad.to(dtype).reshape(B, C, -1)


def _standardise(x: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    var, mean = torch.var_mean(x, dim=dim, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _running(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` per channel of ``x`` ``[B, C, R]``."""
    m, v = mean.to(x.dtype)[None, :, None], var.to(x.dtype)[None, :, None]
    return (x - m) * torch.rsqrt(v + eps)


@register_rule(nn.GroupNorm)
class GroupNormRule(_AffineNormRule):
    """GroupNorm: per-channel gamma and beta, statistics over each group and all positions."""

    def layout(self, module, x, grad, dtype):
        x, g = _channels(module, x, grad, dtype)
        B, C, R = x.shape
        xhat = _standardise(x.reshape(B, module.num_groups, -1), 2, module.eps)
        return g, xhat.reshape(B, C, R), 2


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(_AffineNormRule):
    """Affine InstanceNorm: statistics per example and channel, or the running statistics in
    eval mode when ``track_running_stats``."""

    def layout(self, module, x, grad, dtype):
        x, g = _channels(module, x, grad, dtype, module._get_no_batch_dim())
        if module.training or not module.track_running_stats:
            return g, _standardise(x, 2, module.eps), 2
        return g, _running(x, module.running_mean, module.running_var, module.eps), 2


@register_rule(nn.modules.batchnorm._BatchNorm)
class BatchNormRule(_AffineNormRule):
    """BatchNorm in eval mode with running statistics: an affine map per channel, so the
    examples do not interact. Training mode, or eval without running statistics (batch
    statistics again), is refused."""

    def capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        name = type(module).__name__
        if module.training:
            raise ValueError(
                f"{name} in training mode: batch statistics mix the examples, so per-example "
                "gradients are not defined; call .eval() on it, or use GroupNorm/LayerNorm")
        if module.running_mean is None or module.running_var is None:
            raise ValueError(
                f"{name} with track_running_stats=False normalises with batch statistics even "
                "in eval mode, so per-example gradients are not defined")
        return inputs[0].detach()

    def layout(self, module, x, grad, dtype):
        x, g = _channels(module, x, grad, dtype)
        return g, _running(x, module.running_mean, module.running_var, module.eps), 2
