"""Roofline cost model of the Linear weight-gradient routes, and the choice ``"auto"`` makes.

For one Linear use with ``B`` examples of ``T`` positions, input width ``d_in`` and output width
``d_out``, each route is counted in floating-point operations and in the fewest bytes it must
move through device memory; its time is the larger of ``flops / rate`` and ``bytes / bandwidth``
(a floor: no implementation of that route runs much faster).

- ``gemm``: the plain weight gradient ``dW = G^T A``, ``2 B T d_in d_out`` flops, reading A and
  G once and writing dW.
- ``fused`` (the Triton kernel, :mod:`gradstats.kernels.fused_linear`): the same GEMM split at
  example boundaries. Each (example, dW tile) unit ends in an epilogue (add into dW, square,
  reduce, one atomic) that costs about ``EPILOGUE_ITERS`` iterations of the T loop; persistent
  programs (one per SM) share the units, so the busiest holds ``ceil(units / programs)`` of
  them (:func:`schedule`); tiles split between programs cost a float32 partial written and read
  back; smaller tiles run the tensor cores less efficiently (``TILES``). Its time is the GEMM's
  floor times ``(1 + EPILOGUE_ITERS / ceil(T / block_t)) * imbalance / efficiency``, plus the
  partials' traffic.
- ``gram`` (the Triton Gram kernel, :mod:`gradstats.kernels.gram`): the GEMM for dW, plus
  ``sum_{t,s} (a_t.a_s)(g_t.g_s)`` over the upper triangle of tile pairs,
  ``~B T^2 (d_in + d_out)`` flops, reading A and G once more; no T x T matrix in memory.
- ``outer`` (T = 1): the GEMM plus ``|a|^2 |g|^2``, one more read of A and G.

``EPILOGUE_ITERS`` and the tile efficiencies are estimates (instruction counts against one
128x128x64 tile product), to be calibrated by ``benchmarks/bench_triton.py`` on a GPU; the
baseline GEMM is taken at its floor (cuBLAS has its own wave quantization on small layers, so
the predicted fused/GEMM ratios there are pessimistic).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

__all__ = ["DeviceModel", "H200", "Cost", "Route", "Schedule", "TILES", "EPILOGUE_ITERS",
           "schedule", "best_tile", "gemm", "fused", "gram", "outer", "routes", "choose"]

#: iterations of the fused kernel's T loop that one per-example epilogue costs (estimate)
EPILOGUE_ITERS = 0.5


@dataclass(frozen=True)
class DeviceModel:
    """Ceilings of one GPU: FLOP/s by operand kind, copy bandwidth (read + write), SMs."""

    name: str
    half_flops: float  # dense bf16/fp16 tensor-core rate
    tf32_flops: float
    fp32_flops: float  # plain float32 FMA rate (Triton's input_precision="ieee")
    bandwidth: float
    sms: int

    def rate(self, dtype_bytes: int, precision: str = "ieee") -> float:
        if dtype_bytes <= 2:
            return self.half_flops
        return self.tf32_flops if precision.startswith("tf32") else self.fp32_flops


#: the lent H200: 790 TFLOP/s dense bf16 and 4.3 TB/s copy as measured there (device README);
#: tf32 at half the bf16 rate and float32 FMA at 60 TFLOP/s are datasheet leads
H200 = DeviceModel("H200 (790 TFLOP/s bf16, 4.3 TB/s copy, measured)", 790e12, 395e12, 60e12,
                   4.3e12, 132)


@dataclass(frozen=True)
class Cost:
    """Flops and bytes of one route; :meth:`time` its floor on a device."""

    flops: float
    bytes: float
    slowdown: float = 1.0  # multiplies the floor (the fused kernel's epilogues, balance)
    tile: tuple[int, int] | None = None  # the fused kernel's (block_o, block_i)

    def time(self, device: DeviceModel, dtype_bytes: int, precision: str = "ieee") -> float:
        floor = max(self.flops / device.rate(dtype_bytes, precision),
                    self.bytes / device.bandwidth)
        return floor * self.slowdown

    def __add__(self, other: Cost | Route) -> Route:
        return Route((self,)) + other


@dataclass(frozen=True)
class Route:
    """Kernels run one after the other: flops and bytes add, and so do their times."""

    parts: tuple[Cost, ...]

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.parts)

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.parts)

    def time(self, device: DeviceModel, dtype_bytes: int, precision: str = "ieee") -> float:
        return sum(p.time(device, dtype_bytes, precision) for p in self.parts)

    def __add__(self, other: Cost | Route) -> Route:
        return Route(self.parts + (other.parts if isinstance(other, Route) else (other,)))


def _io_bytes(B: int, T: int, d_in: int, d_out: int, e: int) -> float:
    return float(e) * B * T * (d_in + d_out)


def gemm(B: int, T: int, d_in: int, d_out: int, e: int = 2) -> Cost:
    """The plain ``dW = G^T A`` (``e`` bytes per input element; dW written in that dtype)."""
    return Cost(2.0 * B * T * d_in * d_out, _io_bytes(B, T, d_in, d_out, e) + e * d_in * d_out)


#: (block_o, block_i, tensor-core efficiency relative to 128 x 128) tried for half operands
TILES = ((128, 128, 1.0), (128, 64, 0.9), (64, 64, 0.7))


@dataclass(frozen=True)
class Schedule:
    """How the fused kernel deals ``units = tiles x B`` to ``programs``: ``rounds`` whole tiles
    each, round-robin, then the ``tail_units`` of the other tiles in even contiguous ranges over
    ``tail_programs``; ``max_units`` is the busiest program's share and ``partials`` the number
    of float32 partial tiles written for tiles split between programs."""

    programs: int
    units: int
    rounds: int
    tail_units: int
    tail_programs: int
    max_units: int
    partials: int

    @property
    def imbalance(self) -> float:
        """The busiest program's units over the mean (1: perfectly balanced)."""
        return self.max_units * self.programs / self.units if self.units else 1.0


@functools.lru_cache(maxsize=4096)
def schedule(n_tiles: int, B: int, programs: int) -> Schedule:
    """The fused kernel's split of work (the same arithmetic as its launch)."""
    units = n_tiles * B
    P = max(1, min(programs, units))
    rounds = n_tiles // P
    tail = (n_tiles - rounds * P) * B
    Q = max(1, min(P, tail))
    max_units = rounds * B + (-(-tail // Q) if tail else 0)
    partials = 0
    for p in range(Q if tail else 0):
        lo, hi = p * tail // Q, (p + 1) * tail // Q
        first, last = lo // B, (hi - 1) // B
        partials += int(lo % B != 0 or (first + 1) * B > hi)  # its first tile, not whole
        partials += int(last != first and hi % B != 0)  # its last tile, not whole
    return Schedule(P, units, rounds, tail, Q, max_units, partials)


def fused(B: int, T: int, d_in: int, d_out: int, e: int = 2, block_t: int | None = None,
          tile: tuple[int, int, float] | None = None, device: DeviceModel | None = None) -> Cost:
    """dW and the per-example norms in one pass (the Triton kernel) with ``tile`` =
    (block_o, block_i, efficiency); the best of :data:`TILES` when None."""
    device = device or H200
    if tile is None:
        return min((fused(B, T, d_in, d_out, e, block_t, t, device) for t in TILES),
                   key=lambda c: c.time(device, e))
    bo, bi, eff = tile
    bt = block_t or (64 if e <= 2 else 32)
    g = gemm(B, T, d_in, d_out, e)
    n_tiles = math.ceil(d_out / bo) * math.ceil(d_in / bi)
    s = schedule(n_tiles, B, device.sms)
    epilogue = 3.0 * B * d_in * d_out  # add into dW, square, sum
    partial_bytes = 2.0 * 4 * bo * bi * s.partials  # written, then read by the second pass
    slowdown = (1.0 + EPILOGUE_ITERS / math.ceil(T / bt)) * s.imbalance / eff
    return Cost(g.flops + epilogue, g.bytes + partial_bytes, slowdown, (bo, bi))


@functools.lru_cache(maxsize=4096)
def best_tile(B: int, T: int, d_in: int, d_out: int, e: int = 2,
              device: DeviceModel | None = None) -> tuple[int, int]:
    """The (block_o, block_i) of :data:`TILES` with the lowest predicted fused time."""
    return fused(B, T, d_in, d_out, e, device=device).tile


def gram(B: int, T: int, d_in: int, d_out: int, e: int = 2, block_t: int = 64) -> Cost:
    """The norms from the Gram kernel (upper triangle of T-tile pairs), dW not included."""
    bt = min(block_t, max(16, 1 << max(0, T - 1).bit_length()))
    n = math.ceil(T / bt)
    pairs = n * (n + 1) / 2
    flops = 2.0 * B * pairs * bt * bt * (d_in + d_out) + 2.0 * B * pairs * bt * bt
    return Cost(flops, _io_bytes(B, T, d_in, d_out, e))


def outer(B: int, T: int, d_in: int, d_out: int, e: int = 2) -> Cost:
    """``|a|^2 |g|^2`` for T = 1, dW not included."""
    return Cost(2.0 * B * (d_in + d_out), _io_bytes(B, T, d_in, d_out, e))


def routes(B: int, T: int, d_in: int, d_out: int, e: int = 2,
           device: DeviceModel | None = None) -> dict[str, Route]:
    """Every route giving dW and the weight norms, dW included: ``{"direct": fused, "gram":
    gram + gemm}`` and ``"outer"`` when T = 1."""
    g = gemm(B, T, d_in, d_out, e)
    out = {"direct": Route((fused(B, T, d_in, d_out, e, device=device),)),
           "gram": gram(B, T, d_in, d_out, e) + g}
    if T == 1:
        out["outer"] = outer(B, T, d_in, d_out, e) + g
    return out


@functools.lru_cache(maxsize=4096)
def choose(B: int, T: int, d_in: int, d_out: int, e: int = 2, precision: str = "ieee",
           device: DeviceModel = H200) -> str:
    """The route with the lowest predicted time: ``"outer"`` (T = 1), ``"gram"`` or
    ``"direct"`` (the fused kernel)."""
    if T == 1:
        return "outer"
    r = routes(B, T, d_in, d_out, e, device)
    return min(("direct", "gram"), key=lambda k: r[k].time(device, e, precision))
