"""Per-example Linear weight-gradient norms by the Gram identity, in Triton, for short T:

    |G_i^T A_i|_F^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)

One program per (example, pair of T blocks ``t <= s``) forms the two ``[BLOCK_T, BLOCK_T]``
blocks of ``A_i A_i^T`` and ``G_i G_i^T`` in registers (``tl.dot`` over d in blocks of
``BLOCK_D``), multiplies them elementwise and sums: the T x T Gram matrices never exist in
memory. Off-diagonal block pairs count twice (the Gram matrices are symmetric). The sum is added
atomically into ``norms[b]`` (float32), or with ``deterministic=True`` stored per block pair and
summed in a fixed order. Cost ``~B T^2 (d_in + d_out)`` multiply-adds, against the weight
gradient's ``B T d_in d_out``: the cheaper route when ``T`` is small against
``d_in d_out / (d_in + d_out)`` (:mod:`gradstats.kernels.cost` decides).

The rounding scales with ``sum_{t,s} |a_t.a_s| |g_t.g_s|``, not with the norm: where the terms
cancel (inputs with a large common component over positions) the relative error of the norm
grows accordingly; the fused route has no such cancellation.
"""
from __future__ import annotations

import torch

from ._launch import Kernel, helper, tl
from .fused_linear import _cast, _check_precision, _pow2, cast_mode, flatten

__all__ = ["gram_norms"]


@helper
def _gram_block(X, ri, rj, mi, mj, D, s_t, s_d,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, CAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """``X[ri] X[rj]^T`` ``[BLOCK_T, BLOCK_T]`` float32 for one example's rows ``X`` (``D``
    columns; strides ``s_t`` between rows, ``s_d`` between columns), over d in BLOCK_D steps."""
    ar_d = tl.arange(0, BLOCK_D)
    k = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + ar_d
        md = dd < D
        x = tl.load(X + ri[:, None] * s_t + dd[None, :] * s_d, mask=mi[:, None] & md[None, :],
                    other=0.0)
        y = tl.load(X + dd[:, None] * s_d + rj[None, :] * s_t, mask=md[:, None] & mj[None, :],
                    other=0.0)
        k = tl.dot(_cast(x, CAST), _cast(y, CAST), k, input_precision=PRECISION)
    return k


def gradstats_gram_kernel(A, G, NW, T, D_IN, D_OUT, N_T,
                          sa_b, sa_t, sa_i, sg_b, sg_t, sg_o,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, CAST: tl.constexpr,
                          PRECISION: tl.constexpr, NORM_ATOMIC: tl.constexpr):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if tj >= ti:
        ar_t = tl.arange(0, BLOCK_T)
        ri = ti * BLOCK_T + ar_t
        rj = tj * BLOCK_T + ar_t
        mi = ri < T
        mj = rj < T
        ka = _gram_block(A + b * sa_b, ri, rj, mi, mj, D_IN, sa_t, sa_i, BLOCK_T, BLOCK_D,
                         CAST, PRECISION)
        kg = _gram_block(G + b * sg_b, ri, rj, mi, mj, D_OUT, sg_t, sg_o, BLOCK_T, BLOCK_D,
                         CAST, PRECISION)
        part = tl.sum(ka * kg) * tl.where(tj > ti, 2.0, 1.0)
        if NORM_ATOMIC:
            tl.atomic_add(NW + b, part, sem="relaxed")
        else:
            tl.store(NW + (b * N_T + ti) * N_T + tj, part)


_GRAM = None


def gram_norms(A: torch.Tensor, G: torch.Tensor, *, deterministic: bool = False,
               precision: str = "ieee", upcast: bool | None = None,
               block_t: int | None = None, block_d: int | None = None) -> torch.Tensor:
    """``[B]`` float32 per-example ``|G_i^T A_i|_F^2`` by the Gram identity (module docstring)."""
    global _GRAM
    A3, G3 = flatten(A, G, "gram_norms")
    _check_precision(precision)
    B, T, d_in = A3.shape
    d_out = G3.shape[-1]
    cast = cast_mode(A3, G3, upcast)
    bt = block_t or _pow2(T, hi=32 if A3.is_cpu else 64)
    bd = block_d or (64 if A3.is_cpu or A3.dtype in (torch.float16, torch.bfloat16) else 32)
    n_t = (T + bt - 1) // bt
    f32 = dict(dtype=torch.float32, device=A3.device)
    NW = torch.zeros(B if not deterministic else (B, n_t * n_t), **f32)
    if B and T:
        if _GRAM is None:
            _GRAM = Kernel(gradstats_gram_kernel)
        _GRAM[(n_t, n_t, B)](A3, G3, NW, T, d_in, d_out, n_t, *A3.stride(), *G3.stride(),
                             BLOCK_T=bt, BLOCK_D=bd, CAST=cast, PRECISION=precision,
                             NORM_ATOMIC=not deterministic, num_warps=4, num_stages=2)
    return NW if not deterministic else NW.sum(1)
