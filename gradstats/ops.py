"""Typed wrappers over ``torch.ops.gradstats.*``, each with its fake (meta) implementation so that
torch.compile and torch.library.opcheck can trace them."""
from __future__ import annotations

from typing import Literal

import torch

from ._loader import load_library

_C = load_library()

Strategy = Literal["auto", "outer", "gram", "direct"]
STRATEGIES: tuple[str, ...] = ("auto", "outer", "gram", "direct")

__all__ = ["linear_norms", "linear_fused", "linear_strategy", "linear_collect",
           "linear_fused_collect", "grad_summary", "step_reduce", "STRATEGIES"]


def linear_norms(
    A: torch.Tensor, G: torch.Tensor, strategy: Strategy = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example squared gradient norms of a Linear layer, without per-example gradients.

    ``A`` is the layer input ``[B, ..., d_in]`` and ``G`` the gradient of its output
    ``[B, ..., d_out]``; the middle dims are flattened into T positions. Returns
    ``(weight, bias)``, each ``[B]``::

        weight[i] = || sum_t g_it a_it^T ||_F^2        bias[i] = || sum_t g_it ||^2

    Strategies: ``"outer"`` (T = 1: |a|^2 |g|^2), ``"gram"`` (A and G centred over positions,
    then sum_ts (a_t.a_s)(g_t.g_s) plus the centring's corrections, ~T^2 (d_in + d_out) per
    example), ``"direct"`` (|G_i^T A_i|_F^2, ~T d_in d_out) and ``"auto"`` (the cheaper by the
    cost model). Outputs are float32, or float64 when an input is. An empty batch gives empty
    outputs.
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


def linear_collect(A: torch.Tensor, G: torch.Tensor, E: torch.Tensor, P: torch.Tensor,
                   rows: torch.Tensor, slot_w: int, slot_b: int, xw: torch.Tensor | None,
                   yw: torch.Tensor | None, vb: torch.Tensor | None,
                   strategy: Strategy = "auto") -> None:
    """:func:`linear_norms` written into the monitor's accumulators: ``E[slot, rows] +=`` the
    weight (``slot_w``) and bias (``slot_b``) norms (slot -1: skipped), and with probe vectors the
    contract probe into ``P[slot]`` (values, then their rounding bounds)."""
    torch.ops.gradstats.linear_collect.default(A, G, E, P, rows, slot_w, slot_b, xw, yw, vb,
                                               strategy)


def linear_fused_collect(A: torch.Tensor, G: torch.Tensor, E: torch.Tensor, P: torch.Tensor,
                         rows: torch.Tensor, slot_w: int, slot_b: int, xw: torch.Tensor | None,
                         yw: torch.Tensor | None, vb: torch.Tensor | None,
                         strategy: Strategy = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_collect` that also returns ``(dW, db)`` from the same pass."""
    return torch.ops.gradstats.linear_fused_collect.default(A, G, E, P, rows, slot_w, slot_b,
                                                            xw, yw, vb, strategy)


def grad_summary(g: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One pass over ``g`` ``[R, C]``: float64 ``[1 + 2K]`` = ``(sum g^2, x_j^T g y_j ...,
    sum_rc (x_rj y_cj g_rc)^2 ...)`` for ``x`` ``[R, K]`` and ``y`` ``[C, K]`` (float64), with no
    copy of ``g``. The last K are the scales of the projections' rounding errors."""
    return torch.ops.gradstats.grad_summary.default(g, x, y)


def step_reduce(E: torch.Tensor, r: torch.Tensor, n: int, coef: float,
                grads: list[torch.Tensor | None]) -> torch.Tensor:
    """The numeric part of ``monitor.step()`` in one op. With ``c_i = coef * r_i`` and
    ``w_i = 1 / c_i^2`` (0 where ``c_i = 0``) over the first ``n`` columns, float64
    ``[2S + 2 + n]``: ``sum_i E[s, i] w_i`` per slot, ``|grads[s]|^2`` per slot (0 for None; all
    0 when ``grads`` is empty), ``sum_i c_i``, ``sum_i c_i^2``, then ``sum_s E[s, i] w_i`` per
    example."""
    return torch.ops.gradstats.step_reduce.default(E, r, n, coef, grads)


def linear_strategy(T: int, d_in: int, d_out: int, fused: bool = False) -> str:
    """The strategy ``"auto"`` picks for a Linear layer with T positions per example: for the
    norms alone (:func:`linear_norms`), or with the weight gradient (``fused``,
    :func:`linear_fused`), where the direct route's per-example tiles are summed into dW."""
    return _C.choose_linear_strategy(T, d_in, d_out, fused)


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


def _grads_fake(A, G):
    gdt = torch.promote_types(A.dtype, G.dtype)
    return (A.new_empty((G.shape[-1], A.shape[-1]), dtype=gdt),
            A.new_empty((G.shape[-1],), dtype=gdt))


@torch.library.register_fake("gradstats::linear_fused")
def _linear_fused_fake(A, G, strategy="auto"):
    w, b = _linear_norms_fake(A, G)
    return (*_grads_fake(A, G), w, b)


@torch.library.register_fake("gradstats::linear_collect")
def _linear_collect_fake(A, G, E, P, rows, slot_w, slot_b, xw, yw, vb, strategy="auto"):
    _check_fake(A, G, "linear_collect")
    return None


@torch.library.register_fake("gradstats::linear_fused_collect")
def _linear_fused_collect_fake(A, G, E, P, rows, slot_w, slot_b, xw, yw, vb, strategy="auto"):
    _check_fake(A, G, "linear_fused_collect")
    return _grads_fake(A, G)


@torch.library.register_fake("gradstats::grad_summary")
def _grad_summary_fake(g, x, y):
    torch._check(g.dim() == 2, lambda: "grad_summary: g must be 2-D")
    return x.new_empty((1 + 2 * x.shape[1],), dtype=torch.float64)


@torch.library.register_fake("gradstats::step_reduce")
def _step_reduce_fake(E, r, n, coef, grads):
    return E.new_empty((2 * E.shape[0] + 2 + n,), dtype=torch.float64)
