"""Embedding per-example gradient norms: the monitor's overhead on a plain backward, one process.

Shape (default): V = 50,304, B = 8, T = 1024, d = 768 (a GPT-2 sized table) on CPU. After
warm-up the methods take turns, round after round, so that load from other processes falls on
all of them alike; medians are reported:

  plain        forward + backward of ``emb(ids)`` with a random upstream gradient (nn.Embedding,
               .grad set to None before each call)
  monitor      the same with a GradStatsMonitor attached (hooks mode: the norms and the contract
               probe run in the output-gradient hook)
  monitor+step the same followed by ``monitor.step()`` (reads .grad: |.grad|^2 and the probe)
  norms        EmbeddingRule.norms alone on the saved ids and the upstream gradient
  step: ...    the piece of monitor.step() that reads a [V, d] .grad: "grad summary" is
               |.grad|^2 and the two probe projections in one pass (the gradstats op the monitor
               uses), "grad sq f64" the naive float64 |.grad|^2 for comparison

and the ratios to ``plain`` (the target is monitor+step / plain <= 2). Also checks the norms against
a float64 reference. Writes benchmarks/results/embedding_<device>.json and .md.

    python benchmarks/bench_embedding.py
    python benchmarks/bench_embedding.py --quick
    python benchmarks/bench_embedding.py --V 1000 --B 2 --T 64 --d 32 --device cuda
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gradstats  # noqa: E402
from gradstats import GradStatsMonitor, _ops  # noqa: E402
from gradstats.rules import rule_for  # noqa: E402
from gradstats.bench import sync_device as sync  # noqa: E402
from gradstats.bench import time_call as time_once  # noqa: E402




def measure_interleaved(fns: dict, device, rounds: int, warmup: int) -> dict[str, dict]:
    """Median (and min, max) seconds per call of each fn, the methods taking turns."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(time_once(fn, device))
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "n": len(v)}
            for k, v in times.items()}


def reference_norms(ids: torch.Tensor, G: torch.Tensor, V: int) -> torch.Tensor:
    """Float64 per-example norms through a dense one-hot per example (one example at a time)."""
    out = torch.empty(ids.shape[0], dtype=torch.float64)
    for i in range(ids.shape[0]):
        dE = torch.zeros(V, G.shape[-1], dtype=torch.float64)
        dE.index_add_(0, ids[i], G[i].double())
        out[i] = dE.square().sum()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--V", type=int, default=50_304)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 3, 1
    device = torch.device(args.device)
    torch.manual_seed(0)
    V, B, T, d = args.V, args.B, args.T, args.d

    emb = nn.Embedding(V, d, device=device)
    ids = torch.randint(0, V, (B, T), device=device)
    ids[:, T // 2:] = ids[:, : T - T // 2]  # half the positions repeat an id of the example
    G = torch.randn(B, T, d, device=device)

    def plain():
        emb.weight.grad = None
        emb(ids).backward(G)

    rule = rule_for(emb)

    def norms():
        return rule.norms(emb, ids, G)["weight"]

    # Modules sharing the one weight: the plain one has no hooks; each monitor has its own.
    emb_hooks, emb_step = nn.Embedding(V, d, device=device), nn.Embedding(V, d, device=device)
    emb_hooks.weight = emb_step.weight = emb.weight
    mon = GradStatsMonitor(emb_hooks, loss_reduction="sum")
    mon_step = GradStatsMonitor(emb_step, loss_reduction="sum")

    def monitored():
        emb.weight.grad = None
        emb_hooks(ids).backward(G)  # what the hooks collect piles up (a few bytes a call)

    def monitored_step():
        emb.weight.grad = None
        emb_step(ids).backward(G)
        return mon_step.step()

    # Pieces of monitor.step() that read a [V, d] .grad (for the breakdown).
    emb(ids).backward(G)
    grad = emb.weight.grad.detach().clone()
    vectors = rule.probe_vectors("weight", emb.weight, torch.Generator().manual_seed(0))

    def grad_sq_f64():
        return grad.double().square().sum()  # the naive way, for comparison

    def grad_summary():
        return _ops.grad_summary(grad, *vectors)

    fns = {"plain": plain, "monitor": monitored, "monitor+step": monitored_step, "norms": norms,
           "step: grad summary": grad_summary, "step: grad sq f64": grad_sq_f64}
    try:
        results = measure_interleaved(fns, device, args.rounds, args.warmup)
        stats = monitored_step()
    finally:
        mon.detach()
        mon_step.detach()

    got = norms().double().cpu()
    ref = reference_norms(ids.cpu(), G.cpu(), V)
    err = ((got - ref).abs() / ref).max().item()
    per_example_err = ((stats.per_example_sq_norms - ref).abs() / ref).max().item()

    base = results["plain"]["median_s"]
    ratios = {k: v["median_s"] / base for k, v in results.items()}
    info = {
        "benchmark": "embedding",
        "shape": {"V": V, "B": B, "T": T, "d": d},
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{platform.processor() or platform.machine()} cpu, "
                        f"{torch.get_num_threads()} threads"),
        "torch": torch.__version__,
        "gradstats": gradstats.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "load_average": ([round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg")
                         else None),
        "times": results,
        "ratio_to_plain": ratios,
        "norms_max_rel_err_vs_float64": err,
        "monitor_per_example_max_rel_err_vs_float64": per_example_err,
        "target": "monitor+step / plain <= 2",
        "target_met": ratios["monitor+step"] <= 2.0,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"embedding_{device.type}")
    with open(stem + ".json", "w") as f:
        json.dump(info, f, indent=2)
    lines = [
        f"# Embedding per-example norms: monitor overhead ({device.type})",
        "",
        f"V={V}, B={B}, T={T}, d={d}; {info['device']}; torch {info['torch']}; "
        f"gradstats {info['gradstats']}; {info['date']}; median of {args.rounds} interleaved "
        f"rounds after {args.warmup} warm-up; load average {info['load_average']}.",
        "",
        "| method | median ms | min ms | max ms | / plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in results:
        v = results[k]
        lines.append(f"| {k} | {v['median_s'] * 1e3:.1f} | {v['min_s'] * 1e3:.1f} | "
                     f"{v['max_s'] * 1e3:.1f} | {ratios[k]:.2f} |")
    lines += [
        "",
        "plain: forward + backward of emb(ids) with a random upstream gradient; monitor: the "
        "same with GradStatsMonitor (hooks mode, norms + contract probe in backward); "
        "monitor+step: plus monitor.step(); norms: EmbeddingRule.norms alone; step: grad "
        "summary: |.grad|^2 and the probe in one pass as monitor.step() does it, grad sq f64: "
        "the naive float64 |.grad|^2.",
        "",
        f"Target monitor+step / plain <= 2: {'met' if info['target_met'] else 'NOT met'} "
        f"({ratios['monitor+step']:.2f}). Max relative error of the norms against a float64 "
        f"reference: {err:.1e} (through the monitor: {per_example_err:.1e}).",
        "",
    ]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return info


if __name__ == "__main__":
    main()
