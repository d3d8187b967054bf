"""Typed wrappers over torch.ops.gradstats.*, each with its fake (meta) implementation so that
torch.compile and torch.library.opcheck can trace them."""
from __future__ import annotations

from typing import Literal

import torch

Strategy = Literal["auto", "outer", "gram", "direct"]

__all__ = ["linear_norms", "linear_fused", "linear_strategy", "grad_summary"]


def linear_norms(
    A: torch.Tensor, G: torch.Tensor, strategy: Strategy = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example squared gradient norms of a Linear layer, without per-example gradients.

    ``A`` is the layer input ``[B, ..., d_in]`` and ``G`` the gradient of its output
    ``[B, ..., d_out]``; the middle dims are flattened into T positions. Returns
    ``(weight, bias)``, each ``[B]``::

        weight[i] = || sum_t g_it a_it^T ||_F^2        bias[i] = || sum_t g_it ||^2

    Strategies: ``"outer"`` (T = 1: |a|^2 |g|^2), ``"gram"`` (sum_ts (a_t.a_s)(g_t.g_s),
    ~T^2 (d_in + d_out) per example), ``"direct"`` (|G_i^T A_i|_F^2, ~T d_in d_out) and
    ``"auto"`` (the cheaper by the cost model). Outputs are float32, or float64 when an input is.
    """
    return torch.ops.gradstats.linear_norms.default(A, G, strategy)


def linear_fused(
    A: torch.Tensor, G: torch.Tensor, strategy: Strategy = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear weight and bias gradients together with the per-example norms.

    Returns ``(dW, db, weight_norms, bias_norms)`` with ``dW = sum_i G_i^T A_i`` ``[d_out, d_in]``
    and ``db = sum_it g_it`` ``[d_out]`` in the promoted input dtype; the norms as in
    :func:`linear_norms`. With ``"direct"`` each example's tile is squared while it is added
    into dW, so the norms cost little beyond the weight gradient itself.
    """
    return torch.ops.gradstats.linear_fused.default(A, G, strategy)


def grad_summary(g: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One pass over ``g`` ``[R, C]``: float64 ``[1 + K]`` = ``(sum g^2, x_j^T g y_j ...)`` for
    ``x`` ``[R, K]`` and ``y`` ``[C, K]`` (float64), with no copy of ``g``."""
    return torch.ops.gradstats.grad_summary.default(g, x, y)


def linear_strategy(T: int, d_in: int, d_out: int, cuda: bool = False) -> str:
    """The strategy ``"auto"`` picks for a Linear layer with T positions per example."""
    from . import _C

    return _C.choose_linear_strategy(T, d_in, d_out, cuda)


def _norm_dtype(A: torch.Tensor, G: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (A.dtype, G.dtype) else torch.float32


def _check_fake(A: torch.Tensor, G: torch.Tensor, op: str) -> None:
    torch._check(A.dim() >= 2, lambda: f"{op}: A must have at least 2 dims, got {A.dim()}")
    torch._check(A.dim() == G.dim(), lambda: f"{op}: A and G must have the same number of dims")
    torch._check(A.shape[0] == G.shape[0], lambda: f"{op}: A and G must have the same batch size")


@torch.library.register_fake("gradstats::linear_norms")
def _linear_norms_fake(A, G, strategy="auto"):
    _check_fake(A, G, "linear_norms")
    dt = _norm_dtype(A, G)
    return A.new_empty((A.shape[0],), dtype=dt), A.new_empty((A.shape[0],), dtype=dt)


@torch.library.register_fake("gradstats::linear_fused")
def _linear_fused_fake(A, G, strategy="auto"):
    _check_fake(A, G, "linear_fused")
    dt = _norm_dtype(A, G)
    gdt = torch.promote_types(A.dtype, G.dtype)
    B, d_in, d_out = A.shape[0], A.shape[-1], G.shape[-1]
    return (
        A.new_empty((d_out, d_in), dtype=gdt),
        A.new_empty((d_out,), dtype=gdt),
        A.new_empty((B,), dtype=dt),
        A.new_empty((B,), dtype=dt),
    )


@torch.library.register_fake("gradstats::grad_summary")
def _grad_summary_fake(g, x, y):
    torch._check(g.dim() == 2, lambda: "grad_summary: g must be 2-D")
    return x.new_empty((1 + x.shape[1],), dtype=torch.float64)
