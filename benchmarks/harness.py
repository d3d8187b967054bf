"""The one timing harness every benchmark script uses.

Timing. :func:`measure` warms each callable up (the warm-up call also tells an out-of-memory, an
unsupported layer or an error, reported as a string, never as a number), then runs interleaved
rounds (:func:`timed_rounds`): in every round each callable takes its turn, in an order shuffled
per round, so load from other processes and clock changes fall on all alike, and sample ``r`` of
every callable comes from round ``r`` (two callables can be compared round by round: the paired
ratios of ``report.paired``). A sample is the median of a block of calls lasting at least
``Timing.min_sample_s``. Each call is timed with CUDA events on a GPU, ``perf_counter`` on CPU.
On CPU a sample during which other processes kept more than ``Timing.max_contention`` cores busy
(read from ``/proc/stat``) is taken again, up to ``Timing.retries`` times, and the least
contended try is kept. A callable slower than ``budget_s / rounds`` per call gets fewer rounds
(at least ``min_rounds``).

A callable may carry a :class:`Stopwatch` as ``fn.inner`` to time a part of itself (the suite
times ``monitor.step()`` this way); it is reset after the warm-up, so it holds the timed calls.

Memory. :func:`peak_memory` measures one process's peak during a few calls: the resident-set
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` where the kernel allows)
minus the resident set before the first call, and on CUDA ``max_memory_allocated`` above what
was allocated before. :func:`run_json_child` runs such a measurement in a fresh interpreter
(``sys.executable``), so that nothing another method allocated or cached can hide in the number.

Attribution. :func:`profile_ops` runs a callable under ``torch.profiler`` and aggregates the
events by name (custom ops appear under their own ``namespace::name``).
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Unsupported", "Timing", "Samples", "Stopwatch", "sync", "time_call", "guard",
           "measure", "timed_rounds", "quartiles", "peak_memory", "run_json_child",
           "profile_ops", "compare_profiles", "device_name", "device_tag"]

Outcome = Any  # a value, or a string saying why there is none ("OOM", "unsupported: ...")


class Unsupported(Exception):
    """The method cannot run on this model or in this build (the message says why)."""


# ============================================================================ one call
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call of ``fn`` (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Stopwatch:
    """Times a part of a call: ``with sw: ...`` appends its seconds to ``sw.times``."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []
        self._start: Any = None

    def __enter__(self) -> Stopwatch:
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
            stop.synchronize()
            self.times.append(self._start.elapsed_time(stop) / 1e3)
        else:
            self.times.append(time.perf_counter() - self._start)

    def reset(self) -> None:
        self.times = []

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return (isinstance(e, (torch.OutOfMemoryError, MemoryError))
            or "out of memory" in text or "can't allocate memory" in text)


def describe_failure(e: BaseException) -> str:
    """What a failed call is reported as."""
    if isinstance(e, Unsupported):
        msg = str(e)
        return msg if msg.startswith(("unsupported", "unavailable", "skipped")) else \
            f"unsupported: {msg}"
    if _is_oom(e):
        return "OOM"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {first[:200]}"


def guard(fn: Callable[[], Any], device: torch.device) -> Outcome:
    """``fn()``, or the string :func:`describe_failure` gives for what it raised."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every failure is reported, never a number
        return describe_failure(e)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ============================================================================ rounds
@dataclass
class Timing:
    """How much to time (see the module docstring)."""

    rounds: int = 9
    min_rounds: int = 3
    warmup: int = 1
    min_sample_s: float = 0.1
    budget_s: float = 8.0
    max_contention: float = 0.25
    retries: int = 3

    @classmethod
    def quick(cls) -> Timing:
        """A smoke run: few rounds, no retries, short budgets."""
        return cls(rounds=3, min_rounds=3, warmup=1, min_sample_s=0.05, budget_s=2.0, retries=0)


def quartiles(v: list[float]) -> tuple[float, float, float]:
    """(lower quartile, median, upper quartile), within the data's range."""
    med = statistics.median(v)
    if len(v) < 2:
        return med, med, med
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], med, q[2]


@dataclass
class Samples:
    """One callable's samples: ``times[r]`` from round ``r``; ``loads`` the cores other
    processes kept busy during each (CPU); ``retried`` samples taken again for contention."""

    times: list[float]
    loads: list[float] = field(default_factory=list)
    retried: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def spread(self) -> float:
        """IQR / median of the samples."""
        q1, med, q3 = quartiles(self.times)
        return (q3 - q1) / med if med > 0 else 0.0

    @property
    def other_load(self) -> float | None:
        return statistics.mean(self.loads) if self.loads else None


_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process), or None where unreadable."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # less idle and iowait
        with open("/proc/self/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        return busy, int(st[11]) + int(st[12])  # utime + stime of all threads
    except (OSError, ValueError, IndexError):
        return None


def _sample(fn: Callable[[], Any], device: torch.device, min_s: float, reps: int
            ) -> tuple[float, float | None]:
    """(median seconds per call over a block of calls, cores other processes kept busy)."""
    before, t0 = _cpu_ticks(), time.perf_counter()
    ts = [time_call(fn, device) for _ in range(reps)]
    while sum(ts) < min_s and len(ts) < 50:
        ts.append(time_call(fn, device))
    wall, after = time.perf_counter() - t0, _cpu_ticks()
    load = None
    if before is not None and after is not None and wall > 0:
        load = max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / _CLK / wall)
    return statistics.median(ts), load


def timed_rounds(fns: dict[str, Callable[[], Any]], first: dict[str, float],
                 device: torch.device, timing: Timing) -> dict[str, Samples]:
    """Interleaved rounds (see the module docstring); ``first`` is each callable's warm time."""
    out = {k: Samples([]) for k in fns}
    quota = {k: max(timing.min_rounds,
                    min(timing.rounds, int(timing.budget_s / max(first[k], 1e-9))))
             for k in fns}
    order = list(fns)
    check = device.type == "cpu" and _cpu_ticks() is not None
    for r in range(timing.rounds):
        random.Random(r).shuffle(order)
        for k in order:
            if r >= quota[k]:
                continue
            reps = max(1, min(50, math.ceil(timing.min_sample_s / max(first[k], 1e-6))))
            best = _sample(fns[k], device, timing.min_sample_s, reps)
            tries = 0
            while (check and best[1] is not None and best[1] > timing.max_contention
                   and tries < timing.retries):
                tries += 1
                again = _sample(fns[k], device, timing.min_sample_s, reps)
                if again[1] is not None and again[1] < best[1]:
                    best = again
            out[k].retried += tries
            out[k].times.append(best[0])
            if best[1] is not None:
                out[k].loads.append(best[1])
    return out


def measure(fns: dict[str, Callable[[], Any]], device: torch.device, timing: Timing,
            too_slow_s: float = math.inf):
    """Warm-up, then :func:`timed_rounds` of the callables that ran.

    Returns ``(samples, failures, outputs)``: :class:`Samples` per callable that ran,
    the reason per callable that did not (or that took longer than ``too_slow_s`` per call),
    and each callable's output of its last warm-up call."""
    first: dict[str, float] = {}
    failures: dict[str, str] = {}
    outputs: dict[str, Any] = {}
    for k, fn in fns.items():
        for _ in range(max(1, timing.warmup)):
            out = guard(lambda fn=fn: (fn(), sync(device))[0], device)
            if isinstance(out, str):
                failures[k] = out
                break
            outputs[k] = out
        if k in failures:
            continue
        t = guard(lambda fn=fn: time_call(fn, device), device)
        if isinstance(t, str):
            failures[k] = t
        elif t > too_slow_s:
            failures[k] = f"too slow ({t:.1f} s per call)"
        else:
            first[k] = t
    live = {k: fns[k] for k in first}
    for fn in live.values():
        inner = getattr(fn, "inner", None)
        if isinstance(inner, Stopwatch):
            inner.reset()
    return timed_rounds(live, first, device, timing), failures, outputs


# ============================================================================ memory
_LIBC: Any = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_hwm() -> bool:
    """Resets VmHWM to the current RSS (``/proc/self/clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device, calls: int = 3) -> dict:
    """Peak memory of ``calls`` calls of ``fn`` above the footprint before the first
    (bytes): ``peak_rss`` = VmHWM - VmRSS before; ``cuda_peak`` on CUDA."""
    gc.collect()
    _malloc_trim()
    out: dict[str, Any] = {"calls": calls}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        cuda_base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss = _proc_status()["VmRSS"]
    out["hwm_reset"] = _reset_hwm()
    for _ in range(calls):
        fn()
        sync(device)
    st = _proc_status()
    out.update(rss_before=rss, vmhwm=st["VmHWM"], peak_rss=max(0, st["VmHWM"] - rss))
    if device.type == "cuda":
        out["cuda_peak"] = max(0, torch.cuda.max_memory_allocated(device) - cuda_base)
    return out


def run_json_child(argv: list[str], timeout_s: float = 900.0) -> Outcome:
    """Runs ``sys.executable argv...``; returns the JSON object its last stdout line holds
    (a string naming the failure when there is none)."""
    try:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"error: timed out after {timeout_s:.0f} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    return f"error: exit {proc.returncode}: {tail[:200]}"


# ============================================================================ attribution
def profile_ops(fn: Callable[[], Any], device: torch.device, calls: int = 3) -> dict:
    """``calls`` calls of ``fn`` under ``torch.profiler``: ``{"wall_ms": per call, "ops":
    {name: {calls, cpu_ms, self_cpu_ms, device_ms}}}``, every number per call of ``fn``
    (``cpu_ms`` includes what the op called; ``device_ms`` is 0 on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        wall = time.perf_counter() - t0
    ops = {}
    for e in prof.key_averages():
        dev = getattr(e, "device_time_total", None)
        if dev is None:
            dev = getattr(e, "cuda_time_total", 0.0)
        ops[e.key] = {"calls": e.count / calls, "cpu_ms": e.cpu_time_total / 1e3 / calls,
                      "self_cpu_ms": e.self_cpu_time_total / 1e3 / calls,
                      "device_ms": (dev or 0.0) / 1e3 / calls}
    return {"wall_ms": wall / calls * 1e3, "ops": ops}


def _mean_profile(profiles: list[dict]) -> dict:
    """The mean of single-call profiles (:func:`profile_ops` with ``calls=1``)."""
    n, ops = len(profiles), {}
    for p in profiles:
        for k, v in p["ops"].items():
            acc = ops.setdefault(k, dict.fromkeys(v, 0.0))
            for f, x in v.items():
                acc[f] += x / n
    return {"wall_ms": sum(p["wall_ms"] for p in profiles) / n, "ops": ops}


def compare_profiles(base: Callable[[], Any], fn: Callable[[], Any], device: torch.device,
                     calls: int = 3, prefix: str = "", top: int = 8) -> dict:
    """One call of ``base`` and one of ``fn`` in turn, ``calls`` times, each under the profiler
    (load from other processes falls on both alike). Returns per call: both wall times, the ops
    of ``fn`` whose name starts with ``prefix`` (``ours``, by time), and the ``top`` other ops
    whose self time grew most against ``base`` (``extra_ops``, with ``base_calls``)."""
    runs = [(profile_ops(base, device, 1), profile_ops(fn, device, 1)) for _ in range(calls)]
    b, f = _mean_profile([r for r, _ in runs]), _mean_profile([r for _, r in runs])
    ours = [{"op": k, **v} for k, v in f["ops"].items() if prefix and k.startswith(prefix)]
    extra = []
    for k, v in f["ops"].items():
        p = b["ops"].get(k, {"self_cpu_ms": 0.0, "calls": 0.0})
        if not (prefix and k.startswith(prefix)) and v["self_cpu_ms"] > p["self_cpu_ms"]:
            extra.append({"op": k, "extra_self_ms": v["self_cpu_ms"] - p["self_cpu_ms"],
                          "calls": v["calls"], "base_calls": p["calls"]})
    extra.sort(key=lambda o: -o["extra_self_ms"])
    return {"base_ms": b["wall_ms"], "fn_ms": f["wall_ms"], "calls": calls,
            "ours": sorted(ours, key=lambda o: -o["cpu_ms"]), "extra_ops": extra[:top]}


# ============================================================================ the device
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(device: torch.device) -> str:
    """``cpu`` or ``cuda-<gpu name>``, for file names."""
    if device.type == "cpu":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()
                            .replace("nvidia", "")).strip("-")
