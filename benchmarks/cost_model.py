"""Predicted GPU cost of per-example Linear norms: a roofline model, not a measurement.

    python benchmarks/cost_model.py                 # prints, writes results/cost_model.md
    python benchmarks/cost_model.py --out X.md --per-block-gbs 8 --step-efficiency 0.45

For every Linear of a workload, each route is counted in FLOPs and in the fewest bytes it moves
through device memory, and timed at the H200's measured ceilings (790 TFLOP/s dense bf16,
4.3 TB/s copy; gradstats.kernels.cost.H200):

- plain: the dW GEMM (bf16 out) and ``db = G.sum(0)``, what autograd does without gradstats;
- today's CUDA direct (csrc/cuda/linear.cu): per-example float32 tiles ``G_i^T A_i`` written
  by a batched GEMM and read back by ``row_dot``, then a second GEMM for dW (float32 out, cast),
  and two more reads of G for the bias;
- today's CUDA Gram: A and G centred into copies, ``[T, T]`` float32 Gram matrices written and
  read back by ``row_dot``, the centring corrections through float32 copies, the same GEMM and
  bias reads;
- fused Triton (gradstats.kernels.fused_linear) and the Triton Gram kernel (gradstats.kernels.gram)
  as modelled in gradstats.kernels.cost; their bias kernel reads G once, as plain's ``db`` does.

"floor" is the roofline time. "as written" adds what the code's launch shape costs: today's
``row_dot`` runs one thread block per row (per example), each streaming a row of
``d_out * d_in`` (direct) or ``2 T^2`` (Gram) float32 values at the bandwidth one block can pull
(``--per-block-gbs``, about 8 GB/s by Little's law: 256 threads x 4 loads x 4 bytes in flight
over ~0.6 us of latency), with the rows of one chunk in parallel. The whole step is the model's
FLOPs at ``--step-efficiency`` of the bf16 ceiling (an assumption: HF GPT-2 in eager mode).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from gradstats.kernels import cost  # noqa: E402

SCRATCH = 256 << 20  # csrc/cuda/linear.cu kScratchBytes: per-chunk scratch of today's route
E = 2  # bf16 activations and gradients


@dataclass(frozen=True)
class Layer:
    name: str
    d_in: int
    d_out: int
    count: int  # uses per step


@dataclass(frozen=True)
class Workload:
    name: str
    B: int
    T: int
    layers: tuple[Layer, ...]
    extra_flops: float  # attention and the rest that the Linears do not count

    @property
    def step_flops(self) -> float:
        tokens = self.B * self.T
        return 6.0 * tokens * sum(l.d_in * l.d_out * l.count for l in self.layers) + \
            self.extra_flops


def _attention_flops(B: int, T: int, d: int, layers: int) -> float:
    # causal attention: QK^T and PV, forward 2 x 2 B T^2 d / 2, backward twice the forward
    return 3 * 2.0 * B * T * T * d * layers


def workloads() -> list[Workload]:
    gpt2 = (Layer("attn.c_attn", 768, 2304, 12), Layer("attn.c_proj", 768, 768, 12),
            Layer("mlp.c_fc", 768, 3072, 12), Layer("mlp.c_proj", 3072, 768, 12),
            Layer("lm_head (tied)", 768, 50257, 1))
    llama = (Layer("q/k/v/o_proj", 4096, 4096, 4), Layer("gate/up_proj", 4096, 11008, 2),
             Layer("down_proj", 11008, 4096, 1))
    return [Workload("GPT-2 small, B=8, T=1024", 8, 1024, gpt2,
                     _attention_flops(8, 1024, 768, 12)),
            Workload("Llama-7B-like layer, B=8, T=2048", 8, 2048, llama,
                     _attention_flops(8, 2048, 4096, 1)),
            Workload("Llama-7B-like layer, B=4, T=4096", 4, 4096, llama,
                     _attention_flops(4, 4096, 4096, 1))]


@dataclass(frozen=True)
class Estimate:
    flops: float
    bytes: float
    floor: float  # seconds
    as_written: float  # seconds


def _t(flops: float, nbytes: float, dev: cost.DeviceModel) -> float:
    return max(flops / dev.half_flops, nbytes / dev.bandwidth)


def _row_dot(rows: int, row_bytes: float, chunk: int, dev: cost.DeviceModel,
             per_block: float) -> tuple[float, float]:
    """(floor, as written) of today's row_dot over ``rows`` rows of ``row_bytes`` each, in
    chunks of ``chunk`` rows, one block per row."""
    floor = rows * row_bytes / dev.bandwidth
    waves = math.ceil(rows / chunk) * math.ceil(min(chunk, rows) / dev.sms)
    return floor, max(floor, waves * row_bytes / per_block)


def plain(B: int, T: int, l: Layer, dev: cost.DeviceModel) -> Estimate:
    g = cost.gemm(B, T, l.d_in, l.d_out, E)
    f, b = g.flops, g.bytes + E * B * T * l.d_out  # + db = G.sum(0)
    return Estimate(f, b, _t(g.flops, g.bytes, dev) + E * B * T * l.d_out / dev.bandwidth,
                    _t(g.flops, g.bytes, dev) + E * B * T * l.d_out / dev.bandwidth)


def _today_common(B: int, T: int, l: Layer) -> tuple[float, float]:
    """Flops and bytes every today's route pays besides its norms: dW as a float32 GEMM, its
    cast, and the bias (G.sum over T per example, then G.sum over B and T again)."""
    io = E * B * T * (l.d_in + l.d_out)
    flops = 2.0 * B * T * l.d_in * l.d_out
    nbytes = io + 4 * l.d_in * l.d_out + 6 * l.d_in * l.d_out + 2 * E * B * T * l.d_out
    return flops, nbytes


def today_direct(B: int, T: int, l: Layer, dev: cost.DeviceModel, per_block: float) -> Estimate:
    tile = l.d_in * l.d_out
    chunk = max(1, min(B, SCRATCH // (4 * tile)))
    f0, b0 = _today_common(B, T, l)
    bmm_f = 2.0 * B * T * tile
    bmm_b = E * B * T * (l.d_in + l.d_out) + 4.0 * B * tile
    rd_floor, rd_asis = _row_dot(B, 4.0 * tile, chunk, dev, per_block)
    rest = _t(f0, b0, dev) + _t(bmm_f, bmm_b, dev)
    return Estimate(f0 + bmm_f + 2.0 * B * tile, b0 + bmm_b + 4.0 * B * tile, rest + rd_floor,
                    rest + rd_asis)


def today_gram(B: int, T: int, l: Layer, dev: cost.DeviceModel, per_block: float) -> Estimate:
    per = 2 * T * T + T * (l.d_in + l.d_out)
    chunk = max(1, min(B, SCRATCH // (4 * per)))
    f0, b0 = _today_common(B, T, l)
    elems = B * T * (l.d_in + l.d_out)
    # means (read), centred copies (read + write), Gram GEMMs (read, write 2 x 4 T^2)
    gram_f = 2.0 * B * T * T * (l.d_in + l.d_out)
    gram_b = 3.0 * E * elems + E * elems + 8.0 * B * T * T
    # corrections: sum (read), float32 copy (read + write 4), thin bmm (read 4)
    corr_b = (2.0 * E + 8.0) * elems
    corr_f = 2.0 * elems * 4
    rd_floor, rd_asis = _row_dot(B, 8.0 * T * T, chunk, dev, per_block)
    rest = _t(f0, b0, dev) + _t(gram_f, gram_b, dev) + _t(corr_f, corr_b, dev)
    return Estimate(f0 + gram_f + corr_f + 2.0 * B * T * T, b0 + gram_b + corr_b + 8.0 * B * T * T,
                    rest + rd_floor, rest + rd_asis)


def fused_triton(B: int, T: int, l: Layer, dev: cost.DeviceModel) -> tuple[Estimate, str]:
    c = cost.fused(B, T, l.d_in, l.d_out, E, device=dev)
    bias = E * B * T * l.d_out
    t = c.time(dev, E) + bias / dev.bandwidth
    return Estimate(c.flops, c.bytes + bias, t, t), f"{c.tile[0]}x{c.tile[1]}"


def gram_triton(B: int, T: int, l: Layer, dev: cost.DeviceModel) -> Estimate:
    r = cost.gram(B, T, l.d_in, l.d_out, E) + cost.gemm(B, T, l.d_in, l.d_out, E)
    bias = E * B * T * l.d_out
    t = r.time(dev, E) + bias / dev.bandwidth
    return Estimate(r.flops, r.bytes + bias, t, t)


def today_pick(T: int, l: Layer) -> str:
    """csrc/linear_common.h choose_strategy: Gram when T^2 (d_in + d_out) <= T d_in d_out."""
    if T == 1:
        return "outer"
    return "gram" if T * T * (l.d_in + l.d_out) <= T * l.d_in * l.d_out else "direct"


def _us(s: float) -> str:
    return f"{s * 1e6:,.0f} us" if s < 1e-2 else f"{s * 1e3:,.1f} ms"


def layer_table(w: Workload, dev: cost.DeviceModel, per_block: float) -> tuple[list[str], dict]:
    head = ["| layer (x uses) | route | GFLOP | MB moved | floor | as written | / plain |",
            "|---|---|---:|---:|---:|---:|---:|"]
    extra = {"today (floor)": 0.0, "today (as written)": 0.0, "fused Triton": 0.0}
    for l in w.layers:
        p = plain(w.B, w.T, l, dev)
        pick = today_pick(w.T, l)
        td = today_direct(w.B, w.T, l, dev, per_block)
        tg = today_gram(w.B, w.T, l, dev, per_block)
        today = td if pick == "direct" else tg
        fu, tile = fused_triton(w.B, w.T, l, dev)
        gt = gram_triton(w.B, w.T, l, dev)
        auto = {pick: " (auto)"}
        rows = [("plain dW GEMM + db", p), (f"today's CUDA direct{auto.get('direct', '')}", td),
                (f"today's CUDA Gram{auto.get('gram', '')}", tg),
                (f"fused Triton, {tile} tiles", fu), ("Triton Gram + GEMM", gt)]
        for i, (route, e) in enumerate(rows):
            name = f"{l.name} {l.d_in}->{l.d_out} (x{l.count})" if i == 0 else ""
            head.append(f"| {name} | {route} | {e.flops / 1e9:,.1f} | {e.bytes / 1e6:,.0f} | "
                        f"{_us(e.floor)} | {_us(e.as_written)} | "
                        f"{e.as_written / p.as_written:.2f} |")
        extra["today (floor)"] += l.count * (today.floor - p.floor)
        extra["today (as written)"] += l.count * (today.as_written - p.as_written)
        extra["fused Triton"] += l.count * (fu.floor - p.floor)
    return head, extra


def report(dev: cost.DeviceModel, per_block: float, efficiency: float) -> str:
    out = ["# Cost model: predictions, not measurements", "",
           f"Device: {dev.name}; {dev.sms} SMs. Inputs bf16. Per-block bandwidth of today's "
           f"`row_dot` (one block per row): {per_block / 1e9:.0f} GB/s (assumed). Fused kernel: "
           f"epilogue = {cost.EPILOGUE_ITERS} T-block iterations per (example, tile) (assumed), "
           f"tile efficiencies {', '.join(f'{a}x{b}: {c}' for a, b, c in cost.TILES)} "
           "(assumed), persistent programs one per SM. Generated by "
           "`python benchmarks/cost_model.py`.", ""]
    summary = ["## Whole training step (predicted)", "",
               f"Plain step = the step's FLOPs at {efficiency:.0%} of the bf16 ceiling "
               "(assumed); each route adds its time over the plain dW GEMM + db of every "
               "Linear use (other layers' norms and `monitor.step()` not included).", "",
               "| workload | plain step | + today's CUDA, floor | + today's CUDA, as written "
               "| + fused Triton |", "|---|---:|---:|---:|---:|"]
    for w in workloads():
        table, extra = layer_table(w, dev, per_block)
        out += [f"## {w.name}", "", *table, ""]
        step = w.step_flops / (dev.half_flops * efficiency)
        cells = [f"{_us(extra[k])} ({(step + extra[k]) / step:.3f}x)" for k in
                 ("today (floor)", "today (as written)", "fused Triton")]
        summary.append(f"| {w.name} | {_us(step)} | " + " | ".join(cells) + " |")
    out += summary + ["", "Targets (to be measured on the GPU by `benchmarks/gpu_suite.sh`): the "
                      "fused dW + norms at most 1.10x the cuBLAS dW GEMM for T >= 512; an HF "
                      "GPT-2 small step with every per-example norm at most 1.05x the plain "
                      "step."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cost_model.md"),
                    help="markdown file to write ('-' to print only)")
    ap.add_argument("--per-block-gbs", type=float, default=8.0,
                    help="bandwidth one thread block of today's row_dot pulls, GB/s")
    ap.add_argument("--step-efficiency", type=float, default=0.45,
                    help="fraction of the bf16 ceiling a plain step reaches")
    args = ap.parse_args(argv)
    if args.per_block_gbs <= 0 or not 0 < args.step_efficiency <= 1:
        ap.error("--per-block-gbs must be > 0 and --step-efficiency in (0, 1]")
    text = report(cost.H200, args.per_block_gbs * 1e9, args.step_efficiency)
    print(text)
    if args.out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
