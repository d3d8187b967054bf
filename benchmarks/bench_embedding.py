"""Embedding per-example gradient norms: the monitor's overhead on a plain backward, one process.

Shape (default): V = 50,304, B = 8, T = 1024, d = 768 (a GPT-2 sized table). The methods take
turns round after round in the suite's harness (``harness.py``):

  plain              forward + backward of ``emb(ids)`` with a random upstream gradient
                     (nn.Embedding, .grad released before each call)
  monitor+step       the same with ``GradStatsMonitor(emb, loss_reduction="sum")`` attached
                     (defaults otherwise), then ``monitor.step()``; the time of ``step()`` itself
                     is measured inside each call
  monitor+step, no check   the same with ``check_contract=False``
  |.grad|^2 float64  the naive float64 square-sum of a [V, d] gradient: a yardstick for the part
                     of ``step()`` that has to read the whole ``.grad``

then where the monitor's time goes (``torch.profiler``, by op name: the gradstats ops, and the
ops whose self time grew most against the plain step), and the per-example norms against a
float64 reference. Target: monitor+step / plain <= 2. Writes
results/embedding_<device>.json and .md.

    python benchmarks/bench_embedding.py
    python benchmarks/bench_embedding.py --quick
    python benchmarks/bench_embedding.py --V 1000 --B 2 --T 64 --d 32 --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import record_function  # noqa: E402

from gradstats import GradStatsMonitor  # noqa: E402

from benchmarks import harness, report  # noqa: E402


def reference_norms(ids: torch.Tensor, G: torch.Tensor, V: int) -> torch.Tensor:
    """Float64 per-example norms through a dense gradient per example (one at a time)."""
    out = torch.empty(ids.shape[0], dtype=torch.float64)
    for i in range(ids.shape[0]):
        dE = torch.zeros(V, G.shape[-1], dtype=torch.float64)
        dE.index_add_(0, ids[i], G[i].double())
        out[i] = dE.square().sum()
    return out


def monitored(emb: nn.Embedding, ids, G, **options):
    """A module sharing ``emb``'s weight with a monitor attached, and its timed step."""
    twin = nn.Embedding(*emb.weight.shape, device=emb.weight.device)
    twin.weight = emb.weight
    mon = GradStatsMonitor(twin, loss_reduction="sum", **options)
    watch = harness.Stopwatch(ids.device)

    def step():
        emb.weight.grad = None
        twin(ids).backward(G)
        with watch, record_function("gradstats: monitor.step()"):
            return mon.step()
    step.inner, step.monitor = watch, mon
    return step


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--V", type=int, default=50_304)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 rounds, 1 warm-up")
    ap.add_argument("--out", "--out-dir", dest="out", type=Path,
                    default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    timing = (harness.Timing.quick() if args.quick
              else harness.Timing(rounds=args.rounds, warmup=2, min_sample_s=0.0, budget_s=30.0))
    torch.manual_seed(0)
    V, B, T, d = args.V, args.B, args.T, args.d

    emb = nn.Embedding(V, d, device=device)
    ids = torch.randint(0, V, (B, T), device=device)
    ids[:, T // 2:] = ids[:, : T - T // 2]  # half the positions repeat an id of the example
    G = torch.randn(B, T, d, device=device)

    def plain():
        emb.weight.grad = None
        emb(ids).backward(G)

    step, step_nocheck = monitored(emb, ids, G), monitored(emb, ids, G, check_contract=False)
    plain()
    grad = emb.weight.grad.detach().clone()
    fns = {"plain": plain, "monitor+step": step, "monitor+step, no check": step_nocheck,
           "|.grad|^2 float64": lambda: grad.double().square().sum()}
    try:
        samples, failures, outputs = harness.measure(fns, device, timing)
        profile = harness.guard(lambda: harness.compare_profiles(
            plain, step, device, 1 if args.quick else 3, prefix="gradstats"), device)
    finally:
        step.monitor.detach()
        step_nocheck.monitor.detach()
    if failures:
        raise SystemExit(f"bench_embedding: {failures}")

    ref = reference_norms(ids.cpu(), G.cpu(), V)
    got = outputs["monitor+step"].per_example_sq_norms.double().cpu()
    err = ((got - ref).abs() / ref).max().item()
    base = samples["plain"]
    rows = []
    for k, s in samples.items():
        inner = getattr(fns[k], "inner", None)
        rows.append({"method": k, "median_s": s.median, "min_s": s.min, "spread": s.spread,
                     "rounds": len(s.times), "ratio_to_plain": report.paired(s.times, base.times),
                     "step_s": inner.median if inner is not None else None})
    ratio = rows[1]["ratio_to_plain"]["ratio"]
    meta = report.environment(device, shape={"V": V, "B": B, "T": T, "d": d}, quick=args.quick,
                              timing=vars(timing))
    info = {"benchmark": "embedding", "meta": meta, "rows": rows, "profile": profile,
            "monitor_per_example_max_rel_err_vs_float64": err,
            "target": "monitor+step / plain <= 2", "target_met": ratio <= 2.0}

    L = report.header(f"Embedding per-example norms: monitor overhead, V={V} B={B} T={T} d={d}",
                      meta)
    L += report.table(
        ["method", "median ms", "best ms", "spread", "/ plain", "step() ms"],
        [[report.cell(r["method"]), report.fmt_ms(r["median_s"]), report.fmt_ms(r["min_s"]),
          report.fmt_pct(r["spread"]), report.fmt_x(r["ratio_to_plain"]["ratio"]),
          report.fmt_ms(r["step_s"])] for r in rows], right={1, 2, 3, 4, 5})
    L += ["plain: forward + backward of emb(ids) with a random upstream gradient; monitor+step: "
          "the same with GradStatsMonitor attached, then monitor.step() (step() ms: its own "
          "time, included); / plain: median of the round-by-round ratios; |.grad|^2 float64: the "
          "naive square-sum of the [V, d] gradient, a yardstick for step().", ""]
    if isinstance(profile, str):
        L += [f"Profile: {profile}", ""]
    else:
        L += [f"Where the monitor's time goes (torch.profiler, one plain and one monitored step "
              f"in turn, x{profile['calls']}): plain {profile['base_ms']:.1f} ms, monitor+step "
              f"{profile['fn_ms']:.1f} ms.", ""] + report.profile_tables(profile)
    L += [f"Target monitor+step / plain <= 2: {'met' if info['target_met'] else 'NOT met'} "
          f"({ratio:.2f}). Max relative error of the per-example norms through the monitor "
          f"against a float64 reference: {err:.1e}.", ""]
    md = "\n".join(L)
    print(md)
    j, m = report.save(args.out, f"embedding_{harness.device_tag(device)}", info, md)
    print(f"wrote {j} and {m}")
    return info


if __name__ == "__main__":
    main()
