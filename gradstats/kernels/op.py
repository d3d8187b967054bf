"""``gradstats::triton_linear_fused_collect``: the monitor's fused Linear op on the Triton kernels.

Same schema and effect as ``gradstats::linear_fused_collect`` (csrc/ops.cpp): returns
``(dW, db)`` in the promoted input dtype and writes into the monitor's accumulators

    E[slot_w, rows[i]] += |dW_i|_F^2        E[slot_b, rows[i]] += |db_i|^2      (slot < 0: skipped)

and, with probe vectors ``xw [d_out, K]``, ``yw [d_in, K]``, ``vb [d_out, K]`` (float64), the
contract probe into ``P[slot] [2K]``: values ``<x_j y_j^T, dW>``, ``<v_j, db>`` in ``[0, K)``
and the bounds on their rounding, ``|x_j||y_j| sum_t |g_t||a_t|`` and ``|v_j| sum_t |g_t|``, in
``[K, 2K)``. The probe runs in plain torch ops after the kernel (float32 for half inputs, as the
CUDA op does), only on the steps that probe.

Differences from the C++/CUDA op, by design: float32 A with a half G (autocast) is multiplied in
G's half dtype (A rounded after the load, as autograd's own dW GEMM does under autocast) where
the CUDA op computes in float32; float32 inputs follow ``torch.get_float32_matmul_precision()``
("highest": IEEE float32, else TF32). float64 inputs are refused (the router sends them to the
C++ op), and so are GPUs older than sm_80, which take the CUDA op inside this one.

A ``torch.library.custom_op`` with a fake implementation: ``torch.compile(fullgraph=True)``
traces it as one opaque node, and ``torch.library.opcheck`` passes. CUDA tensors run the compiled
kernels; CPU tensors run the same kernels under Triton's interpreter (slow: for tests).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import cost
from .fused_linear import HALF, SUPPORTED, bias_grads, flatten, fused_linear
from .gram import gram_norms

__all__ = ["triton_linear_fused_collect", "linear_fused_collect", "use_triton", "resolve_strategy",
           "STRATEGIES"]

OP = "gradstats::triton_linear_fused_collect"
STRATEGIES = ("auto", "outer", "gram", "direct")


def resolve_strategy(strategy: str, B: int, T: int, d_in: int, d_out: int, elem: int,
                     precision: str) -> str:
    """``"auto"`` by the cost model (:func:`gradstats.kernels.cost.choose`); a named strategy
    is checked (``"outer"`` needs T = 1). ``"direct"`` is the fused kernel."""
    if strategy not in STRATEGIES:
        raise ValueError(f"{OP}: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        return cost.choose(B, T, d_in, d_out, elem, precision)
    if strategy == "outer" and T != 1:
        raise ValueError(f"{OP}: strategy 'outer' needs one position per example (T == 1), "
                         f"got T = {T}")
    return strategy


def _check_accumulators(E: torch.Tensor, P: torch.Tensor, rows: torch.Tensor, B: int,
                        slot_w: int, slot_b: int, device: torch.device) -> None:
    if E.dim() != 2 or E.dtype != torch.float64:
        raise ValueError(f"{OP}: E must be a float64 [slots, examples] accumulator, got "
                         f"{E.dtype} {tuple(E.shape)}")
    if P.dim() != 2 or P.dtype != torch.float64 or P.shape[0] != E.shape[0]:
        raise ValueError(f"{OP}: P must be a float64 [slots, 2K] accumulator with E's slots, got "
                         f"{P.dtype} {tuple(P.shape)}")
    if rows.dim() != 1 or rows.shape[0] != B or rows.dtype != torch.int64:
        raise ValueError(f"{OP}: rows must be int64 [B] with B = {B}, got {rows.dtype} "
                         f"{tuple(rows.shape)}")
    if not (E.device == P.device == rows.device == device):
        raise ValueError(f"{OP}: E, P and rows must be on the inputs' device {device}")
    for slot in (slot_w, slot_b):
        if slot >= E.shape[0]:
            raise ValueError(f"{OP}: slot {slot} out of range for E with {E.shape[0]} slots")


def _check_vector(v: torch.Tensor | None, rows: int, K: int, device: torch.device,
                  name: str) -> None:
    if v is None:
        return
    if v.dim() != 2 or tuple(v.shape) != (rows, K):
        raise ValueError(f"{OP}: {name} must be [{rows}, {K}], got shape {tuple(v.shape)}")
    if v.dtype != torch.float64 or v.device != device:
        raise ValueError(f"{OP}: {name} must be float64 on {device}, got {v.dtype} on {v.device}")


def _probe(A2: torch.Tensor, G2: torch.Tensor, P: torch.Tensor, slot_w: int, slot_b: int,
           xw: torch.Tensor | None, yw: torch.Tensor | None, vb: torch.Tensor | None) -> None:
    """The contract probe of one Linear use into P (csrc/accumulate.cpp ``linear_probe``)."""
    K = P.shape[1] // 2
    do_w = slot_w >= 0 and xw is not None and yw is not None
    do_b = slot_b >= 0 and vb is not None
    if not (do_w or do_b) or A2.shape[0] == 0:
        return
    wt = torch.float32 if (A2.dtype in HALF or G2.dtype in HALF) else A2.dtype
    a, g = A2.to(wt), G2.to(wt)
    gn = torch.linalg.vector_norm(g, dim=1).double()  # |g_t|
    if do_w:
        value = ((g @ xw.to(wt)).double() * (a @ yw.to(wt)).double()).sum(0)
        an = torch.linalg.vector_norm(a, dim=1).double()
        bound = ((gn * an).sum() * torch.linalg.vector_norm(xw, dim=0)
                 * torch.linalg.vector_norm(yw, dim=0))
        P[slot_w, :K] += value
        P[slot_w, K:] += bound
    if do_b:
        P[slot_b, :K] += vb.t() @ g.sum(0).double()
        P[slot_b, K:] += gn.sum() * torch.linalg.vector_norm(vb, dim=0)


def _precision() -> str:
    # follow what torch does for float32 matmuls (torch.set_float32_matmul_precision)
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _plain_dW(A3: torch.Tensor, G3: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return G3.reshape(-1, G3.shape[-1]).to(dtype).t() @ A3.reshape(-1, A3.shape[-1]).to(dtype)


@torch.library.custom_op(OP, mutates_args=("E", "P"))
def triton_linear_fused_collect(A: torch.Tensor, G: torch.Tensor, E: torch.Tensor,
                                P: torch.Tensor, rows: torch.Tensor, slot_w: int, slot_b: int,
                                xw: Optional[torch.Tensor], yw: Optional[torch.Tensor],
                                vb: Optional[torch.Tensor], strategy: str = "auto"
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``gradstats.ops.linear_fused_collect`` on the Triton kernels (module docstring)."""
    A3, G3 = flatten(A, G, OP)
    B, T, d_in = A3.shape
    d_out = G3.shape[-1]
    _check_accumulators(E, P, rows, B, slot_w, slot_b, A3.device)
    K = P.shape[1] // 2
    _check_vector(xw, d_out, K, A3.device, "xw")
    _check_vector(yw, d_in, K, A3.device, "yw")
    _check_vector(vb, d_out, K, A3.device, "vb")
    gdt = torch.promote_types(A.dtype, G.dtype)
    prec = _precision()
    st = resolve_strategy(strategy, B, T, d_in, d_out, max(A.element_size(), G.element_size()),
                          prec)
    if B == 0 or T == 0:  # nothing to add
        return A3.new_zeros((d_out, d_in), dtype=gdt), A3.new_zeros((d_out,), dtype=gdt)
    if A3.is_cuda and torch.cuda.get_device_capability(A3.device) < (8, 0):
        # Triton's bfloat16 dot needs sm_80: older GPUs take the CUDA op
        return torch.ops.gradstats.linear_fused_collect.default(A, G, E, P, rows, slot_w, slot_b,
                                                                xw, yw, vb, strategy)
    if st == "direct":
        r = fused_linear(A3, G3, bias=True, precision=prec)
        dW, gb, nw = r.dW, r.per_example_bias, r.weight_norms
    else:
        if st == "gram":
            nw = gram_norms(A3, G3, precision=prec)
        else:  # outer, T == 1: |a|^2 |g|^2
            nw = (A3.float().square().sum((1, 2)) * G3.float().square().sum((1, 2)))
        dW, gb = _plain_dW(A3, G3, gdt), bias_grads(G3)
    if slot_w >= 0:
        E[slot_w].index_add_(0, rows, nw.double())
    if slot_b >= 0:
        E[slot_b].index_add_(0, rows, gb.double().square().sum(1))
    _probe(A3.reshape(B * T, d_in), G3.reshape(B * T, d_out), P, slot_w, slot_b, xw, yw, vb)
    return dW.to(gdt), gb.sum(0).to(gdt)


@triton_linear_fused_collect.register_fake
def _fake(A, G, E, P, rows, slot_w, slot_b, xw, yw, vb, strategy="auto"):
    torch._check(A.dim() >= 2, lambda: f"{OP}: A must have at least 2 dims, got {A.dim()}")
    torch._check(A.dim() == G.dim(), lambda: f"{OP}: A and G must have the same number of dims")
    torch._check(A.shape[0] == G.shape[0], lambda: f"{OP}: A and G must have the same batch size")
    gdt = torch.promote_types(A.dtype, G.dtype)
    return (A.new_empty((G.shape[-1], A.shape[-1]), dtype=gdt),
            A.new_empty((G.shape[-1],), dtype=gdt))


def use_triton(A: torch.Tensor, G: torch.Tensor) -> bool:
    """Whether :func:`linear_fused_collect` sends these inputs to the Triton op: CUDA tensors
    of float16, bfloat16 or float32 (float64 and CPU tensors go to ``gradstats.ops``), triton
    importable, and ``GRADSTATS_TRITON`` not set to ``0``."""
    from . import enabled

    return (enabled() and A.is_cuda and G.is_cuda and A.dtype in SUPPORTED
            and G.dtype in SUPPORTED)


def linear_fused_collect(A: torch.Tensor, G: torch.Tensor, E: torch.Tensor, P: torch.Tensor,
                         rows: torch.Tensor, slot_w: int, slot_b: int,
                         xw: torch.Tensor | None, yw: torch.Tensor | None,
                         vb: torch.Tensor | None, strategy: str = "auto"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``gradstats.ops.linear_fused_collect``: the Triton op where
    :func:`use_triton` says so, the C++/CUDA op otherwise. Traceable by torch.compile."""
    if use_triton(A, G):
        return torch.ops.gradstats.triton_linear_fused_collect(A, G, E, P, rows, slot_w, slot_b,
                                                               xw, yw, vb, strategy)
    from .. import ops

    return ops.linear_fused_collect(A, G, E, P, rows, slot_w, slot_b, xw, yw, vb, strategy)
