"""Normalisation layers with an elementwise affine: LayerNorm, RMSNorm, GroupNorm, affine
InstanceNorm1d/2d/3d and BatchNorm in eval mode.

Each computes ``y = xhat * gamma (+ beta)`` with ``xhat`` the normalised input and ``gamma``,
``beta`` indexed by ``k`` (the normalized_shape elements, or the channels). Arranging the
example's positions so that ``r`` runs over everything ``gamma`` is shared across,

    dgamma_i[k] = sum_r g_irk xhat_irk          dbeta_i[k] = sum_r g_irk

and the per-example squared norms are ``|dgamma_i|^2`` and ``|dbeta_i|^2``. ``xhat`` is
recomputed from the saved input in the backward hook (float32, float64 for float64 inputs; the
sums over r in the same precision) with the module's eps:

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

from .base import Factor, Rule, Sink, compute_dtype, directions, needs
from .registry import register_rule


class _AffineNormRule(Rule):
    """Shared maths. Subclasses implement :meth:`layout`: the gradient, ``xhat`` and the
    offset ``|mean| rstd`` (what the native backward's rounding scales with besides ``|xhat|``)
    as ``[B, R, K]`` (``reduce_dim=1``) or ``[B, K, R]`` (``reduce_dim=2``); the offset
    broadcasts against them."""

    traceable = True

    def layout(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float, int]:
        raise NotImplementedError

    def per_example(self, module, x, grad) -> dict[str, torch.Tensor]:
        """Each example's dgamma and dbeta, ``[B, K]`` float64."""
        g, xhat, _, rd = self.layout(module, x, grad, compute_dtype(x))
        # products and sums in the compute precision (float32 at least: torch's cascade sums
        # keep the error near eps log R); a float64 sum of float32 terms cost 3x the whole pass
        out = {}
        if needs(module, "weight"):
            out["weight"] = (g * xhat).sum(rd).to(torch.float64)
        if needs(module, "bias"):
            out["bias"] = g.sum(rd).to(torch.float64)
        return out

    def collect(self, module, saved, grad_output, sink):
        x = saved[0]
        for k, v in self.per_example(module, x, grad_output).items():
            sink.add(k, v.square().sum(1))
        if sink.probing:
            self._probe(module, x, grad_output, sink)

    def _probe(self, module, x, grad, sink: Sink) -> None:
        """``<v, sum_i dgamma_i>`` and ``<v, sum_i dbeta_i>`` in float64, with bounds
        ``<|v|, sum |g| (|xhat| + |mean| rstd)>`` and ``<|v|, sum |g|>``: the scales of the
        rounding of the native backward, which forms ``sum g x`` before subtracting the mean."""
        g, xhat, off, rd = self.layout(module, x, grad, torch.float64)
        dims = (0, rd)
        for name, terms, scale in (("weight", lambda: g * xhat, lambda: g.abs() * (xhat.abs() + off)),
                                   ("bias", lambda: g, lambda: g.abs())):
            vec = sink.vec(name)
            if vec is not None:
                v = vec[0]
                sink.probe(name, torch.cat([terms().sum(dims).reshape(-1) @ v,
                                            scale().sum(dims).reshape(-1) @ v.abs()]))

    def factors(self, module, saved, grad_output):
        """The per-example gradients themselves (``[B, 1, K]`` rows, unit columns): these
        parameters are small, and this serves modules called more than once per forward."""
        out = {}
        for k, v in self.per_example(module, saved[0], grad_output).items():
            out[k] = Factor(cols=v.new_ones(v.shape[0], 1, 1), rows=v[:, None])
        return out

    def probe_vectors(self, name, param, gen):
        return (directions(param.numel(), gen, param.device),)  # full: these are small


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
    R = x.numel() // (B * K) if B * K else 0
    return x.to(dtype).reshape(B, R, K), grad.to(dtype).reshape(B, R, K)


@register_rule(nn.LayerNorm)
class LayerNormRule(_AffineNormRule):
    """LayerNorm over any ``normalized_shape``, with or without bias."""

    batch_dim_movable = True

    def layout(self, module, x, grad, dtype):
        x, g = _last_dims(module, x, grad, dtype)
        var, mean = torch.var_mean(x, dim=2, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + module.eps)
        return g, (x - mean) * rstd, mean.abs() * rstd, 1


@register_rule(nn.RMSNorm)
class RMSNormRule(_AffineNormRule):
    """RMSNorm over any ``normalized_shape``."""

    batch_dim_movable = True

    def layout(self, module, x, grad, dtype):
        eps = module.eps
        if eps is None:
            eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
        x, g = _last_dims(module, x, grad, dtype)
        return g, x * torch.rsqrt(x.square().mean(2, keepdim=True) + eps), 0.0, 1


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


def _standardise(x: torch.Tensor, dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xhat, |mean| rstd)`` over ``dim``."""
    var, mean = torch.var_mean(x, dim=dim, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (x - mean) * rstd, mean.abs() * rstd


def _running(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``((x - mean) / sqrt(var + eps), |mean| rstd)`` per channel of ``x`` ``[B, C, R]``."""
    m, v = mean.to(x.dtype)[None, :, None], var.to(x.dtype)[None, :, None]
    rstd = torch.rsqrt(v + eps)
    return (x - m) * rstd, m.abs() * rstd


@register_rule(nn.GroupNorm)
class GroupNormRule(_AffineNormRule):
    """GroupNorm: per-channel gamma and beta, statistics over each group and all positions."""

    def layout(self, module, x, grad, dtype):
        x, g = _channels(module, x, grad, dtype)
        B, C, R = x.shape
        xhat, off = _standardise(x.reshape(B, module.num_groups, -1), 2, module.eps)
        off = off.expand(B, module.num_groups, C // module.num_groups).reshape(B, C, 1)
        return g, xhat.reshape(B, C, R), off, 2


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(_AffineNormRule):
    """Affine InstanceNorm: statistics per example and channel, or the running statistics in
    eval mode when ``track_running_stats``."""

    def layout(self, module, x, grad, dtype):
        x, g = _channels(module, x, grad, dtype, module._get_no_batch_dim())
        if module.training or not module.track_running_stats:
            return g, *_standardise(x, 2, module.eps), 2
        return g, *_running(x, module.running_mean, module.running_var, module.eps), 2


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
        return (inputs[0].detach(),)

    def layout(self, module, x, grad, dtype):
        x, g = _channels(module, x, grad, dtype)
        return g, *_running(x, module.running_mean, module.running_var, module.eps), 2
