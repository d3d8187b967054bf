"""Linear per-example gradient norms: gradstats against the plain ways, side by side, one process.

For each shape (A [B, T, d_in], G [B, T, d_out]) it times, after warm-up, the median call (CUDA
events on a GPU), the methods taking turns round after round so that load from other processes
falls on all of them alike:

  loop          a per-example autograd loop through an nn.Linear (forward + autograd.grad per
                example), squared norms of each example's weight and bias gradients: the naive way
  vmap          torch.func vmap(grad) per-example gradients, then their squared norms
  norms[s]      gradstats.linear_norms for each strategy s and auto
  matmul        the plain weight gradient G2d.T @ A2d (what a normal backward computes for dW)
  fused[s]      gradstats.linear_fused (dW, db and the norms) for each strategy s and auto

and reports the speedup of every norms method over the loop, time / matmul, and the max relative
error of the norms against gradstats.reference (float64). Writes benchmarks/results/linear_<device>
.json and .md.

    python benchmarks/bench_linear.py            # all shapes
    python benchmarks/bench_linear.py --quick    # fewer rounds
    python benchmarks/bench_linear.py --device cuda --dtype float16 --shapes 0,1
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time

import torch
from torch.func import functional_call, grad, vmap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gradstats  # noqa: E402
from gradstats import reference  # noqa: E402
from gradstats.bench import device_name  # noqa: E402
from gradstats.bench import sync_device as sync  # noqa: E402
from gradstats.bench import time_call as time_once  # noqa: E402

# (name, B, T, d_in, d_out); T = 1 means A is [B, d_in].
SHAPES = [
    ("B64 T128 768x768 (target)", 64, 128, 768, 768),
    ("B256 T1 1024x1024 (MLP)", 256, 1, 1024, 1024),
    ("B64 T16 768x768", 64, 16, 768, 768),
    ("B16 T512 256x256", 16, 512, 256, 256),
]
STRATEGIES = ["auto", "outer", "gram", "direct"]


# ----------------------------------------------------------------------------------------------
# Timing


def first_call(fn, device, too_slow: float):
    """Times one (warm-up) call: seconds, or a string saying why the method is not measured."""
    try:
        t = time_once(fn, device)
        return t if t <= too_slow else f"too slow ({t:.1f} s per call)"
    except torch.OutOfMemoryError:
        return "OOM"
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            return "OOM"
        raise
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure_interleaved(fns: dict, device, rounds: int, round_time: float, warmup: int):
    """(median, min) seconds per call of each fn. The methods take turns, round after round, in a
    shuffled order, so that load from other processes (or clock changes) falls on all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {k: [] for k in fns}
    first = {k: time_once(fn, device) for k, fn in fns.items()}
    order = list(fns)
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for k in order:
            fn = fns[k]
            for _ in range(max(1, min(50, round(round_time / max(first[k], 1e-6))))):
                times[k].append(time_once(fn, device))
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


# ----------------------------------------------------------------------------------------------
# The methods. Each returns (weight_norms [B], bias_norms [B]) or, for fused, (dW, db, nw, nb).
def make_loop(lin: torch.nn.Linear, A, G):
    def run():
        nw = torch.empty(A.shape[0], device=A.device, dtype=torch.float32)
        nb = torch.empty_like(nw)
        for i in range(A.shape[0]):
            y = lin(A[i])
            gw, gb = torch.autograd.grad(y, (lin.weight, lin.bias), G[i])
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


def reference_norms(A, G, chunk_bytes=256 << 20):
    """gradstats.reference.linear_norms in chunks of examples (it forms B x d_out x d_in)."""
    B = A.shape[0]
    per = A.shape[-1] * G.shape[-1] * 8
    n = max(1, chunk_bytes // per)
    ws, bs = [], []
    for b0 in range(0, B, n):
        w, b = reference.linear_norms(A[b0:b0 + n], G[b0:b0 + n])
        ws.append(w)
        bs.append(b)
    return torch.cat(ws), torch.cat(bs)


def rel_err(x, ref) -> float:
    x, ref = x.detach().double().to(ref.device), ref
    return ((x - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()


def dw_rel_err(dW, ref) -> float:
    return ((dW.detach().double() - ref).abs().max() / ref.abs().max()).item()


# ----------------------------------------------------------------------------------------------
def git_state() -> dict:
    """The commit, and whether the kernel sources differ from it (results then describe a
    working tree, not the commit)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        def git(*a):
            return subprocess.run(["git", "-C", root, *a], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        return {"commit": git("rev-parse", "--short", "HEAD"),
                "csrc_modified": bool(git("status", "--porcelain", "--untracked-files=no", "--", "csrc"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def device_tag(device: torch.device, dtype: torch.dtype, threads) -> str:
    tag = "cpu" if device.type == "cpu" else "cuda-" + re.sub(
        r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    ).strip("-")
    if dtype != torch.float32:
        tag += "_" + str(dtype).replace("torch.", "")
    if device.type == "cpu" and threads:
        tag += f"_t{threads}"  # only when --threads was given
    return tag


def bench_shape(name, B, T, d_in, d_out, device, dtype, timing, out_rows):
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape_a = (B, d_in) if T == 1 else (B, T, d_in)
    shape_g = (B, d_out) if T == 1 else (B, T, d_out)
    A = torch.randn(shape_a, generator=gen).to(device=device, dtype=dtype)
    G = torch.randn(shape_g, generator=gen).to(device=device, dtype=dtype)
    lin = torch.nn.Linear(d_in, d_out, device=device, dtype=dtype)
    ref_w, ref_b = reference_norms(A, G)
    A2, G2 = A.reshape(-1, d_in), G.reshape(-1, d_out)
    ref_dW = (G2.double().t() @ A2.double())
    auto = gradstats.linear_strategy(T, d_in, d_out, device.type == "cuda")

    methods = [("loop", make_loop(lin, A, G), "norms"), ("vmap", make_vmap(lin, A, G), "norms")]
    for s in STRATEGIES:
        if s == "outer" and T != 1:
            continue
        methods.append((f"norms[{s}]", lambda s=s: gradstats.linear_norms(A, G, s), "norms"))
    methods.append(("matmul", lambda: G2.t() @ A2, "dW"))
    for s in STRATEGIES:
        if s == "outer" and T != 1:
            continue
        methods.append((f"fused[{s}]", lambda s=s: gradstats.linear_fused(A, G, s), "fused"))

    status = {}
    for label, fn, _ in methods:
        if label == "vmap":
            need = vmap_bytes(B, d_in, d_out, A.element_size())
            if need > 0.8 * available_bytes(device):
                status[label] = f"OOM (skipped: needs ~{need / 2**30:.1f} GiB)"
                continue
        status[label] = first_call(fn, device, timing["too_slow"])
    runnable = {label: fn for label, fn, _ in methods if isinstance(status[label], float)}
    best = {}
    for label, (med, low) in measure_interleaved(runnable, device, timing["rounds"],
                                                 timing["round_time"], timing["warmup"]).items():
        status[label], best[label] = med, low

    results = {}
    for label, fn, kind in methods:
        t = status[label]
        err = dw_err = None
        if isinstance(t, float):
            out = fn()
            if kind == "norms":
                err = max(rel_err(out[0], ref_w), rel_err(out[1], ref_b))
            elif kind == "fused":
                err = max(rel_err(out[2], ref_w), rel_err(out[3], ref_b))
                dw_err = dw_rel_err(out[0], ref_dW)
            else:
                dw_err = dw_rel_err(out, ref_dW)
        results[label] = {"time_s": t, "time_min_s": best.get(label), "norms_max_rel_err": err,
                          "dW_max_rel_err": dw_err}
        shown = f"{t * 1e3:9.3f} ms (min {best[label] * 1e3:.3f})" if isinstance(t, float) else t
        print(f"  {label:14s} {shown}", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    loop_t = results["loop"]["time_s"]
    mm_t = results["matmul"]["time_s"]
    for label, r in results.items():
        t = r["time_s"]
        ok = isinstance(t, float)
        r["speedup_vs_loop"] = loop_t / t if ok and isinstance(loop_t, float) else None
        r["ratio_to_matmul"] = t / mm_t if ok and isinstance(mm_t, float) else None
        # The same from the fastest calls: steadier than medians on a loaded machine.
        low, loop_low, mm_low = r["time_min_s"], best.get("loop"), best.get("matmul")
        r["speedup_vs_loop_min"] = loop_low / low if low and loop_low else None
        r["ratio_to_matmul_min"] = low / mm_low if low and mm_low else None
        out_rows.append({"shape": name, "B": B, "T": T, "d_in": d_in, "d_out": d_out,
                         "auto_strategy": auto, "method": label, **r})


def fmt_time(t) -> str:
    if t is None:
        return ""
    if isinstance(t, float):
        return f"{t * 1e3:.3f}"
    return str(t)


def fmt_ratio(x, digits=2) -> str:
    return "" if x is None else f"{x:.{digits}f}x"


def fmt_err(x) -> str:
    return "" if x is None else f"{x:.1e}"


def markdown(meta, rows) -> str:
    lines = [f"# Linear per-example norms on {meta['device_name']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "device_name"]
    lines += ["", "Times are medians in ms (min: the fastest call); speedup = loop time / time; /matmul = time / the plain "
              "`G2d.T @ A2d` time; errors are max relative errors against the float64 reference "
              "(norms) and max |dW - dW_ref| / max |dW_ref|.", ""]
    lines.append("| shape | auto | method | time (ms) | min (ms) | speedup vs loop | / matmul "
                 "| norms rel err | dW rel err |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['auto_strategy']} | {r['method']} | {fmt_time(r['time_s'])} "
            f"| {fmt_time(r['time_min_s'])} "
            f"| {fmt_ratio(r['speedup_vs_loop'], 1)} | {fmt_ratio(r['ratio_to_matmul'])} "
            f"| {fmt_err(r['norms_max_rel_err'])} | {fmt_err(r['dW_max_rel_err'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: all cores); the result files get a _t<N> suffix")
    p.add_argument("--shapes", default=None,
                   help="comma-separated indices into SHAPES to run (default: all)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # compare like with like against float64
    timing = dict(rounds=3 if args.quick else 5, round_time=0.03 if args.quick else 0.15,
                  warmup=1 if args.quick else 2, too_slow=30.0)

    meta = {
        "device_name": device_name(device),
        "device": str(device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gradstats_build_info": gradstats.build_info(),
        "git": git_state(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "timing": timing,
        "loadavg_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print(f"device: {meta['device_name']} ({device}), torch {torch.__version__}, "
          f"threads {meta['threads']}, dtype {args.dtype}")
    print(f"gradstats: {meta['gradstats_build_info']}")

    rows = []
    t0 = time.perf_counter()
    shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    for name, B, T, d_in, d_out in shapes:
        print(f"{name}: A [{B}, {T}, {d_in}], G [{B}, {T}, {d_out}], auto = "
              f"{gradstats.linear_strategy(T, d_in, d_out, device.type == 'cuda')}", flush=True)
        bench_shape(name, B, T, d_in, d_out, device, dtype, timing, rows)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    if hasattr(os, "getloadavg"):
        meta["loadavg_after"] = os.getloadavg()

    md = markdown(meta, rows)
    print()
    print(md)
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"linear_{device_tag(device, dtype, args.threads)}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
