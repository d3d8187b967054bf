"""The fused Triton kernel on the GPU: dW + per-example norms against the cuBLAS dW GEMM, and a
whole HF GPT-2 small training step, side by side in one process (benchmarks/harness.py:
warm-up, interleaved rounds, medians of CUDA-event timings, paired ratios).

Stage ``kernels``: A [B, T, d_in], G [B, T, d_out] bf16, B = 8, T in {128, 512, 1024, 2048},
GPT-2 small's and a Llama-7B-like layer's shapes:

  cublas      the plain weight gradient ``G2d.T @ A2d`` (bf16 out): the baseline
  fused       gradstats.kernels.fused_linear without bias: dW + every |dW_i|^2, one pass
  gram        gradstats.kernels.gram_norms + the cuBLAS dW (T <= 512)
  op          torch.ops.gradstats.triton_linear_fused_collect, strategy "auto", writing the
              monitor's accumulators (dW, db, both norms)
  cuda-op     gradstats.ops.linear_fused_collect on today's CUDA path (csrc/cuda/linear.cu)
  plain       cublas + ``db = G.sum(0)``: what ``op`` and ``cuda-op`` replace

Input sets rotate so that repeated calls do not run out of L2. The first call of each is
checked: dW against cuBLAS in float32, the norms against float32 per-example tiles.
Target (not asserted): fused / cublas <= 1.10 for T >= 512.

Stage ``gpt2``: HF ``GPT2LMHeadModel`` from ``GPT2Config()`` (random weights), B = 8, T = 1024,
bf16 autocast; the methods of benchmarks/methods.py: plain, the monitor at defaults, the monitor
fused without the contract check, Opacus ghost clipping (a missing package or an unsupported
layer is reported by name). Target: every per-example norm at most 1.05x the plain step.

    python benchmarks/bench_triton.py --out DIR            # on a GPU: both stages
    python benchmarks/bench_triton.py --stage kernels --quick
    python benchmarks/bench_triton.py --dry-run            # CPU: tiny shapes, the interpreter
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import harness, methods, report  # noqa: E402
from benchmarks.models import ModelCase  # noqa: E402
from gradstats import kernels  # noqa: E402
from gradstats.kernels import cost  # noqa: E402

GPT2_SHAPES = [(768, 768), (768, 2304), (768, 3072), (3072, 768)]
LLAMA_SHAPES = [(4096, 4096), (4096, 11008)]
T_VALUES = [128, 512, 1024, 2048]


def _sets(nbytes: int, budget: int = 256 << 20) -> int:
    """Input sets to rotate so that the working set exceeds the L2 (at most 8)."""
    return max(1, min(8, math.ceil(budget / max(nbytes, 1))))


class Rotating:
    """Calls ``fn(*inputs[i])`` for i cycling over the input sets."""

    def __init__(self, fn, inputs):
        self.fn, self.inputs, self.i = fn, inputs, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.inputs)
        return self.fn(*self.inputs[self.i])


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _accumulators(B: int, device: torch.device):
    E = torch.zeros(2, B, dtype=torch.float64, device=device)
    P = torch.zeros(2, 4, dtype=torch.float64, device=device)
    return E, P, torch.arange(B, device=device)


def _built() -> str | None:
    """None when the C++/CUDA extension loads, else why not (the Triton kernels need none)."""
    try:
        import gradstats.ops  # noqa: F401
    except ImportError as e:
        return f"skipped: gradstats not built ({str(e)[:120]})"
    return None


def _environment(device: torch.device, **extra) -> dict:
    if _built() is None:
        return report.environment(device, **extra)
    return {"device_name": harness.device_name(device), "device": str(device),
            "torch": torch.__version__, "cuda": torch.version.cuda, "gradstats": _built(),
            **extra}


def kernel_case(B: int, T: int, d_in: int, d_out: int, device: torch.device,
                dtype: torch.dtype, timing: harness.Timing) -> dict:
    """One shape: every method's samples, paired ratios and the first call's errors."""
    gen = torch.Generator(device=device).manual_seed(B * T + d_in + d_out)
    one = 2 * B * T * (d_in + d_out)
    sets = [(torch.randn(B, T, d_in, device=device, generator=gen).to(dtype),
             torch.randn(B, T, d_out, device=device, generator=gen).to(dtype))
            for _ in range(_sets(one))]
    acc = _accumulators(B, device)
    on_cpu = device.type == "cpu"

    def cublas(A, G):
        return G.reshape(-1, d_out).t() @ A.reshape(-1, d_in)

    def fused(A, G):
        return kernels.fused_linear(A, G, bias=False)

    def gram(A, G):
        return kernels.gram_norms(A, G), cublas(A, G)

    def plain(A, G):
        return cublas(A, G), G.reshape(-1, d_out).sum(0)

    def op(A, G):
        return torch.ops.gradstats.triton_linear_fused_collect(A, G, *acc, 0, 1, None, None,
                                                               None, "auto")

    def cuda_op(A, G):
        import gradstats.ops

        return gradstats.ops.linear_fused_collect(A, G, *acc, 0, 1, None, None, None, "auto")

    fns = {"cublas": cublas, "fused": fused, "plain": plain, "op": op}
    if T <= 512:
        fns["gram"] = gram
    skipped = {}
    if not on_cpu and d_in * d_out <= 4096 * 4096:  # today's route: ~8 GB/s per example row
        if _built() is None:
            fns["cuda-op"] = cuda_op
        else:
            skipped["cuda-op"] = _built()
    A, G = sets[0]
    ref_dw = G.float().reshape(-1, d_out).t() @ A.float().reshape(-1, d_in)
    ref_nw = torch.stack([(G[i].float().t() @ A[i].float()).square().sum() for i in range(B)])
    first = fused(A, G)
    errors = {"fused dW": _rel(first.dW, ref_dw), "fused norms": _rel(first.weight_norms, ref_nw),
              "op choice": kernels.op.resolve_strategy("auto", B, T, d_in, d_out, 2, "ieee")}
    if "gram" in fns:
        errors["gram norms"] = _rel(kernels.gram_norms(A, G), ref_nw)
    del first, ref_dw
    samples, failures, _ = harness.measure({k: Rotating(f, sets) for k, f in fns.items()},
                                           device, timing, too_slow_s=2.0)
    failures.update(skipped)
    pred = cost.fused(B, T, d_in, d_out, 2).time(cost.H200, 2) / \
        cost.gemm(B, T, d_in, d_out, 2).time(cost.H200, 2)
    ratios = {}
    for k, base in (("fused", "cublas"), ("gram", "cublas"), ("op", "plain"),
                    ("cuda-op", "plain")):
        if k in samples and base in samples:
            ratios[f"{k}/{base}"] = report.paired(samples[k].times, samples[base].times)
    return {"B": B, "T": T, "d_in": d_in, "d_out": d_out, "sets": len(sets),
            "median_s": {k: s.median for k, s in samples.items()},
            "spread": {k: s.spread for k, s in samples.items()},
            "samples": {k: s.times for k, s in samples.items()}, "failures": failures,
            "ratios": ratios, "predicted_fused_over_gemm": pred, "errors": errors,
            "tile": cost.best_tile(B, T, d_in, d_out, 2)}


def kernels_markdown(cases: list[dict], dtype: str) -> list[str]:
    head = ["d_in->d_out", "T", "cublas (ms)", "fused (ms)", "fused/cublas", "predicted",
            "target <= 1.10", "gram/cublas", "op/plain", "cuda-op/plain", "op route",
            "fused dW err", "fused norms err"]
    rows = []
    for c in cases:
        r, med = c["ratios"], c["median_s"]
        fr = r.get("fused/cublas", {}).get("ratio")
        target = "" if c["T"] < 512 or fr is None else ("met" if fr <= 1.10 else "missed")
        rows.append([f"{c['d_in']}->{c['d_out']}", str(c["T"]), report.fmt_ms(med.get("cublas")),
                     report.fmt_ms(med.get("fused")), report.fmt_x(fr),
                     report.fmt_x(c["predicted_fused_over_gemm"]), target,
                     report.fmt_x(r.get("gram/cublas", {}).get("ratio")),
                     report.fmt_x(r.get("op/plain", {}).get("ratio")),
                     report.fmt_x(r.get("cuda-op/plain", {}).get("ratio")),
                     c["errors"]["op choice"], f"{c['errors']['fused dW']:.1e}",
                     f"{c['errors']['fused norms']:.1e}"])
        for k, why in c["failures"].items():
            rows.append([""] * 10 + [f"{k}: {report.cell(why)}", "", ""])
    intro = (f"B = {cases[0]['B'] if cases else '-'}, {dtype} inputs. Paired ratios: median of "
             "round-by-round ratios measured side by side. predicted = gradstats.kernels.cost "
             "(fused / GEMM floor). Errors: relative Frobenius error of the first call against "
             "float32 references.")
    return [intro, ""] + report.table(head, rows, right=set(range(2, 10)))


# ============================================================================ GPT-2 step
class HFLogits(nn.Module):
    """An HF causal LM returning its logits, under bf16 autocast on CUDA. Position ids are
    passed per example and contiguous: Opacus's embedding rule calls ``.view`` on them and
    reads their first dim as the batch (HF's default ``[1, T]`` broadcast breaks both)."""

    def __init__(self, lm: nn.Module, autocast: bool):
        super().__init__()
        self.lm, self.autocast = lm, autocast

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1).contiguous()
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.lm(input_ids=ids, position_ids=pos).logits


def gpt2_case(tiny: bool, tied: bool = True) -> ModelCase:
    from transformers import GPT2Config, GPT2LMHeadModel

    size = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32) if tiny else {}
    B, T = (2, 16) if tiny else (8, 1024)
    cfg = GPT2Config(tie_word_embeddings=tied, **size)
    V = cfg.vocab_size

    def build() -> nn.Module:
        return HFLogits(GPT2LMHeadModel(cfg), autocast=not tiny)

    def batch(gen: torch.Generator):
        ids = torch.randint(0, V, (B, T + 1), generator=gen)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    desc = (f"HF GPT2LMHeadModel({'tiny ' if tiny else ''}GPT2Config, random weights"
            f"{'' if tied else ', lm_head untied'}), B={B}, T={T}")
    return ModelCase("hf-gpt2", desc, build, batch, B, T, small=False, vmap_chunk=1,
                     ref_examples=1)


def gpt2_stage(device: torch.device, tiny: bool, timing: harness.Timing) -> dict:
    case = gpt2_case(tiny)
    model, x, y = case.instantiate(device)
    makers = {"plain": methods.plain, "gs-default": methods.gradstats_method(),
              "gs-fused-nocheck": methods.gradstats_method(mode="fused", check_contract=False),
              "opacus-ghost": methods.opacus_ghost}
    fns, failures = {}, {}
    for k, make in makers.items():
        m = model if k == "plain" else copy.deepcopy(model)
        out = harness.guard(lambda make=make, m=m: make(case, m, x, y), device)
        if isinstance(out, str):
            failures[k] = out
        else:
            fns[k] = out
    # Opacus ghost clipping refuses tied parameters (HF GPT-2 ties lm_head to wte): also time it
    # on an untied copy (the same FLOPs, one more parameter matrix)
    untied = gpt2_case(tiny, tied=False)
    m2, x2, y2 = untied.instantiate(device)
    out = harness.guard(lambda: methods.opacus_ghost(untied, m2, x2, y2), device)
    if isinstance(out, str):
        failures["opacus-ghost-untied"] = out
    else:
        fns["opacus-ghost-untied"] = out
    samples, more, _ = harness.measure(fns, device, timing)
    failures.update(more)
    ratios = {k: report.verdict(s.times, samples["plain"].times) for k, s in samples.items()
              if k != "plain" and "plain" in samples}
    return {"case": case.desc, "median_s": {k: s.median for k, s in samples.items()},
            "spread": {k: s.spread for k, s in samples.items()},
            "samples": {k: s.times for k, s in samples.items()}, "ratios": ratios,
            "failures": failures}


def gpt2_markdown(r: dict) -> list[str]:
    rows = []
    for k in ("plain", "gs-default", "gs-fused-nocheck", "opacus-ghost", "opacus-ghost-untied"):
        if k in r["median_s"]:
            v = r["ratios"].get(k, {})
            target = "" if not k.startswith("gs-") or not v else (
                "met" if v["ratio"] <= 1.05 else "missed")
            rows.append([k, report.fmt_ms(r["median_s"][k]), report.fmt_pct(r["spread"][k]),
                         report.fmt_x(v.get("ratio")), v.get("verdict", ""), target])
        elif k in r["failures"]:
            rows.append([k, report.cell(r["failures"][k]), "", "", "", ""])
    return [r["case"] + ", bf16 autocast. / plain: paired ratio; target <= 1.05x.", ""] + \
        report.table(["method", "time (ms)", "spread", "/ plain", "vs plain", "target"], rows,
                     right={1, 2, 3})


# ============================================================================ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=("kernels", "gpt2", "all"), default="all")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shapes, Triton's interpreter: checks the code paths")
    ap.add_argument("--quick", action="store_true", help="few rounds (smoke run)")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for triton_kernels_<dev>.{md,json} and gpt2_step_<dev>.*")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: use --dry-run to check the code paths on the CPU")
    if args.dry_run:
        torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
    timing = harness.Timing.quick() if args.quick or args.dry_run else harness.Timing(
        rounds=5, min_rounds=3, warmup=2, min_sample_s=0.02, budget_s=1.0, retries=0)
    if args.dry_run:
        timing = harness.Timing(rounds=1, min_rounds=1, warmup=1, min_sample_s=0.0,
                                budget_s=0.5, retries=0)
    meta = _environment(device, triton=getattr(kernels._launch.triton, "__version__", None),
                              kernels_available=kernels.available(device))
    tag = harness.device_tag(device)
    if args.stage in ("kernels", "all"):
        t0 = time.time()
        if args.dry_run:
            grid = [(2, 16, 32, 48), (2, 40, 48, 32)]
        else:
            grid = [(8, T, d_in, d_out) for d_in, d_out in GPT2_SHAPES + LLAMA_SHAPES
                    for T in T_VALUES if not (d_in * d_out > 4096 * 4096 and T > 1024)]
        cases = []
        for B, T, d_in, d_out in grid:
            cases.append(kernel_case(B, T, d_in, d_out, device, torch.bfloat16, timing))
            c = cases[-1]
            print(f"{d_in}->{d_out} T={T}: " + ", ".join(
                f"{k} {v['ratio']:.3f}" for k, v in c["ratios"].items()) +
                f" (predicted fused/GEMM {c['predicted_fused_over_gemm']:.3f})", flush=True)
            md = "\n".join(report.header("Fused Triton dW + norms vs cuBLAS", meta) +
                           kernels_markdown(cases, "bf16")) + "\n"
            if args.out:  # after every shape: a stage stopped at its time limit keeps these
                report.save(args.out, f"triton_kernels_{tag}", {"meta": meta, "cases": cases},
                            md)
        print(md, flush=True)
        print(f"kernels stage: {time.time() - t0:.0f} s", flush=True)
    if args.stage in ("gpt2", "all"):
        t0 = time.time()
        r = gpt2_stage(device, args.dry_run, timing)
        md = "\n".join(report.header("HF GPT-2 small training step", meta) +
                       gpt2_markdown(r)) + "\n"
        print(md, flush=True)
        if args.out:
            report.save(args.out, f"gpt2_step_{tag}", {"meta": meta, **r}, md)
        print(f"gpt2 stage: {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
