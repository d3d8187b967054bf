"""Linear per-example gradient norms: gradstats against the plain ways, side by side, one process.

For each shape (A [B, T, d_in], G [B, T, d_out]) the methods take turns round after round in the
suite's harness (``harness.py``: warm-up, interleaved rounds, medians, CUDA events on a GPU,
contention handling):

  loop          a per-example autograd loop through an nn.Linear (forward + autograd.grad per
                example), squared norms of each example's weight and bias gradients: the naive way
  vmap          torch.func vmap(grad) per-example gradients, then their squared norms
  norms[s]      gradstats.linear_norms for each strategy s and auto
  matmul        the plain weight gradient G2d.T @ A2d (what a normal backward computes for dW)
  fused[s]      gradstats.linear_fused (dW, db and the norms) for each strategy s and auto

and reports the speedup of every method over the loop, time / matmul, and the max relative
error of the norms against gradstats.reference (float64). Writes results/linear_<device>.json
and .md (``--threads N`` adds ``_tN``, a half-precision ``--dtype`` its name).

    python benchmarks/bench_linear.py            # all shapes
    python benchmarks/bench_linear.py --quick    # a smoke run: few rounds
    python benchmarks/bench_linear.py --device cuda --dtype float16 --shapes 0,1
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

import gradstats  # noqa: E402
from gradstats import reference  # noqa: E402

from benchmarks import harness, report  # noqa: E402

# (name, B, T, d_in, d_out); T = 1 means A is [B, d_in].
SHAPES = [
    ("B64 T128 768x768 (target)", 64, 128, 768, 768),
    ("B256 T1 1024x1024 (MLP)", 256, 1, 1024, 1024),
    ("B64 T16 768x768", 64, 16, 768, 768),
    ("B16 T512 256x256", 16, 512, 256, 256),
]
STRATEGIES = ["auto", "outer", "gram", "direct"]


# ============================================================================ the naive ways
def make_loop(lin: torch.nn.Linear, A, G):
    def run():
        nw = torch.empty(A.shape[0], device=A.device, dtype=torch.float32)
        nb = torch.empty_like(nw)
        for i in range(A.shape[0]):
            gw, gb = torch.autograd.grad(lin(A[i]), (lin.weight, lin.bias), G[i])
            nw[i] = gw.float().square().sum()
            nb[i] = gb.float().square().sum()
        return nw, nb
    return run


def make_vmap(lin: torch.nn.Linear, A, G):
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def loss(p, a, g):
        return (functional_call(lin, p, (a.unsqueeze(0),)) * g.unsqueeze(0)).sum()

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))

    def run():
        gs = per_example(params, A, G)
        w = gs["weight"].float().flatten(1)
        return (w * w).sum(1), gs["bias"].float().square().sum(1)
    return run


def vmap_bytes(B, d_in, d_out, elem) -> int:
    return B * d_out * (d_in + 1) * elem * 2  # per-example grads plus one temporary of that size


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


# ============================================================================ correctness
def reference_norms(A, G, chunk_bytes=256 << 20):
    """gradstats.reference.linear_norms in chunks of examples (it forms B x d_out x d_in)."""
    n = max(1, chunk_bytes // (A.shape[-1] * G.shape[-1] * 8))
    parts = [reference.linear_norms(A[b:b + n], G[b:b + n]) for b in range(0, A.shape[0], n)]
    return torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts])


def rel_err(x, ref) -> float:
    x = x.detach().double().to(ref.device)
    return ((x - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()


def dw_rel_err(dW, ref) -> float:
    return ((dW.detach().double() - ref).abs().max() / ref.abs().max()).item()


# ============================================================================ one shape
def bench_shape(name, B, T, d_in, d_out, device, dtype, timing) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    A = torch.randn((B, d_in) if T == 1 else (B, T, d_in), generator=gen).to(device, dtype)
    G = torch.randn((B, d_out) if T == 1 else (B, T, d_out), generator=gen).to(device, dtype)
    lin = torch.nn.Linear(d_in, d_out, device=device, dtype=dtype)
    ref_w, ref_b = reference_norms(A, G)
    A2, G2 = A.reshape(-1, d_in), G.reshape(-1, d_out)
    ref_dW = G2.double().t() @ A2.double()
    auto = gradstats.linear_strategy(T=T, d_in=d_in, d_out=d_out)
    strategies = [s for s in STRATEGIES if s != "outer" or T == 1]

    methods = [("loop", make_loop(lin, A, G), "norms"), ("vmap", make_vmap(lin, A, G), "norms")]
    methods += [(f"norms[{s}]", lambda s=s: gradstats.linear_norms(A, G, s), "norms")
                for s in strategies]
    methods.append(("matmul", lambda: G2.t() @ A2, "dW"))
    methods += [(f"fused[{s}]", lambda s=s: gradstats.linear_fused(A, G, s), "fused")
                for s in strategies]
    fns = {label: fn for label, fn, _ in methods}
    skipped = {}
    need = vmap_bytes(B, d_in, d_out, A.element_size())
    if need > 0.8 * available_bytes(device):
        skipped["vmap"] = f"OOM (skipped: needs ~{need / 2**30:.1f} GiB)"
        del fns["vmap"]
    samples, failures, outputs = harness.measure(fns, device, timing, too_slow_s=30.0)
    failures.update(skipped)

    loop, mm = samples.get("loop"), samples.get("matmul")
    rows = []
    for label, _, kind in methods:
        row = {"shape": name, "B": B, "T": T, "d_in": d_in, "d_out": d_out,
               "auto_strategy": auto, "method": label}
        s = samples.get(label)
        if s is None:
            row["time_s"] = failures.get(label, "not run")
            rows.append(row)
            print(f"  {label:14s} {row['time_s']}")
            continue
        out = outputs[label]
        err = dw_err = None
        if kind == "norms":
            err = max(rel_err(out[0], ref_w), rel_err(out[1], ref_b))
        elif kind == "fused":
            err = max(rel_err(out[2], ref_w), rel_err(out[3], ref_b))
            dw_err = dw_rel_err(out[0], ref_dW)
        else:
            dw_err = dw_rel_err(out, ref_dW)
        row.update(time_s=s.median, time_min_s=s.min, spread=s.spread, rounds=len(s.times),
                   norms_max_rel_err=err, dW_max_rel_err=dw_err,
                   speedup_vs_loop=1 / report.paired(s.times, loop.times)["ratio"]
                   if loop else None,
                   ratio_to_matmul=report.paired(s.times, mm.times)["ratio"] if mm else None,
                   # from the fastest rounds: steadier than medians on a loaded machine
                   speedup_vs_loop_min=loop.min / s.min if loop else None,
                   ratio_to_matmul_min=s.min / mm.min if mm else None)
        rows.append(row)
        print(f"  {label:14s} {s.median * 1e3:9.3f} ms (best round {s.min * 1e3:.3f})", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(meta, rows) -> str:
    L = report.header("Linear per-example norms", meta)
    L += ["Times are medians over interleaved rounds in ms (best: the fastest round); speedup = "
          "loop time / time and / matmul = time / the plain `G2d.T @ A2d` time, both the median "
          "of the round-by-round ratios; errors are max relative errors against the float64 "
          "reference (norms) and max |dW - dW_ref| / max |dW_ref|.", ""]
    body = [[r["shape"], r["auto_strategy"], r["method"], report.fmt_ms(r["time_s"]),
             report.fmt_ms(r.get("time_min_s")), report.fmt_pct(r.get("spread")),
             report.fmt_x(r.get("speedup_vs_loop"), 1), report.fmt_x(r.get("ratio_to_matmul")),
             "" if r.get("norms_max_rel_err") is None else f"{r['norms_max_rel_err']:.1e}",
             "" if r.get("dW_max_rel_err") is None else f"{r['dW_max_rel_err']:.1e}"]
            for r in rows]
    L += report.table(["shape", "auto", "method", "time (ms)", "best (ms)", "spread",
                       "speedup vs loop", "/ matmul", "norms rel err", "dW rel err"], body,
                      right=set(range(3, 10)))
    return "\n".join(L)


def file_tag(device: torch.device, dtype: torch.dtype, threads) -> str:
    tag = harness.device_tag(device)
    if dtype != torch.float32:
        tag += "_" + str(dtype).replace("torch.", "")
    if device.type == "cpu" and threads:
        tag += f"_t{threads}"  # only when --threads was given
    return tag


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few rounds (a smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: all cores); the result files get a _t<N> suffix")
    p.add_argument("--shapes", default=None,
                   help="comma-separated indices into SHAPES to run (default: all)")
    p.add_argument("--out", "--out-dir", dest="out", type=Path,
                   default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # compare like with like against float64
    timing = (harness.Timing.quick() if args.quick
              else harness.Timing(rounds=5, warmup=2, min_sample_s=0.15, budget_s=8.0))
    meta = report.environment(device, dtype=args.dtype, quick=args.quick, timing=vars(timing))
    print(f"device: {meta['device_name']} ({device}), torch {torch.__version__}, "
          f"threads {meta['threads']}, dtype {args.dtype}")
    print(f"gradstats: {meta['gradstats_build_info']}")

    rows = []
    t0 = time.perf_counter()
    shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    for name, B, T, d_in, d_out in shapes:
        print(f"{name}: A [{B}, {T}, {d_in}], G [{B}, {T}, {d_out}], auto = "
              f"{gradstats.linear_strategy(T=T, d_in=d_in, d_out=d_out)}", flush=True)
        rows += bench_shape(name, B, T, d_in, d_out, device, dtype, timing)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    if hasattr(os, "getloadavg"):
        meta["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]

    md = markdown(meta, rows)
    print()
    print(md)
    j, m = report.save(args.out, f"linear_{file_tag(device, dtype, args.threads)}",
                       {"meta": meta, "rows": rows}, md)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
