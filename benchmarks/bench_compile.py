"""The monitor under ``torch.compile``: a training step (forward, backward, ``monitor.step()``,
``zero_grad``) of each suite model compiled with the monitor's traced path
(``prepare_compile``, ``fullgraph=True``, default settings, contract check included) against
the same model compiled without a monitor, and the eager pair beside it; paired rounds in one
process (benchmarks/harness.py), ratios of medians of per-round ratios.

    python -m benchmarks.bench_compile --threads 2 [--models demo,mlp,gpt] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import warnings

import torch

from gradstats import GradStatsMonitor

from .harness import Timing, device_name, measure
from .models import make_cases
from .report import paired


def _step(model, fwd, case, x, y, monitor=None):
    def run():
        case.loss(fwd(x), y).backward()
        if monitor is not None:
            monitor.step()
        model.zero_grad(set_to_none=False)
    return run


def bench(name: str, timing: Timing) -> dict:
    case = make_cases()[name]
    device = torch.device("cpu")
    base, x, y = case.instantiate(device)
    models = {k: copy.deepcopy(base) for k in ("eager", "eager+gs", "compiled", "compiled+gs")}
    mons = {k: GradStatsMonitor(models[k]) for k in ("eager+gs", "compiled+gs")}
    why = None
    try:
        mons["compiled+gs"].prepare_compile(x)
    except ValueError as e:
        why = str(e)
    fns = {}
    for k, m in models.items():
        fwd = (torch.compile(m, fullgraph=why is None and k == "compiled+gs")
               if k.startswith("compiled") else m)
        fns[k] = _step(m, fwd, case, x, y, mons.get(k))
    samples, failures, _ = measure(fns, device, timing)
    out = {"model": case.desc, "traced": why is None, "why": why, "failures": failures}
    for a, b in (("eager+gs", "eager"), ("compiled+gs", "compiled"), ("compiled", "eager")):
        if a in samples and b in samples:
            out[f"{a} / {b}"] = paired(samples[a].times, samples[b].times)
    out["median_ms"] = {k: 1e3 * s.median for k, s in samples.items()}
    for mon in mons.values():
        mon.detach()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,mlp,gpt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    timing = Timing.quick() if args.quick else Timing()
    rows = {n: bench(n, timing) for n in args.models.split(",")}
    lines = [f"torch {torch.__version__}, {device_name(torch.device('cpu'))}, "
             f"{args.threads} threads", "",
             "| model | traced path | eager gs / eager | compiled gs / compiled | "
             "compiled / eager |", "|---|---|---:|---:|---:|"]
    for n, r in rows.items():
        cells = [f"{r[k]['ratio']:.2f}x [{r[k]['q1']:.2f}, {r[k]['q3']:.2f}]" if k in r else "-"
                 for k in ("eager+gs / eager", "compiled+gs / compiled", "compiled / eager")]
        lines.append(f"| {n} | {'yes' if r['traced'] else 'no: ' + str(r['why'])[:60]} | "
                     + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compile_cpu.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "compile_cpu.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
