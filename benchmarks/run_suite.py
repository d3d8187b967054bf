"""The benchmark suite: gradstats against the plain step, naive autograd and the peers.

For each model of ``models.py`` every method of ``methods.py`` runs the same training step in
one process, interleaved round by round (``harness.py``); the report (``report.py``) gives each
method's median time, its paired ratio to the plain step, the time of ``monitor.step()``, the
peak RSS measured in a fresh subprocess per (model, method), the error of its norms against a
float64 reference, and paired verdicts of gradstats against each peer; then where gradstats' own
time goes, from ``torch.profiler``.

    python benchmarks/run_suite.py                     # everything; writes results/suite_<device>.*
    python benchmarks/run_suite.py --quick             # a smoke run: few rounds, prints only
    python benchmarks/run_suite.py --models mlp,gpt --only gs-,opacus --threads 2
    python benchmarks/run_suite.py --device cuda --out /tmp/results
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import harness, report  # noqa: E402
from benchmarks.methods import Method, max_rel_err, methods_for, reference_norms  # noqa: E402
from benchmarks.models import ModelCase, linear_shapes, make_cases  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: warnings that say nothing about a method's result (shown once here, not per row)
HARMLESS = ("Full backward hook is firing", "does not have an extension for Module")


def _quiet_warnings() -> None:
    for msg in HARMLESS:
        warnings.filterwarnings("ignore", message=msg)


def _first_call(case: ModelCase, m: Method, model, x, y, device):
    """Builds the method's step and calls it once: ``(step or failure, output, warnings)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_warnings()
        step = harness.guard(lambda: m.make(case, model, x, y), device)
        out = None if isinstance(step, str) else harness.guard(
            lambda: (step(), harness.sync(device))[0], device)
    said = list(dict.fromkeys(str(w.message).strip().splitlines()[0].split(" Please file")[0][:240]
                              for w in caught))
    if isinstance(out, str):
        return out, None, said
    return step, out, said


def _strategies(model, x) -> dict[str, str]:
    import gradstats

    seen: dict[tuple[int, int, int], list[str]] = {}
    for name, s in linear_shapes(model, x).items():
        seen.setdefault(s, []).append(name)
    return {f"T={T} {di}x{do}": f"{gradstats.linear_strategy(T=T, d_in=di, d_out=do)} "
            f"({', '.join(n[:3])}{', ...' if len(n) > 3 else ''})"
            for (T, di, do), n in seen.items()}


def _attribute(steps: dict, key: str, name: str, device, calls: int) -> dict:
    """Where gradstats' own time goes in method ``key``, against the plain step."""
    inner = steps[key].inner
    inner.reset()
    out = harness.compare_profiles(steps["plain"], steps[key], device, calls, prefix="gradstats")
    return {"method": name, "key": key, "step_ms": (inner.median or 0.0) * 1e3, **out}


def _memory(case: ModelCase, key: str, args, device) -> object:
    argv = [str(Path(__file__).resolve()), "--memory-child", case.name, key,
            "--device", str(device), "--threads", str(torch.get_num_threads()),
            "--memory-steps", str(args.memory_steps)] + (["--tiny"] if args.tiny else [])
    out = harness.run_json_child(argv)
    return out.get("error", out) if isinstance(out, dict) else out


def measure_case(case: ModelCase, device: torch.device, timing: harness.Timing, args,
                 log=print) -> dict:
    """Times every method on one model; returns the case's result (JSON-ready)."""
    base, x, y = case.instantiate(device)
    R = min(case.ref_examples, case.B)
    t0 = time.perf_counter()
    ref = reference_norms(case, base, x[:R], y[:R])
    log(f"  float64 reference on {R} examples: {time.perf_counter() - t0:.1f} s")
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    meths = [m for m in methods_for(case, strategies=not args.no_strategies)
             if only is None or m.key == "plain" or any(o in m.key for o in only)]

    steps, failures, errs, said = {}, {}, {}, {}
    for m in meths:
        step, out, said[m.key] = _first_call(case, m, copy.deepcopy(base), x, y, device)
        if isinstance(step, str):
            failures[m.key] = step
            log(f"  {m.key:20s} {step}")
            continue
        steps[m.key] = step
        if out is not None:
            errs[m.key] = max_rel_err(out[:R], ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples, late, _ = harness.measure(steps, device, timing)
    failures.update(late)
    plain = samples.get("plain")
    rows = []
    for m in meths:
        row: dict = {"key": m.key, "method": m.name, "family": m.family}
        s = samples.get(m.key)
        if s is None:
            row["time_s"] = failures[m.key]
            rows.append(row)
            continue
        inner = getattr(steps[m.key], "inner", None)
        row.update(time_s=s.median, time_min_s=s.min, spread=s.spread, rounds=len(s.times),
                   samples_s=s.times, other_load=s.other_load, retried_samples=s.retried,
                   ratio_to_plain=report.paired(s.times, plain.times) if plain else None,
                   step_s=inner.median if inner is not None else None,
                   norms_max_rel_err=errs.get(m.key))
        if said.get(m.key):
            row["warnings"] = said[m.key]
        rows.append(row)
        log(f"  {m.key:20s} {s.median * 1e3:9.1f} ms"
            + (f"  x{row['ratio_to_plain']['ratio']:.2f}" if plain else "")
            + (f"  step() {row['step_s'] * 1e3:.1f} ms" if row["step_s"] else "")
            + (f"  err {errs[m.key]:.1e}" if m.key in errs else ""))

    verdicts: dict = {}
    for r in rows:
        if r["family"] == "peer":
            verdicts[r["key"]] = {
                g: report.verdict(samples[g].times, samples[r["key"]].times)
                if g in samples and r["key"] in samples else "n/a"
                for g in report.PAIRED}

    attribution = []
    if not args.no_profile and "plain" in steps:
        for key in report.PAIRED:
            if key in steps:
                name = next(m.name for m in meths if m.key == key)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    a = harness.guard(
                        lambda s=steps, k=key, n=name: _attribute(s, k, n, device, args.profile_steps),
                        device)
                attribution.append(a if isinstance(a, dict) else {"method": name, "error": a})

    for st in steps.values():
        mon = getattr(st, "monitor", None)
        if mon is not None:
            mon.detach()
    del steps
    gc.collect()
    if not args.no_memory:
        for r in rows:
            if isinstance(r["time_s"], float):
                r["memory"] = _memory(case, r["key"], args, device)
                mem = r["memory"]
                log(f"  peak memory {r['key']:20s} " + (
                    f"{mem['peak_rss'] / 2**20:.1f} MiB RSS" if isinstance(mem, dict) else mem))
    return {"model": case.name, "desc": case.desc, "B": case.B, "T": case.T,
            "params": sum(p.numel() for p in base.parameters()), "ref_examples": R,
            "auto_strategies": _strategies(base, x), "rows": rows,
            "verdicts": verdicts, "attribution": attribution}


def memory_child(args, device: torch.device) -> int:
    """In a fresh interpreter: build one (model, method), run a few steps, print the peak.

    One plain step on a throwaway copy of the model comes first, so that what any first
    backward initialises once per process (thread pools, kernel caches) is not counted."""
    model_name, key = args.memory_child
    _quiet_warnings()
    warnings.simplefilter("ignore")
    case = make_cases(tiny=args.tiny)[model_name]
    m = next(m for m in methods_for(case) if m.key == key)
    model, x, y = case.instantiate(device)
    throwaway = copy.deepcopy(model)
    case.loss(throwaway(x), y).backward()
    del throwaway
    out = harness.guard(lambda: harness.peak_memory(m.make(case, model, x, y), device,
                                                    args.memory_steps), device)
    print(json.dumps(out if isinstance(out, dict) else {"error": out}))
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: few rounds, short budgets, 2 memory steps; the tables are "
                        "printed and saved only when --out is given")
    p.add_argument("--models", default=None, metavar="M1,M2",
                   help=f"subset of {','.join(make_cases())} (default: all)")
    p.add_argument("--only", default=None, metavar="K1,K2",
                   help="time only the methods whose key contains one of these (plain always); "
                        "keys: plain, gs-default, gs-fused-nocheck, gs-hooks, gs-fused-<strategy>, "
                        "opacus-ghost, opacus-hooks, vmap, loop, backpack, backpack-var")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, type=Path,
                   help=f"where suite_<device>.json/.md go (default {RESULTS})")
    p.add_argument("--no-save", action="store_true", help="print the tables only")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per method")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--no-strategies", action="store_true",
                   help="leave out the forced-Linear-strategy gradstats variants")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-steps", type=int, default=None,
                   help="steps per peak-memory subprocess (default 3, --quick 2)")
    p.add_argument("--no-profile", action="store_true", help="skip the time attribution")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler")
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes of the same models (tests the machinery; numbers mean little)")
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_steps is None:
        args.memory_steps = 2 if args.quick else 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("run_suite: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False  # like with like against float64
        torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.memory_child:
        return memory_child(args, device)
    _quiet_warnings()

    cases = make_cases(tiny=args.tiny)
    names = [m.strip() for m in args.models.split(",")] if args.models else list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        print(f"run_suite: unknown model(s) {', '.join(unknown)}; choose from {', '.join(cases)}",
              file=sys.stderr)
        return 2
    timing = harness.Timing.quick() if args.quick else harness.Timing()
    if args.rounds:
        timing.rounds = args.rounds
        timing.min_rounds = min(timing.min_rounds, args.rounds)
    meta = report.environment(device, dtype="float32", timing=vars(timing), quick=args.quick,
                              tiny=args.tiny, memory_steps=None if args.no_memory
                              else args.memory_steps)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(f"device: {meta['device_name']} ({device}), torch {meta['torch']}, threads "
        f"{meta['threads']}; gradstats {meta['gradstats_build_info']}; peers {meta['peers']}")
    t0 = time.perf_counter()
    out = []
    for n in names:
        log(f"{n}: {cases[n].desc}")
        out.append(measure_case(cases[n], device, timing, args, log))
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    if hasattr(os, "getloadavg"):
        meta["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    result = {"meta": meta, "cases": out}
    md = report.suite_markdown(result)
    print(md)
    if not args.no_save and (args.out or not args.quick):
        j, m = report.save(args.out or RESULTS, f"suite_{harness.device_tag(device)}", result, md)
        log(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
