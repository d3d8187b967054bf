"""The fused Linear weight gradient and per-example norms, in Triton.

For ``A [B, T, d_in]`` and ``G [B, T, d_out]`` (the middle dims flattened into T)::

    dW = sum_i G_i^T A_i          weight_norms[i] = |G_i^T A_i|_F^2
    (optionally) sumsq = sum_i (G_i^T A_i)^2, elementwise   [d_out, d_in]

Work is cut into *units*, one (dW tile, example) pair each: a ``[BLOCK_O, BLOCK_I]`` tile of the
example's gradient, ``sum_t g_t a_t^T`` accumulated over T in blocks of ``BLOCK_T`` with
``tl.dot`` (fp32 accumulation). When a unit is complete its tile is added into the program's dW
accumulator, squared and summed in registers, and the sum is atomically added into
``weight_norms[b]`` (float32); nothing per example is written to memory, and A and G are read
once. A per-example tile cannot be split over T before it is squared (the norm of a sum is not
the sum of the parts' norms), so a unit is never split.

Programs are persistent (about one per SM). Whole tiles are dealt out round-robin (program p
takes tiles p, p + P, ...: neighbouring programs share the rows of G or the columns of A, which
stay in L2); the units of the tiles left over are split evenly among the programs in contiguous
ranges (stream-K over examples), so few tiles still fill the GPU. A program that owns every
example of a tile stores it; a tile split between programs is written by each of them as a
float32 partial to a workspace of two tiles per program, and a second kernel adds the partials in
program order: dW and ``sumsq`` are deterministic either way.

``deterministic=True`` also makes the norms so: each unit stores its square to a workspace
``[B, tiles]`` instead of adding atomically, and the tiles are summed in a fixed order.

Inputs are float16, bfloat16 or float32, with fp32 accumulation; half operands go to the tensor
cores as they are. Where A and G differ (autocast saves a Linear's float32 input while its
output gradient is bfloat16), A is rounded to G's half dtype after the load: the operands
autograd's own weight-gradient GEMM uses under autocast, at the tensor cores' rate.
``upcast=True`` casts both to float32 after the load instead (exact products; needed under
Triton's interpreter, whose ``tl.dot`` gets bfloat16 operands wrong). float32 operands use
``input_precision`` (``"ieee"`` by default; ``"tf32"`` is Triton's faster, rounded default).

The bias gradient comes from a small separate kernel: per-example ``sum_t g_t`` ``[B, d_out]``
(it reads G once, as autograd's own ``db = G.sum(0)`` does), from which ``db`` and
``|db_i|^2`` follow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cost
from ._launch import Kernel, helper, tl

__all__ = ["Config", "FusedLinearResult", "fused_linear", "bias_grads", "config_for",
           "flatten", "HALF", "SUPPORTED"]

HALF = (torch.float16, torch.bfloat16)
SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
PRECISIONS = ("ieee", "tf32", "tf32x3")


@helper
def _cast(x, CAST: tl.constexpr):
    """A loaded tile in the dot's operand dtype: as loaded ("none"), "fp32", "bf16", "fp16"."""
    if CAST == "fp32":
        x = x.to(tl.float32)
    elif CAST == "bf16":
        x = x.to(tl.bfloat16)
    elif CAST == "fp16":
        x = x.to(tl.float16)
    return x


def gradstats_fused_linear_kernel(A, G, DW, SQ, WS, WSQ, NW,
                                  B, T, D_IN, D_OUT, N_TILES,
                                  sa_b, sa_t, sa_i, sg_b, sg_t, sg_o,
                                  ROUNDS, TAIL_UNITS, TAIL_PROGRAMS,
                                  BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                                  BLOCK_T: tl.constexpr, CAST: tl.constexpr,
                                  PRECISION: tl.constexpr, WITH_SQ: tl.constexpr,
                                  NORM_ATOMIC: tl.constexpr):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    n_i = (D_IN + BLOCK_I - 1) // BLOCK_I
    n_t = (T + BLOCK_T - 1) // BLOCK_T
    full_tiles = ROUNDS * P
    # this program's range [lo, hi) of the leftover tiles' units (TAIL_PROGRAMS >= 1); the
    # products overflow int32 for very large batches
    in_range = pid < TAIL_PROGRAMS
    p64 = pid.to(tl.int64)
    lo = tl.where(in_range, p64 * TAIL_UNITS // TAIL_PROGRAMS, 0).to(tl.int32)
    hi = tl.where(in_range, (p64 + 1) * TAIL_UNITS // TAIL_PROGRAMS, 0).to(tl.int32)
    k_rr = ROUNDS * B * n_t
    n_iter = k_rr + (hi - lo) * n_t
    first_tail_tile = full_tiles + lo // B

    ar_o = tl.arange(0, BLOCK_O)
    ar_i = tl.arange(0, BLOCK_I)
    ar_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    dw = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    sq = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    for k in range(0, n_iter):
        # which unit (tile, example b) and which T block iteration k is
        tail = k >= k_rr
        u1 = k // n_t
        j = u1 // B
        u2 = lo + (k - k_rr) // n_t
        tile = tl.where(tail, full_tiles + u2 // B, j * P + pid)
        b = tl.where(tail, u2 - (u2 // B) * B, u1 - j * B)
        tc = k - (k // n_t) * n_t
        po = tile // n_i
        pi = tile - po * n_i
        offs_o = po * BLOCK_O + ar_o
        offs_i = pi * BLOCK_I + ar_i
        tt = tc * BLOCK_T + ar_t
        mo = offs_o < D_OUT
        mi = offs_i < D_IN
        mt = tt < T
        bb = b.to(tl.int64)
        g = tl.load(G + bb * sg_b + offs_o[:, None] * sg_o + tt[None, :] * sg_t,
                    mask=mo[:, None] & mt[None, :], other=0.0)
        a = tl.load(A + bb * sa_b + tt[:, None] * sa_t + offs_i[None, :] * sa_i,
                    mask=mt[:, None] & mi[None, :], other=0.0)
        g, a = _cast(g, CAST), _cast(a, CAST)
        acc = tl.dot(g, a, acc, input_precision=PRECISION)
        if tc == n_t - 1:  # the unit is complete: its tile is example b's gradient
            dw += acc
            if WITH_SQ:
                sq += acc * acc
            part = tl.sum(acc * acc)
            if NORM_ATOMIC:
                tl.atomic_add(NW + b, part, sem="relaxed")
            else:
                tl.store(NW + bb * N_TILES + tile, part)
            acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
            seg_end = (b == B - 1) | (tail & (u2 == hi - 1))
            if seg_end:  # the last of this program's examples of the tile
                r0 = (tile - full_tiles) * B
                whole = (~tail) | ((r0 >= lo) & (r0 + B <= hi))
                if whole:
                    out = offs_o[:, None] * D_IN + offs_i[None, :]
                    m2 = mo[:, None] & mi[None, :]
                    tl.store(DW + out, dw.to(DW.dtype.element_ty), mask=m2)
                    if WITH_SQ:
                        tl.store(SQ + out, sq, mask=m2)
                else:
                    slot = tl.where(tile == first_tail_tile, 0, 1)
                    ws = (pid * 2 + slot) * (BLOCK_O * BLOCK_I) + ar_o[:, None] * BLOCK_I \
                        + ar_i[None, :]
                    tl.store(WS + ws, dw)
                    if WITH_SQ:
                        tl.store(WSQ + ws, sq)
                dw = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
                sq = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)


def gradstats_fixup_kernel(DW, SQ, WS, WSQ, B, D_IN, D_OUT, FULL_TILES, TAIL_UNITS,
                           TAIL_PROGRAMS, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                           WITH_SQ: tl.constexpr):
    # leftover tile r: the programs holding its units [r B, r B + B) are p(u) = the p with
    # lo(p) <= u < lo(p + 1), lo(p) = p U // Q, i.e. p(u) = ceil((u + 1) Q / U) - 1
    r = tl.program_id(0)
    Q = TAIL_PROGRAMS
    u0 = r.to(tl.int64) * B  # int64: the products overflow int32 for very large batches
    p_first = (((u0 + 1) * Q + TAIL_UNITS - 1) // TAIL_UNITS - 1).to(tl.int32)
    p_last = (((u0 + B) * Q + TAIL_UNITS - 1) // TAIL_UNITS - 1).to(tl.int32)
    if p_first < p_last:  # split between programs (else its one program stored it)
        tile = FULL_TILES + r
        n_i = (D_IN + BLOCK_I - 1) // BLOCK_I
        po = tile // n_i
        pi = tile - po * n_i
        ar_o = tl.arange(0, BLOCK_O)
        ar_i = tl.arange(0, BLOCK_I)
        ws = ar_o[:, None] * BLOCK_I + ar_i[None, :]
        dw = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
        sq = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
        for p in range(p_first, p_last + 1):
            slot = tl.where((tl.cast(p, tl.int64) * TAIL_UNITS // Q) // B == r, 0, 1)
            base = (p * 2 + slot) * (BLOCK_O * BLOCK_I)
            dw += tl.load(WS + base + ws)
            if WITH_SQ:
                sq += tl.load(WSQ + base + ws)
        offs_o = po * BLOCK_O + ar_o
        offs_i = pi * BLOCK_I + ar_i
        out = offs_o[:, None] * D_IN + offs_i[None, :]
        m2 = (offs_o < D_OUT)[:, None] & (offs_i < D_IN)[None, :]
        tl.store(DW + out, dw.to(DW.dtype.element_ty), mask=m2)
        if WITH_SQ:
            tl.store(SQ + out, sq, mask=m2)


def gradstats_bias_kernel(G, GB, T, D_OUT, sg_b, sg_t, sg_o,
                          BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mo = offs_o < D_OUT
    ar_t = tl.arange(0, BLOCK_T)
    s = tl.zeros([BLOCK_O], dtype=tl.float32)
    base = G + b.to(tl.int64) * sg_b
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + ar_t
        g = tl.load(base + tt[:, None] * sg_t + offs_o[None, :] * sg_o,
                    mask=(tt < T)[:, None] & mo[None, :], other=0.0)
        s += tl.sum(g.to(tl.float32), axis=0)
    tl.store(GB + b.to(tl.int64) * D_OUT + offs_o, s, mask=mo)


_FUSED = _FIXUP = _BIAS = None


def _kernels() -> tuple[Kernel, Kernel, Kernel]:
    global _FUSED, _FIXUP, _BIAS
    if _FUSED is None:
        _FUSED = Kernel(gradstats_fused_linear_kernel)
        _FIXUP, _BIAS = Kernel(gradstats_fixup_kernel), Kernel(gradstats_bias_kernel)
    return _FUSED, _FIXUP, _BIAS


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch shape of the fused kernel."""

    block_o: int
    block_i: int
    block_t: int
    num_warps: int = 8
    num_stages: int = 3
    programs_per_sm: int = 1


def _pow2(n: int, lo: int = 16, hi: int = 128) -> int:
    return max(lo, min(hi, 1 << max(0, n - 1).bit_length()))


def config_for(device: torch.device, dtype: torch.dtype, d_in: int, d_out: int,
               sumsq: bool = False, precision: str = "ieee", B: int = 1, T: int = 1) -> Config:
    """Fixed tiles per operand kind (no autotuning): for half operands on the tensor cores the
    tile of :data:`cost.TILES` that the cost model predicts fastest for this shape (at most
    128 x 64 with ``sumsq``, a third accumulator), T blocks of 64; smaller for float32; under
    the interpreter, tiles up to 64 wide (fewer, larger numpy steps)."""
    if device.type == "cpu":
        return Config(_pow2(d_out, hi=64), _pow2(d_in, hi=64), 16, 1, 1)
    if dtype in HALF:
        bo, bi = cost.best_tile(B, T, d_in, d_out, 2)
        c = Config(bo, min(bi, 64) if sumsq else bi, 64, 8 if bo * bi >= 128 * 128 else 4, 3)
    elif precision.startswith("tf32"):
        c = Config(128, 64 if sumsq else 128, 32, 8, 3)
    else:
        c = Config(64, 64, 32, 4, 2)
    return Config(min(c.block_o, _pow2(d_out)), min(c.block_i, _pow2(d_in)), c.block_t,
                  c.num_warps, c.num_stages, c.programs_per_sm)


@dataclass
class FusedLinearResult:
    """``dW`` ``[d_out, d_in]`` (the output dtype), ``db`` ``[d_out]``, ``weight_norms`` and
    ``bias_norms`` ``[B]`` float32; ``sumsq`` ``[d_out, d_in]`` and ``bias_sumsq`` ``[d_out]``
    float32 (``sum_i (.)_i^2`` elementwise) when asked for; ``per_example_bias`` ``[B, d_out]``
    float32."""

    dW: torch.Tensor
    db: torch.Tensor | None
    weight_norms: torch.Tensor
    bias_norms: torch.Tensor | None
    sumsq: torch.Tensor | None = None
    bias_sumsq: torch.Tensor | None = None
    per_example_bias: torch.Tensor | None = None


def flatten(A: torch.Tensor, G: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [B, ..., d_in]``, ``G [B, ..., d_out]`` checked and viewed as ``[B, T, d]`` (a copy
    only where the middle dims cannot be merged); every message names the argument."""
    for name, x in (("A", A), ("G", G)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"{op}: {name} must have at least 2 dims [B, ..., d], got shape "
                             f"{tuple(x.shape)}")
        if x.dtype not in SUPPORTED:
            raise ValueError(f"{op}: {name} must be float16, bfloat16 or float32, got {x.dtype} "
                             "(float64 goes through gradstats.ops)")
        if x.device.type not in ("cuda", "cpu"):
            raise ValueError(f"{op}: {name} must be a CUDA tensor (or a CPU tensor for Triton's "
                             f"interpreter), got {x.device}")
    if A.dim() != G.dim() or A.shape[:-1] != G.shape[:-1]:
        raise ValueError(f"{op}: A and G must agree in every dim but the last, got A "
                         f"{tuple(A.shape)} and G {tuple(G.shape)}")
    if A.device != G.device:
        raise ValueError(f"{op}: A and G must be on the same device, got {A.device} and "
                         f"{G.device}")
    if A.requires_grad or G.requires_grad:
        raise ValueError(f"{op}: A and G must not require grad (pass A.detach(), G.detach())")
    B, T = A.shape[0], A.shape[1:-1].numel()
    return A.reshape(B, T, A.shape[-1]), G.reshape(B, T, G.shape[-1])


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def cast_mode(A: torch.Tensor, G: torch.Tensor, upcast: bool | None) -> str:
    """The kernels' ``CAST``: the dtype the loaded tiles take before ``tl.dot``. ``upcast``
    True: float32. Else equal dtypes stay as they are, and mixed ones meet in the half dtype
    (autocast's float32 input with its bfloat16 gradient). ``None`` (default) upcasts bfloat16
    under the interpreter (CPU tensors), whose bfloat16 ``tl.dot`` is wrong."""
    halves = [t.dtype for t in (A, G) if t.dtype in HALF]
    if upcast is None:
        upcast = A.device.type == "cpu" and torch.bfloat16 in halves
    if upcast:
        return "fp32"
    if A.dtype == G.dtype:
        return "none"
    if len(halves) == 2:
        raise ValueError(f"A ({A.dtype}) and G ({G.dtype}) are different half dtypes: pass "
                         "upcast=True")
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[halves[0]]


def programs_for(device: torch.device, units: int, cfg: Config) -> int:
    """Persistent programs: one per SM (times ``programs_per_sm``) on a GPU, 3 under the
    interpreter (enough to exercise both phases), never more than there are units."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(units, sms * cfg.programs_per_sm))
    return max(1, min(units, 3))


def bias_grads(G3: torch.Tensor) -> torch.Tensor:
    """Per-example bias gradients ``sum_t g_t`` ``[B, d_out]`` float32 of ``G3 [B, T, d_out]``."""
    B, T, d_out = G3.shape
    gb = torch.empty(B, d_out, dtype=torch.float32, device=G3.device)
    if B == 0:
        return gb
    if T == 0:
        return gb.zero_()
    bo = _pow2(d_out, hi=64 if G3.is_cpu else 128)
    bt = 16 if G3.is_cpu else 32
    _kernels()[2][(B, (d_out + bo - 1) // bo)](G3, gb, T, d_out, *G3.stride(), BLOCK_O=bo,
                                               BLOCK_T=bt, num_warps=4)
    return gb


def fused_linear(A: torch.Tensor, G: torch.Tensor, *, bias: bool = True, sumsq: bool = False,
                 deterministic: bool = False, precision: str = "ieee",
                 upcast: bool | None = None, out_dtype: torch.dtype | None = None,
                 programs: int | None = None, config: Config | None = None
                 ) -> FusedLinearResult:
    """dW, db and the per-example squared norms (and optionally ``sumsq``) in one pass over A
    and G; see the module docstring. ``programs`` and ``config`` override the launch shape."""
    A3, G3 = flatten(A, G, "fused_linear")
    _check_precision(precision)
    B, T, d_in = A3.shape
    d_out = G3.shape[-1]
    dev = A3.device
    out_dtype = out_dtype or torch.promote_types(A.dtype, G.dtype)
    cast = cast_mode(A3, G3, upcast)
    f32 = dict(dtype=torch.float32, device=dev)
    dot_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        cast, A3.dtype)
    cfg = config or config_for(dev, dot_dtype, d_in, d_out, sumsq, precision, B, T)
    n_tiles = ((d_out + cfg.block_o - 1) // cfg.block_o) * ((d_in + cfg.block_i - 1) // cfg.block_i)
    dW = torch.empty(d_out, d_in, dtype=out_dtype, device=dev)
    SQ = torch.empty(d_out, d_in, **f32) if sumsq else None
    NW = torch.zeros(B if not deterministic else (B, n_tiles), **f32)
    if B == 0 or T == 0:
        dW.zero_()
        if SQ is not None:
            SQ.zero_()
    else:
        P = programs or programs_for(dev, n_tiles * B, cfg)
        P = max(1, min(P, n_tiles * B))
        rounds = n_tiles // P
        tail_units = (n_tiles - rounds * P) * B
        Q = max(1, min(P, tail_units))
        tile = cfg.block_o * cfg.block_i
        WS = torch.empty(Q * 2 * tile if tail_units else 1, **f32)
        WSQ = torch.empty(Q * 2 * tile if (tail_units and sumsq) else 1, **f32)
        fused_k, fixup_k, _ = _kernels()
        fused_k[(P,)](A3, G3, dW, SQ if sumsq else WS, WS, WSQ, NW, B, T, d_in, d_out, n_tiles,
                      *A3.stride(), *G3.stride(), rounds, tail_units, Q,
                      BLOCK_O=cfg.block_o, BLOCK_I=cfg.block_i, BLOCK_T=cfg.block_t,
                      CAST=cast, PRECISION=precision, WITH_SQ=sumsq,
                      NORM_ATOMIC=not deterministic, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)
        if tail_units:
            fixup_k[(n_tiles - rounds * P,)](dW, SQ if sumsq else WS, WS, WSQ, B, d_in, d_out,
                                             rounds * P, tail_units, Q, BLOCK_O=cfg.block_o,
                                             BLOCK_I=cfg.block_i, WITH_SQ=sumsq, num_warps=4)
    weight_norms = NW if not deterministic else NW.sum(1)
    res = FusedLinearResult(dW, None, weight_norms, None, SQ)
    if bias:
        gb = bias_grads(G3)
        res.per_example_bias = gb
        res.db = gb.sum(0).to(out_dtype)
        res.bias_norms = gb.square().sum(1)
        if sumsq:
            res.bias_sumsq = gb.square().sum(0)
    return res
