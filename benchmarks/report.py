"""Reports: the run header (device, versions, threads, date, git commit), paired ratios and
verdicts from interleaved samples, Markdown tables and the JSON/Markdown files.

Paired comparison (:func:`paired`, :func:`verdict`): sample ``r`` of two callables comes from the
same round of the harness, so the ratio of their times round by round cancels slow drifts of
the machine. ratio = the median of those ratios; spread = their IQR / median. ``a`` is *ahead*
of ``b`` when it was faster in at least three rounds of four (the ratios' upper quartile below
1), *behind* when slower in three of four (lower quartile above 1), else *level*.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import device_name, quartiles

__all__ = ["environment", "header", "paired", "verdict", "fmt_ms", "fmt_x", "fmt_pct", "mib",
           "cell", "table", "save", "profile_tables", "suite_markdown", "PAIRED"]

REPO = Path(__file__).resolve().parent.parent


# ============================================================================ header
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict:
    if not (REPO / ".git").exists():
        return {}
    try:
        def git(*a):
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        return {"commit": git("rev-parse", "--short", "HEAD"),
                "tree_modified": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def environment(device: torch.device, **extra: Any) -> dict:
    """What a result was measured on: device, versions, threads, date, git commit, load."""
    import gradstats

    return {
        "device_name": device_name(device),
        "device": str(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": _git(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gradstats": gradstats.__version__,
        "gradstats_build_info": gradstats.build_info(),
        "peers": {"opacus": _version("opacus"), "backpack": _version("backpack-for-pytorch")},
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "loadavg_before": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg")
        else None,
        **extra,
    }


def header(title: str, meta: dict) -> list[str]:
    """The Markdown title and one bullet per header entry."""
    return [f"# {title} on {meta['device_name']}", ""] + [
        f"- {k}: {v}" for k, v in meta.items() if k != "device_name"] + [""]


# ============================================================================ paired verdicts
def paired(a: list[float], b: list[float]) -> dict:
    """Round-by-round ratios ``a / b`` (the first ``min(len)`` rounds): median and spread."""
    n = min(len(a), len(b))
    if n == 0:
        raise ValueError("paired: no common rounds")
    q1, med, q3 = quartiles([x / y for x, y in zip(a[:n], b[:n])])
    return {"ratio": med, "q1": q1, "q3": q3, "spread": (q3 - q1) / med if med > 0 else 0.0,
            "rounds": n}


def verdict(a: list[float], b: list[float]) -> dict:
    """``a`` against ``b``: paired ratio, ``speedup`` = 1 / ratio, and ahead / level / behind."""
    p = paired(a, b)
    v = "ahead" if p["q3"] < 1 else "behind" if p["q1"] > 1 else "level"
    return {**p, "speedup": 1 / p["ratio"], "verdict": v}


# ============================================================================ formatting
def fmt_ms(t: Any) -> str:
    if t is None:
        return ""
    if isinstance(t, float):
        return f"{t * 1e3:.1f}" if t >= 0.01 else f"{t * 1e3:.3f}"
    return cell(t)


def fmt_x(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}x"


def fmt_pct(x: float | None) -> str:
    return "" if x is None else f"{x:.0%}"


def mib(b: Any) -> str:
    if b is None:
        return ""
    return cell(b) if isinstance(b, str) else f"{b / 2**20:.1f}"


def cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(head: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """A Markdown table; columns in ``right`` are right-aligned."""
    rule = ["---:" if i in right else "---" for i in range(len(head))]
    return ["| " + " | ".join(r) + " |" for r in [head, rule, *rows]] + [""]


def save(out_dir: Path, stem: str, result: dict, markdown: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    j.write_text(json.dumps(result, indent=1, default=str))
    m.write_text(markdown)
    return j, m


# ============================================================================ the suite's report
_INTRO = (
    "Each method runs the same training step (gradients released, forward, mean loss, "
    "backward) and yields every example's squared gradient norm over the whole model in "
    "per-example loss units. time = median over interleaved rounds after warm-up; spread = "
    "IQR/median of the rounds; / plain = the median of the round-by-round ratios to the plain "
    "step, measured side by side in this process; step() = the time of `monitor.step()` "
    "itself (included in time); peak RSS = the resident-set high-water mark above the RSS "
    "before the first step, over a few steps in a fresh subprocess per (model, method); peak "
    "CUDA = `max_memory_allocated` above the allocation before the first step (same "
    "subprocess); norms err = max relative error of the norms against a float64 per-example "
    "autograd reference on the first examples of the batch; other load = cores other processes "
    "kept busy during the samples (/proc/stat). `vmap` and `loop` return the norms only (no "
    "batch gradient in `.grad`).")

_VERDICTS = (
    "Paired verdicts: in each round both were timed, the ratio gradstats time / peer time; "
    "speedup = 1 / its median; ahead = gradstats faster in at least 3 rounds of 4 (upper "
    "quartile of the ratios < 1), behind = slower in 3 of 4, else level; (x%) = IQR/median of "
    "the ratios.")

_GRADSTATS = {"gs-default": "gradstats default", "gs-fused-nocheck": "fused, no check",
              "gs-hooks": "hooks"}
#: the gradstats methods paired with each peer, and whose time is attributed
PAIRED = ("gs-default", "gs-fused-nocheck")


def _ratio(r: dict) -> str:
    p = r.get("ratio_to_plain")
    return "" if not p else f"{p['ratio']:.2f}x ({p['spread']:.0%})"


def _verdict_cell(v: Any) -> str:
    if not isinstance(v, dict):
        return cell(v or "")
    return f"{v['verdict']} {v['speedup']:.2f}x ({v['spread']:.0%})"


def _summary(cases: list[dict]) -> list[str]:
    head = ["model", "plain (ms)"]
    for name in _GRADSTATS.values():
        head += [name, "step() (ms)"]
    rows = []
    for c in cases:
        by = {r["key"]: r for r in c["rows"]}
        plain = by.get("plain", {}).get("time_s")
        row = [c["model"], fmt_ms(plain)]
        for k in _GRADSTATS:
            r = by.get(k)
            if r is None:
                row += ["", ""]
            elif isinstance(r["time_s"], float):
                row += [_ratio(r), fmt_ms(r.get("step_s"))]
            else:
                row += [cell(r["time_s"]), ""]
        rows.append(row)
    return (["## gradstats against the plain step", "",
             "Ratio to the plain step (the median of the round-by-round ratios; (x%) = their "
             "IQR/median) and the time of `monitor.step()` itself.", ""]
            + table(head, rows, right=set(range(1, len(head)))))


def _peers(cases: list[dict]) -> list[str]:
    rows = []
    for c in cases:
        for r in c["rows"]:
            if r["family"] != "peer":
                continue
            timed = isinstance(r["time_s"], float)
            vs = c.get("verdicts", {}).get(r["key"], {})
            rows.append([c["model"], r["method"], fmt_ms(r["time_s"]), _ratio(r) if timed else "",
                         *(_verdict_cell(vs.get(g)) if timed else "" for g in PAIRED)])
    head = ["model", "peer", "peer (ms)", "peer / plain"] + [
        f"{_GRADSTATS[g]} vs peer" for g in PAIRED]
    return ["## gradstats against each peer", "", _VERDICTS, ""] + table(head, rows, {2, 3})


def _case(c: dict, cuda: bool) -> list[str]:
    L = [f"## {c['model']}: {c['desc']}", "",
         f"{c['params'] / 1e6:.2f} M parameters; norms reference on {c['ref_examples']} "
         "examples. `auto` Linear strategy per layer shape (T, d_in x d_out; a convolution as "
         "its unfolded Linear): "
         + "; ".join(f"{k}: {v}" for k, v in c["auto_strategies"].items()), ""]
    head = ["method", "time (ms)", "spread", "/ plain", "step() (ms)", "step() / plain",
            "peak RSS (MiB)"] + (["peak CUDA (MiB)"] if cuda else []) + [
            "norms err", "rounds", "other load"]
    rows = []
    plain = next((r["time_s"] for r in c["rows"] if r["key"] == "plain"), None)
    for r in c["rows"]:
        mem = r.get("memory")
        rss = mem.get("peak_rss") if isinstance(mem, dict) else mem
        dev = [mib(mem.get("cuda_peak") if isinstance(mem, dict) else mem)] if cuda else []
        if not isinstance(r["time_s"], float):
            rows.append([r["method"], cell(r["time_s"])] + [""] * (len(head) - 2))
            continue
        step = r.get("step_s")
        rows.append([r["method"], fmt_ms(r["time_s"]), fmt_pct(r["spread"]),
                     fmt_x((r.get("ratio_to_plain") or {}).get("ratio")), fmt_ms(step),
                     fmt_x(step / plain if step and isinstance(plain, float) else None),
                     mib(rss), *dev,
                     "" if r.get("norms_max_rel_err") is None else f"{r['norms_max_rel_err']:.1e}",
                     str(r["rounds"]), "" if r.get("other_load") is None
                     else f"{r['other_load']:.2f}"])
    L += table(head, rows, right=set(range(1, len(head))))
    notes = [f"- {r['method']}: warned: {cell(w)}"
             for r in c["rows"] for w in r.get("warnings", [])]
    return L + (notes + [""] if notes else [])


def profile_tables(a: dict, base: str = "plain") -> list[str]:
    """The tables of one :func:`harness.compare_profiles` result."""
    rows = [[cell(o["op"]), f"{o['calls']:.0f}", f"{o['cpu_ms']:.2f}", f"{o['device_ms']:.2f}"]
            for o in a["ours"]]
    L = table(["gradstats op", "calls / step", "CPU ms / step (incl.)", "device ms / step"],
              rows or [["(none ran)", "", "", ""]], {1, 2, 3})
    rows = [[cell(o["op"]), f"{o['extra_self_ms']:+.2f}", f"{o['calls']:.0f}",
             f"{o['base_calls']:.0f}"] for o in a["extra_ops"]]
    return L + table([f"op (largest extra self time vs {base})", "ms / step", "calls / step",
                      f"{base} calls / step"], rows, {1, 2, 3})


def _attribution(c: dict) -> list[str]:
    L = []
    for a in c.get("attribution", []):
        if isinstance(a.get("error"), str):
            L += [f"- {c['model']}, {a['method']}: {a['error']}", ""]
            continue
        L += [f"**{c['model']}, {a['method']}**: under the profiler plain {a['base_ms']:.1f} ms, "
              f"gradstats {a['fn_ms']:.1f} ms per step; `monitor.step()` {a['step_ms']:.1f} ms "
              "(measured directly).", ""] + profile_tables(a)
    return L


def suite_markdown(result: dict) -> str:
    cuda = result["meta"]["device"].startswith("cuda")
    L = header("gradstats benchmark suite", result["meta"]) + [_INTRO, ""]
    L += _summary(result["cases"]) + _peers(result["cases"])
    for c in result["cases"]:
        L += _case(c, cuda)
    att = [line for c in result["cases"] for line in _attribution(c)]
    if att:
        L += ["## Where gradstats' own time goes", "",
              "From a separate run of a few steps under `torch.profiler` (which slows every op a "
              "little), events aggregated by name: the gradstats ops under their own names "
              "(time including the ops they call), then the ops whose total self time grew most "
              "against the plain step's (extra kernels, copies, hook-side work).", ""] + att
    return "\n".join(L)
