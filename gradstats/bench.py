"""``gradstats bench``: gradstats against naive autograd and the peers, in one process.

For each model (an MLP with T = 1; a transformer stack with GPT-2-small shapes; a small CNN) every
method runs the same training step -- zero the gradients, forward, mean loss, backward -- and
returns each example's squared gradient norm over the whole model, in per-example loss units
(the gradient of example ``i``'s own loss):

  plain             forward + backward only, the baseline every ratio is taken against
  gradstats ...     :class:`~gradstats.GradStatsMonitor` in hooks and fused mode, with the Linear
                    strategy chosen by the cost model (``auto``) or forced (``gram``, ``direct``,
                    ``outer``) on every layer; the time includes ``monitor.step()`` (statistics,
                    contract probe)
  loop              a per-example autograd loop (``torch.autograd.grad`` of each example's loss)
  vmap              ``torch.func.vmap(grad(functional_call))`` with ``chunk_size``; each chunk's
                    per-example gradients are reduced to their squared norms inside the vmapped
                    function, so chunking does bound the peak memory
  opacus            Opacus ``GradSampleModule`` (hooks; ``p.grad_sample`` -> norms)
  opacus ghost      Opacus ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)``,
                    ``get_norm_sample()`` after one backward
  backpack          BackPACK ``extend`` + ``BatchL2Grad`` (+ ``Variance``): sum of ``batch_l2``

``loop`` and ``vmap`` return the norms only (no batch gradient in ``.grad``): a head start.
Opacus needs ``nn.MultiheadAttention`` replaced by its ``DPMultiheadAttention``
(``ModuleValidator.fix``, the documented route; same function, weights copied).

Per method: median time per step over interleaved rounds after warm-up (methods take turns in a
shuffled order each round, so load from other processes falls on all alike; CUDA events on a
GPU), spread = IQR / median of those rounds, ratio to plain, throughput (examples/s), peak memory
and the max relative error of the norms against a float64 per-example autograd reference on the
first examples of the same batch. Out-of-memory and unsupported layers are reported as strings,
never as numbers.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the
step. On CPU the peak resident set size of this process during one step above its resident set
before it: the kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs``
(``5``) after ``gc.collect()`` and glibc ``malloc_trim(0)``, with the method's gradients and
per-example buffers of the previous step released first, so every method starts from the model,
its wrappers and the batch alone.

Micro-benchmarks time the Linear kernels (each strategy and ``auto``, norms-only and fused with
dW) against the plain weight-gradient GEMM over a grid of ``(B, T, d_in, d_out)``.

    gradstats bench                     # everything; writes benchmarks/results/suite_<device>.*
    gradstats bench --quick             # a smoke run (small models, few rounds), prints only
    gradstats bench --models mlp,cnn --no-micro
    python benchmarks/run_suite.py ...  # the same
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime as dt
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
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HELP", "ModelCase", "make_cases", "METHODS", "run_suite", "markdown",
           "add_arguments", "run_cli", "main"]

HELP = ("benchmark per-example gradient norms: gradstats (hooks, fused, each strategy) against "
        "plain backward, a per-example autograd loop, torch.func vmap, Opacus and BackPACK")

Outcome = Any  # float seconds, or a string ("OOM", "unsupported: ...", "error: ...")


class Unsupported(Exception):
    """The method cannot measure this model (named reason)."""


# ============================================================================ models
class MLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear on ``[B, d_in]`` (T = 1)."""

    def __init__(self, d_in: int = 1024, hidden: int = 1024, classes: int = 10):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(d_in, hidden), nn.Linear(hidden, hidden),
                                        nn.Linear(hidden, classes))

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN GPT-2 block: LayerNorm, nn.MultiheadAttention (causal when asked), LayerNorm,
    MLP (GELU)."""

    def __init__(self, d: int, heads: int, d_mlp: int, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=0.0, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d_mlp)
        self.proj = nn.Linear(d_mlp, d)

    def forward(self, x):
        T = x.shape[1]
        mask = (torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1) if self.causal
                else None)  # True = masked
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2-shaped language model: token and (learned) position embeddings, ``layers`` blocks,
    final LayerNorm, untied head. Position ids are ``[B, T]`` (contiguous) so that every tool sees
    the batch dimension first.

    Not causal by default: Opacus's DPMultiheadAttention (what Opacus swaps nn.MultiheadAttention
    for) rejects any ``attn_mask`` under ``batch_first=True`` (its size check reads the batch dim
    as the target length) and has no ``is_causal``. The mask changes no per-example method's
    cost; ``causal=True`` builds the GPT-2 masking for the tools that take it."""

    def __init__(self, vocab: int, ctx: int, d: int = 768, heads: int = 12, d_mlp: int = 3072,
                 layers: int = 12, causal: bool = False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads, d_mlp, causal) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device).repeat(B, 1)
        x = self.tok(ids) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class CNN(nn.Module):
    """Conv2d-GroupNorm-ReLU-Conv2d(stride 2)-ReLU-Linear on ``[B, 3, 32, 32]``."""

    def __init__(self, c1: int = 32, c2: int = 64, classes: int = 10, hw: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.norm = nn.GroupNorm(8, c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.fc = nn.Linear(c2 * (hw // 2) ** 2, classes)

    def forward(self, x):
        x = F.relu(self.norm(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).flatten(1))


def _ce_per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B]`` per-example losses: cross-entropy, averaged over positions for sequence models."""
    if logits.dim() == 3:
        B, T, V = logits.shape
        return F.cross_entropy(logits.reshape(B * T, V), y.reshape(B * T),
                               reduction="none").view(B, T).mean(1)
    return F.cross_entropy(logits, y, reduction="none")


@dataclass
class ModelCase:
    """One benchmarked model: how to build it (seeded), its batch, and its per-example loss.
    The batch loss is the mean of the per-example losses (mean cross-entropy over all tokens for
    the language model, the same thing with equal T)."""

    name: str
    desc: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    B: int
    T: int
    strategies: tuple[str, ...] = ("auto", "gram", "direct")
    vmap_chunk: int = 16
    ref_examples: int = 8

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _ce_per_example(out, y).mean()


def make_cases(device: torch.device, quick: bool = False, gpu_full: bool | None = None
               ) -> dict[str, ModelCase]:
    """The models. On CUDA the transformer is the full GPT-2 small (12 blocks, vocab 50257,
    T = 1024) unless ``gpu_full=False``; on CPU 2 blocks with T = 128, a 4096-token vocabulary and
    a batch of 8 (``quick``: smaller everything)."""
    full = device.type == "cuda" if gpu_full is None else gpu_full
    if quick:
        mlp = dict(B=32, d=128)
        gpt = dict(B=2, T=16, vocab=256, layers=1, d=64, heads=4, d_mlp=256)
        cnn = dict(B=8, c1=8, c2=16, hw=16)
    else:
        mlp = dict(B=256, d=1024)
        gpt = (dict(B=8, T=1024, vocab=50257, layers=12, d=768, heads=12, d_mlp=3072) if full
               else dict(B=8, T=128, vocab=4096, layers=2, d=768, heads=12, d_mlp=3072))
        cnn = dict(B=64, c1=32, c2=64, hw=32)

    def mlp_batch(gen):
        x = torch.randn(mlp["B"], mlp["d"], generator=gen)
        return x, torch.randint(0, 10, (mlp["B"],), generator=gen)

    def gpt_batch(gen):
        ids = torch.randint(0, gpt["vocab"], (gpt["B"], gpt["T"] + 1), generator=gen)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def cnn_batch(gen):
        x = torch.randn(cnn["B"], 3, cnn["hw"], cnn["hw"], generator=gen)
        return x, torch.randint(0, 10, (cnn["B"],), generator=gen)

    g = gpt
    full_gpt2 = g["layers"] == 12 and g["vocab"] == 50257
    gpt_desc = (f"{'GPT-2 small' if full_gpt2 else 'GPT-2-small-shaped'}: {g['layers']} "
                f"blocks, d={g['d']}, {g['heads']} heads, MLP {g['d_mlp']}, "
                f"vocab {g['vocab']}, T={g['T']}, B={g['B']}")
    return {
        "mlp": ModelCase(
            "mlp", f"MLP {mlp['d']}-{mlp['d']}-{mlp['d']}-10 (T=1), B={mlp['B']}",
            lambda: MLP(mlp["d"], mlp["d"]), mlp_batch, mlp["B"], 1,
            strategies=("auto", "outer", "gram", "direct"), vmap_chunk=64,
            ref_examples=16),
        "transformer": ModelCase(
            "transformer", gpt_desc,
            lambda: GPT(g["vocab"], g["T"], g["d"], g["heads"], g["d_mlp"], g["layers"]),
            gpt_batch, g["B"], g["T"], vmap_chunk=4 if full else 8, ref_examples=4),
        "cnn": ModelCase(
            "cnn", f"CNN conv3x3({cnn['c1']})-GroupNorm-ReLU-conv3x3/2({cnn['c2']})-ReLU-Linear "
                   f"on {cnn['hw']}x{cnn['hw']}x3, B={cnn['B']}",
            lambda: CNN(cnn["c1"], cnn["c2"], 10, cnn["hw"]), cnn_batch, cnn["B"],
            (cnn["hw"]) ** 2, ref_examples=8),
    }


# ============================================================================ methods
def _clear(model: nn.Module) -> None:
    """Releases the gradients and whatever per-example state a tool left on the parameters."""
    for p in model.parameters():
        p.grad = None
        if getattr(p, "grad_sample", None) is not None:
            p.grad_sample = None
        for attr in ("_norm_sample", "batch_l2", "variance"):
            if hasattr(p, attr):
                delattr(p, attr)


@contextlib.contextmanager
def forced_strategy(strategy: str):
    """Makes every rule's ``linear_norms`` / ``linear_fused`` call use ``strategy`` (``outer``
    only where T = 1, the rest ``auto``). The monitor has no public strategy knob: benchmarks
    only."""
    from . import _ops

    if strategy == "auto":
        yield
        return
    norms, fused = _ops.linear_norms, _ops.linear_fused

    def pick(A):
        if strategy != "outer":
            return strategy
        T = A.numel() // (A.shape[0] * A.shape[-1]) if A.shape[0] else 1
        return "outer" if T == 1 else "auto"

    _ops.linear_norms = lambda A, G, s="auto": norms(A, G, pick(A))
    _ops.linear_fused = lambda A, G, s="auto": fused(A, G, pick(A))
    try:
        yield
    finally:
        _ops.linear_norms, _ops.linear_fused = norms, fused


Step = Callable[[], "torch.Tensor | None"]


def m_plain(case: ModelCase, model: nn.Module, x, y) -> Step:
    def step():
        _clear(model)
        case.loss(model(x), y).backward()
        return None
    return step


def m_gradstats(mode: str, strategy: str, check_contract: bool = True):
    def make(case: ModelCase, model: nn.Module, x, y) -> Step:
        from .monitor import GradStatsMonitor

        mon = GradStatsMonitor(model, mode=mode, loss_reduction="mean", unsupported="error",
                               check_contract=check_contract)

        def step():
            with forced_strategy(strategy):
                _clear(model)
                case.loss(model(x), y).backward()
                return mon.step().per_example_sq_norms
        step.monitor = mon  # type: ignore[attr-defined]
        return step
    return make


def m_loop(case: ModelCase, model: nn.Module, x, y) -> Step:
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
        for i in range(x.shape[0]):
            gs = torch.autograd.grad(case.loss(model(x[i:i + 1]), y[i:i + 1]), params)
            out[i] = torch.stack([g.square().sum() for g in gs]).sum()
        return out
    return step


def m_vmap(case: ModelCase, model: nn.Module, x, y) -> Step:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def sq_norm(p, xi, yi):
        g = grad(lambda q: case.loss(functional_call(model, q, (xi.unsqueeze(0),)),
                                     yi.unsqueeze(0)))(p)
        return torch.stack([v.square().sum() for v in g.values()]).sum()

    f = vmap(sq_norm, in_dims=(None, 0, 0), chunk_size=min(case.vmap_chunk, x.shape[0]))

    def step():
        return f(params, x, y)
    return step


def _opacus_model(model: nn.Module) -> nn.Module:
    try:
        from opacus.validators import ModuleValidator
    except ImportError as e:
        raise Unsupported(f"opacus not installed ({e})") from None
    if not ModuleValidator.is_valid(model):
        model = ModuleValidator.fix(model)  # nn.MultiheadAttention -> DPMultiheadAttention
        errs = ModuleValidator.validate(model, strict=False)
        if errs:
            raise Unsupported("opacus: " + "; ".join(str(e) for e in errs[:2]))
    return model


def m_opacus(case: ModelCase, model: nn.Module, x, y) -> Step:
    m = _opacus_model(model)
    from opacus import GradSampleModule

    gsm = GradSampleModule(m, batch_first=True, loss_reduction="mean")
    params = [p for p in gsm.parameters() if p.requires_grad]

    def step():
        gsm.zero_grad(set_to_none=True)
        _clear(gsm)
        case.loss(gsm(x), y).backward()
        return torch.stack([p.grad_sample.reshape(len(p.grad_sample), -1).square().sum(1)
                            for p in params]).sum(0)
    return step


def m_opacus_ghost(case: ModelCase, model: nn.Module, x, y) -> Step:
    m = _opacus_model(model)
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(m, batch_first=True, loss_reduction="mean",
                                               use_ghost_clipping=True, max_grad_norm=1.0)

    def step():
        gsm.zero_grad(set_to_none=True)
        _clear(gsm)
        case.loss(gsm(x), y).backward()
        return gsm.get_norm_sample().square()
    return step


def m_backpack(variance: bool):
    def make(case: ModelCase, model: nn.Module, x, y) -> Step:
        try:
            from backpack import backpack, extend
            from backpack.extensions import BatchL2Grad, Variance
        except ImportError as e:
            raise Unsupported(f"backpack-for-pytorch not installed ({e})") from None
        m = extend(model)
        exts = (BatchL2Grad(), Variance()) if variance else (BatchL2Grad(),)
        params = [p for p in m.parameters() if p.requires_grad]
        B = x.shape[0]

        def run():
            _clear(m)
            with backpack(*exts):
                case.loss(m(x), y).backward()
            # mean loss: BackPACK's per-example quantities carry its 1/B
            return torch.stack([p.batch_l2 for p in params]).sum(0) * (B * B)

        _clear(m)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with backpack(*exts):
                    case.loss(m(x), y).backward()
            except NotImplementedError as e:
                raise Unsupported(f"BackPACK: {e}") from None
        skipped = [mt.group(1) for w in caught if "does not have an extension" in str(w.message)
                   for mt in [re.search(r"Module (\w+)", str(w.message))] if mt]
        missing = [type(mod).__name__ for mod in m.modules()
                   if any(p.requires_grad for p in mod.parameters(recurse=False))
                   and not all(hasattr(p, "batch_l2") for p in mod.parameters(recurse=False))]
        _clear(m)
        if skipped or missing:
            names = ", ".join(dict.fromkeys(skipped + missing))
            raise Unsupported(f"BackPACK has no BatchL2Grad/Variance extension for {names} "
                              "(it skips such layers with a warning, so the whole-model norm "
                              "would be undercounted)")
        return run
    return make


_OPACUS_SWAP = ("ModuleValidator.fix swaps nn.MultiheadAttention for Opacus's "
                "DPMultiheadAttention, which under batch_first=True reshapes its [B*H, T, hd] "
                "attention output with .view(B, T, E), mixing heads and positions (seen in "
                "opacus 1.6.0): the cost is that of the same layer shapes")


@dataclass
class Method:
    name: str
    family: str  # "baseline", "gradstats", "peer"
    make: Callable[..., Step]
    user_selectable: bool = True  # a configuration a user can pick (forced strategies are not)
    #: the model the tool actually runs, when it swaps layers (its norms are checked against a
    #: float64 reference of that model, and a different function is reported)
    runs_model: Callable[[nn.Module], nn.Module] | None = None
    #: what the swap is, said when the swapped model computes a different function
    swap_note: str = ""


def methods_for(case: ModelCase, probe_variant: bool = True) -> list[Method]:
    out = [Method("plain fwd+bwd", "baseline", m_plain)]
    for mode in ("hooks", "fused"):
        for s in case.strategies:
            out.append(Method(f"gradstats {mode}[{s}]", "gradstats", m_gradstats(mode, s),
                              user_selectable=s == "auto"))
    if probe_variant:
        for mode in ("hooks", "fused"):
            out.append(Method(f"gradstats {mode}[auto] no probe", "gradstats",
                              m_gradstats(mode, "auto", check_contract=False)))
    out += [
        Method("loop (autograd per example)", "peer", m_loop),
        Method(f"vmap(grad) chunk {case.vmap_chunk}", "peer", m_vmap),
        Method("opacus (hooks)", "peer", m_opacus, runs_model=_opacus_model,
               swap_note=_OPACUS_SWAP),
        Method("opacus ghost", "peer", m_opacus_ghost, runs_model=_opacus_model,
               swap_note=_OPACUS_SWAP),
        Method("backpack BatchL2Grad", "peer", m_backpack(False)),
        Method("backpack BatchL2Grad+Variance", "peer", m_backpack(True)),
    ]
    return out


METHODS = methods_for  # the list for a case


# ============================================================================ measurement
def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call (CUDA events on a GPU)."""
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


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, (RuntimeError, MemoryError)) and (
            "out of memory" in str(e).lower() or isinstance(e, MemoryError)
            or "can't allocate memory" in str(e).lower()))


def _guard(fn: Callable[[], Any], device: torch.device) -> Outcome:
    """Calls fn; returns its value, or a string naming why it could not run."""
    try:
        return fn()
    except Unsupported as e:
        return f"unsupported: {e}"
    except Exception as e:  # noqa: BLE001 - every failure is reported, never a number
        if _is_oom(e):
            return "OOM"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"unsupported: {type(e).__name__}: {msg[:160]}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status()
        return True
    except OSError:
        return False


def peak_memory(step: Step, model: nn.Module, device: torch.device) -> Outcome:
    """Bytes above the pre-step footprint at the peak of one step (see the module docstring)."""
    _clear(model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = _guard(step, device)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        _malloc_trim()
        base = _proc_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = _guard(step, device)
        peak = _proc_status()["VmHWM"] - base
    _clear(model)
    if isinstance(out, str):
        return out
    return max(0, peak)


@dataclass
class Timing:
    """``rounds`` interleaved rounds (a method slower than ``budget_s / rounds`` per call gets
    fewer, at least ``min_rounds``); in each round a method is called until ``min_sample_s`` has
    passed and the sample is its median call. On CPU a sample during which other processes kept
    more than ``max_contention`` cores busy (from /proc/stat) is taken again, up to
    ``retries`` times, and the least contended try is kept. Sample ``r`` of every method comes
    from round ``r``, so two methods can be compared round by round (:func:`compare`)."""

    rounds: int = 7
    min_rounds: int = 3
    warmup: int = 1
    min_sample_s: float = 0.0
    budget_s: float = 60.0
    max_contention: float = 0.25
    retries: int = 3


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


def _sample(fn: Step, device: torch.device, min_s: float, reps_hint: int
            ) -> tuple[float, float | None]:
    """(median seconds per call over a block of calls, cores other processes kept busy)."""
    before, t0 = _cpu_ticks(), time.perf_counter()
    ts = [time_call(fn, device) for _ in range(reps_hint)]
    while sum(ts) < min_s and len(ts) < 50:
        ts.append(time_call(fn, device))
    wall, after = time.perf_counter() - t0, _cpu_ticks()
    others = None
    if before is not None and after is not None and wall > 0:
        others = max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / _CLK / wall)
    return statistics.median(ts), others


def timed_rounds(fns: dict[str, Callable[[], Any]], first: dict[str, float],
                 device: torch.device, timing: Timing):
    """Interleaved rounds (see :class:`Timing`): ``(samples, retried, contention)`` per name."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    retried = {k: 0 for k in fns}
    contention: dict[str, list[float]] = {k: [] for k in fns}
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
            retried[k] += tries
            times[k].append(best[0])
            if best[1] is not None:
                contention[k].append(best[1])
    return times, retried, contention


def measure_case(case: ModelCase, device: torch.device, dtype: torch.dtype, timing: Timing,
                 memory: bool, only: set[str] | None = None, log=print) -> dict:
    """Times every method on one model; returns the case's result dict."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = case.build().to(device=device, dtype=dtype)
    x, y = case.make_batch(gen)
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    y = y.to(device)
    R = min(case.ref_examples, case.B)
    t0 = time.perf_counter()
    ref = reference_norms(case, base, x[:R], y[:R])
    log(f"  float64 reference on {R} examples: {time.perf_counter() - t0:.1f} s")

    meths = [m for m in methods_for(case) if only is None or m.family == "baseline"
             or any(o in m.name for o in only)]
    steps: dict[str, Step] = {}
    status: dict[str, Outcome] = {}
    first: dict[str, float] = {}
    errs: dict[str, float | None] = {}
    models: dict[str, nn.Module] = {}
    swapped: dict[str, str] = {}  # method -> how the model it runs differs
    refs: dict[Any, torch.Tensor] = {None: ref}
    for m in meths:
        model = copy.deepcopy(base)
        m_ref = ref
        if m.runs_model is not None:
            own = _guard(lambda: m.runs_model(copy.deepcopy(base)), device)
            if not isinstance(own, str) and own is not None:
                with torch.no_grad():
                    xd = x[:R].double() if x.is_floating_point() else x[:R]
                    diff = (copy.deepcopy(own).double()(xd)
                            - copy.deepcopy(base).double()(xd)).abs().max().item()
                if m.runs_model not in refs:
                    refs[m.runs_model] = reference_norms(case, own, x[:R], y[:R])
                m_ref = refs[m.runs_model]
                if diff > 1e-6:
                    swapped[m.name] = (f"runs a different function (max |output - model "
                                       f"output| = {diff:.2g} in float64). {m.swap_note}. Its "
                                       "norms are checked against a float64 reference of the "
                                       "model it runs")
        made = _guard(lambda: m.make(case, model, x, y), device)
        if isinstance(made, str):
            status[m.name] = made
            log(f"  {m.name:34s} {made}")
            continue
        # warm-up (the first call also tells OOM / unsupported / errors)
        out = None
        for _ in range(max(1, timing.warmup)):
            out = _guard(lambda: (made(), sync_device(device))[0], device)
            if isinstance(out, str):
                break
        if isinstance(out, str):
            status[m.name] = out
            log(f"  {m.name:34s} {out}")
            del made, model
            gc.collect()
            continue
        if out is not None:
            errs[m.name] = max_rel_err(out[:R], m_ref)
        t = time_call(made, device)
        first[m.name], steps[m.name], models[m.name] = t, made, model
        log(f"  {m.name:34s} warm {t * 1e3:9.1f} ms"
            + (f"   norms rel err {errs[m.name]:.1e}" if m.name in errs else ""))

    times, retried, contention = timed_rounds(steps, first, device, timing)

    peaks: dict[str, Outcome] = {}
    if memory:
        for k, st in steps.items():
            peaks[k] = peak_memory(st, models[k], device)

    rows = []
    plain = "plain fwd+bwd"
    for m in meths:
        row: dict[str, Any] = {"method": m.name, "family": m.family,
                               "user_selectable": m.user_selectable}
        if m.name in steps:
            v = times[m.name]
            med = statistics.median(v)
            q = statistics.quantiles(v, n=4) if len(v) >= 2 else [med, med, med]
            cv = contention.get(m.name) or []
            row.update(time_s=med, time_min_s=min(v), rounds=len(v), samples_s=v,
                       retried_samples=retried.get(m.name, 0),
                       other_load=statistics.mean(cv) if cv else None,
                       spread=(q[2] - q[0]) / med if med > 0 else None,
                       throughput=case.B / med,
                       norms_max_rel_err=errs.get(m.name),
                       peak_bytes=peaks.get(m.name))
            if m.name in swapped:
                row["note"] = swapped[m.name]
        else:
            row.update(time_s=status[m.name])
        rows.append(row)
    by = {r["method"]: r for r in rows}
    pt = by[plain]["time_s"] if plain in by else None
    pm = by[plain].get("peak_bytes") if plain in by else None
    for r in rows:
        t = r["time_s"]
        r["ratio_to_plain"] = t / pt if isinstance(t, float) and isinstance(pt, float) else None
        pb = r.get("peak_bytes")
        r["mem_ratio_to_plain"] = (pb / pm if isinstance(pb, (int, float)) and
                                   isinstance(pm, (int, float)) and pm > 0 else None)
    auto = linear_layer_strategies(case, base, x, device)
    del steps, models
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    comparison = compare(rows)
    breakdown = None
    if comparison:
        mode = "fused" if "fused" in comparison[0]["gradstats"] else "hooks"
        breakdown = _guard(lambda: attribute_time(case, base, x, y, mode, device), device)
        log(f"  where {comparison[0]['gradstats']}'s time goes: " + (
            breakdown if isinstance(breakdown, str) else ", ".join(
                f"{c['component']} {c['ms_per_step']:.1f}" for c in breakdown["components"][:6])
            + " ms/step"))
    return {"model": case.name, "desc": case.desc, "B": case.B, "T": case.T,
            "params": sum(p.numel() for p in base.parameters()),
            "ref_examples": R, "auto_strategies": auto, "rows": rows,
            "comparison": comparison, "breakdown": breakdown}


#: what each timed component of the monitor is (for the breakdown table)
COMPONENTS = {
    "monitor._collect": "everything the monitor does when a layer's output gradient arrives "
                        "(includes the rule entries below)",
    "monitor._step": "monitor.step(): |grad|^2 and the probe projections of .grad, statistics",
    "op linear_fused": "the fused kernel: dW, db and the per-example norms (replaces the dW "
                       "GEMM plain backward does)",
    "op linear_norms": "the per-example norm kernel (Linear, attention projections, conv)",
    "op grad_summary": "|grad|^2 and the probe projections of .grad (inside monitor._step)",
    "LinearRule.probe": "contract probe of nn.Linear (projections of A and G)",
    "MultiheadAttentionRule._probe": "contract probe of the attention projections",
    "MultiheadAttentionRule._report": "attention projections: op linear_norms + the probe "
                                      "(both nested)",
    "LinearRule.norms": "nn.Linear per-example norms (hooks mode; includes op linear_norms)",
    "EmbeddingRule.norms": "nn.Embedding per-example norms (sorted segment sums)",
    "EmbeddingRule.probe": "contract probe of nn.Embedding",
    "_AffineNormRule.probe": "contract probe of a norm layer (LayerNorm, GroupNorm, ...)",
    "_AffineNormRule.norms": "per-example dgamma/dbeta of a norm layer",
    "ConvRule.probe": "contract probe of a convolution",
    "ConvRule.norms": "per-example conv norms: unfolded patches + op linear_norms",
}


def attribute_time(case: ModelCase, base: nn.Module, x, y, mode: str, device: torch.device,
                   steps: int = 4, retries: int = 3, max_contention: float = 0.25) -> dict:
    """Where the monitor's time goes: wall time per step of each rule method, op and monitor
    phase (entries nest; on CUDA each is synchronised, which slows the whole a little)."""
    from . import _ops
    from .monitor import GradStatsMonitor
    from .rules import _RULES

    acc: dict[str, float] = {}
    patched: list[tuple[Any, str, Any]] = []

    def wrap(owner, attr, label):
        f = vars(owner)[attr] if isinstance(owner, type) else getattr(owner, attr)

        def timed(*a, **k):
            sync_device(device)
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                sync_device(device)
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t
        patched.append((owner, attr, f))
        setattr(owner, attr, timed)

    seen: set[type] = set()
    for r in _RULES.values():
        for t in type(r).__mro__:
            if t in seen or t is object or t.__name__ == "Rule":
                continue
            seen.add(t)
            for meth in ("norms", "probe", "collect", "_probe", "_report"):
                if meth in vars(t) and callable(vars(t)[meth]):
                    wrap(t, meth, f"{t.__name__}.{meth}")
    for f in ("linear_norms", "linear_fused", "grad_summary"):
        if hasattr(_ops, f):
            wrap(_ops, f, f"op {f}")
    wrap(GradStatsMonitor, "_step", "monitor._step")
    wrap(GradStatsMonitor, "_collect", "monitor._collect")
    try:
        m0, m1 = copy.deepcopy(base), copy.deepcopy(base)
        plain = m_plain(case, m0, x, y)
        gs = m_gradstats(mode, "auto")(case, m1, x, y)
        for fn in (plain, gs):
            fn()
            sync_device(device)
        best = None  # (other load, plain times, gradstats times, components)
        for _ in range(1 + (retries if device.type == "cpu" else 0)):
            tp, tg = [], []
            acc.clear()
            before, t0 = _cpu_ticks(), time.perf_counter()
            for _ in range(steps):
                tp.append(time_call(plain, device))
                tg.append(time_call(gs, device))
            after, wall = _cpu_ticks(), time.perf_counter() - t0
            load = (max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / _CLK / wall)
                    if before is not None and after is not None else None)
            if best is None or (load is not None and best[0] is not None and load < best[0]):
                best = (load, tp, tg, dict(acc))
            if load is None or load <= max_contention:
                break
        gs.monitor.detach()
    finally:
        for owner, attr, f in reversed(patched):
            setattr(owner, attr, f)
    load, tp, tg, acc = best
    comps = [{"component": k, "ms_per_step": v / steps * 1e3, "what": COMPONENTS.get(k, "")}
             for k, v in sorted(acc.items(), key=lambda kv: -kv[1])]
    return {"mode": mode, "plain_ms": statistics.median(tp) * 1e3,
            "gradstats_ms": statistics.median(tg) * 1e3, "other_load": load,
            "components": comps}


def reference_norms(case: ModelCase, model: nn.Module, x, y) -> torch.Tensor:
    """``[R]`` float64 per-example squared norms by an autograd loop over a float64 copy."""
    m = copy.deepcopy(model).double()
    xs = x.double() if x.is_floating_point() else x
    params = [p for p in m.parameters() if p.requires_grad]
    out = []
    for i in range(xs.shape[0]):
        gs = torch.autograd.grad(case.loss(m(xs[i:i + 1]), y[i:i + 1]), params)
        out.append(sum(g.square().sum() for g in gs))
    return torch.stack(out).cpu()


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().double().cpu().reshape(-1)
    return ((x - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()


def linear_layer_strategies(case: ModelCase, model: nn.Module, x, device) -> dict[str, str]:
    """What ``auto`` picks for each Linear-like layer (T, d_in, d_out) of the model."""
    from ._ops import linear_strategy

    shapes: dict[str, tuple[int, int, int]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            def h(mod, inp, out, name=name):
                a = inp[0]
                T = a.numel() // (a.shape[0] * a.shape[-1]) if a.dim() > 2 else 1
                shapes[name] = (T, mod.in_features, mod.out_features)
            hooks.append(mod.register_forward_hook(h))
        elif isinstance(mod, nn.Conv2d):
            def hc(mod, inp, out, name=name):
                k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
                shapes[name] = (out.shape[2] * out.shape[3], k, mod.out_channels // mod.groups)
            hooks.append(mod.register_forward_hook(hc))
        elif isinstance(mod, nn.MultiheadAttention):
            shapes[name + " (q,k,v,out proj)"] = (case.T, mod.embed_dim, mod.embed_dim)
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    cuda = device.type == "cuda"
    seen: dict[tuple[int, int, int], list[str]] = {}
    for name, s in shapes.items():
        seen.setdefault(s, []).append(name)
    return {f"T={T} {di}x{do}": f"{linear_strategy(T, di, do, cuda)} "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for (T, di, do), names in seen.items()}


def _verdict(g: dict, p: dict) -> dict:
    """gradstats row ``g`` against peer row ``p`` from their paired samples: the ratio of their
    times in each round both were sampled (slow drifts of the machine cancel in it). speedup =
    1 / median ratio; ahead when gradstats was faster in at least three rounds of four (the
    ratios' upper quartile below 1), behind when slower in three of four, else level; spread =
    the ratios' IQR / median."""
    n = min(len(g["samples_s"]), len(p["samples_s"]))
    ratios = [a / b for a, b in zip(g["samples_s"][:n], p["samples_s"][:n])]
    med = statistics.median(ratios)
    q = statistics.quantiles(ratios, n=4) if n >= 2 else [med, med, med]
    verdict = "ahead" if q[2] < 1 else "behind" if q[0] > 1 else "level"
    return {"method": g["method"], "time_s": g["time_s"], "speedup": 1 / med,
            "tolerance": (q[2] - q[0]) / med, "rounds": n, "verdict": verdict}


def compare(rows: list[dict]) -> list[dict]:
    """gradstats against each peer that ran: its default (the faster of hooks[auto] and
    fused[auto], contract probe on) and its best user-selectable mode (also with
    ``check_contract=False``), each by :func:`_verdict`."""
    ok = [r for r in rows if isinstance(r["time_s"], float)]
    sel = [r for r in ok if r["family"] == "gradstats" and r["user_selectable"]]
    default = [r for r in sel if "no probe" not in r["method"]]
    if not default:
        return []
    d, b = min(default, key=lambda r: r["time_s"]), min(sel, key=lambda r: r["time_s"])
    out = []
    for r in rows:
        if r["family"] != "peer":
            continue
        if not isinstance(r["time_s"], float):
            out.append({"peer": r["method"], "gradstats": d["method"], "verdict": r["time_s"]})
            continue
        dv, bv = _verdict(d, r), _verdict(b, r)
        out.append({"peer": r["method"], "peer_time_s": r["time_s"], "gradstats": d["method"],
                    "gradstats_time_s": d["time_s"], "rounds": dv["rounds"],
                    "speedup": dv["speedup"], "tolerance": dv["tolerance"],
                    "verdict": dv["verdict"], "best": bv})
    return out


# ============================================================================ micro-benchmarks
MICRO_SHAPES_CPU = [(256, 1, 1024, 1024), (64, 16, 768, 768), (8, 128, 768, 768),
                    (8, 128, 768, 3072), (16, 512, 256, 256), (64, 256, 288, 64),
                    (64, 1024, 27, 32)]
MICRO_SHAPES_CUDA = [(256, 1, 1024, 1024), (64, 16, 768, 768), (64, 128, 768, 768),
                     (8, 1024, 768, 3072), (16, 512, 256, 256), (8, 1024, 768, 50257),
                     (64, 1024, 27, 32)]


def micro_benchmarks(device: torch.device, dtype: torch.dtype, shapes, timing: Timing,
                     log=print) -> list[dict]:
    from . import reference
    from ._ops import linear_fused, linear_norms, linear_strategy

    rows = []
    for B, T, d_in, d_out in shapes:
        gen = torch.Generator().manual_seed(0)
        sa = (B, d_in) if T == 1 else (B, T, d_in)
        sg = (B, d_out) if T == 1 else (B, T, d_out)
        A = torch.randn(sa, generator=gen).to(device=device, dtype=dtype)
        G = torch.randn(sg, generator=gen).to(device=device, dtype=dtype)
        A2, G2 = A.reshape(-1, d_in), G.reshape(-1, d_out)
        R = min(B, 4)
        ref_w, ref_b = reference.linear_norms(A[:R], G[:R])
        auto = linear_strategy(T, d_in, d_out, device.type == "cuda")
        strategies = ["auto", "gram", "direct"] + (["outer"] if T == 1 else [])
        fns: dict[str, Callable[[], Any]] = {"dW matmul (plain)": lambda: G2.t() @ A2}
        for s in strategies:
            fns[f"norms[{s}]"] = lambda s=s: linear_norms(A, G, s)
            fns[f"fused[{s}]"] = lambda s=s: linear_fused(A, G, s)
        status: dict[str, Outcome] = {}
        for k, fn in fns.items():
            status[k] = _guard(lambda fn=fn: time_call(fn, device), device)
        live = {k: fn for k, fn in fns.items() if isinstance(status[k], float)}
        times, _, _ = timed_rounds(live, {k: status[k] for k in live}, device, timing)
        base_t = statistics.median(times["dW matmul (plain)"]) if "dW matmul (plain)" in times \
            else None
        for k in fns:
            row: dict[str, Any] = {"B": B, "T": T, "d_in": d_in, "d_out": d_out, "auto": auto,
                                   "method": k}
            if k in times:
                med = statistics.median(times[k])
                q = statistics.quantiles(times[k], n=4) if len(times[k]) >= 2 else [med] * 3
                row.update(time_s=med, spread=(q[2] - q[0]) / med,
                           ratio_to_matmul=med / base_t if base_t else None)
                if k != "dW matmul (plain)":
                    out = live[k]()
                    w, b = (out[2], out[3]) if k.startswith("fused") else out
                    row["norms_max_rel_err"] = max(max_rel_err(w[:R], ref_w),
                                                   max_rel_err(b[:R], ref_b))
            else:
                row["time_s"] = status[k]
            rows.append(row)
        best = min((r for r in rows[-len(fns):] if isinstance(r["time_s"], float)
                    and r["method"].startswith("norms")), key=lambda r: r["time_s"],
                   default=None)
        log(f"  B={B} T={T} {d_in}x{d_out}: auto={auto}, matmul "
            f"{_fmt_ms(base_t)} ms, fastest norms {best['method'] if best else '-'}")
    return rows


# ============================================================================ report
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
    if device.type == "cpu":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()
                            .replace("nvidia", "")).strip("-")


def _versions() -> dict:
    out = {}
    for mod in ("opacus", "backpack"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", None)
        except ImportError:
            out[mod] = None
        except Exception as e:  # noqa: BLE001
            out[mod] = f"import failed: {e}"
    if out.get("backpack") is None:
        try:
            from importlib.metadata import version
            out["backpack"] = version("backpack-for-pytorch")
        except Exception:  # noqa: BLE001
            pass
    return out


def _git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return {}
    try:
        def git(*a):
            return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        return {"commit": git("rev-parse", "--short", "HEAD"),
                "tree_modified": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def _fmt_ms(t) -> str:
    if t is None:
        return ""
    if isinstance(t, float):
        return f"{t * 1e3:.1f}" if t >= 0.01 else f"{t * 1e3:.3f}"
    return str(t)


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "" if x is None else f"{x:{spec}}{suffix}"


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _mib(b) -> str:
    if b is None:
        return ""
    if isinstance(b, str):
        return b
    return f"{b / 2**20:.0f}"


def summary_rows(result: dict) -> list[dict]:
    """One row per model: plain time and gradstats's best against each peer."""
    out = []
    for case in result["cases"]:
        for c in case["comparison"]:
            out.append({"model": case["model"], **c})
    return out


def markdown(result: dict) -> str:
    meta = result["meta"]
    L = [f"# gradstats benchmark suite on {meta['device_name']}", ""]
    for k in ("device", "date", "torch", "cuda", "gradstats_build_info", "peers", "threads",
              "dtype", "python", "git", "timing", "peak_memory_method", "loadavg_before",
              "loadavg_after", "wall_s", "quick"):
        if k in meta:
            L.append(f"- {k}: {meta[k]}")
    L += ["",
          "Each method runs the same training step (zero grads, forward, mean loss, backward) "
          "and yields every example's squared gradient norm over the whole model in per-example "
          "loss units. time = median over interleaved rounds; spread = IQR/median of the "
          "rounds; / plain = time / plain forward+backward; peak = memory above the pre-step "
          "footprint at the step's peak (MiB); err = max relative error of the norms against a "
          "float64 per-example autograd reference on the first examples of the batch. "
          "`gradstats <mode>[<strategy>]`: the Linear strategy forced on every layer "
          "(`auto` = the cost model, what users get). `loop` and `vmap` return the norms only "
          "(no batch gradient). rounds = timed samples kept; other load = cores other "
          "processes kept busy during them (from /proc/stat; a sample above "
          f"{meta.get('timing', {}).get('max_contention', '')} was taken again, the least "
          "contended try kept).", ""]
    comps = summary_rows(result)
    if comps:
        L += ["## Summary: gradstats against each peer", "",
              "default = the faster of hooks[auto] and fused[auto] (contract probe on, what a "
              "user gets); best = the fastest user-selectable gradstats configuration (also "
              "`check_contract=False`). Verdicts are paired: in each round both were timed, the "
              "ratio gradstats time / peer time; speedup = 1 / the median ratio; ahead = "
              "gradstats faster in at least 3 rounds of 4 (upper quartile of the ratios < 1), "
              "behind = slower in 3 of 4, else level; (x%) = IQR/median of the ratios, the "
              "run-to-run spread of the comparison.", "",
              "| model | peer | peer (ms) | default | ms | speedup | verdict | best | ms | "
              "speedup | verdict |", "|---|---|---:|---|---:|---:|---|---|---:|---:|---|"]
        for c in comps:
            if "speedup" in c:
                bv = c["best"]
                L.append(f"| {c['model']} | {c['peer']} | {_fmt_ms(c['peer_time_s'])} | "
                         f"{c['gradstats'].replace('gradstats ', '')} | "
                         f"{_fmt_ms(c['gradstats_time_s'])} | {c['speedup']:.2f}x | "
                         f"{c['verdict']} ({c['tolerance']:.0%}) | "
                         f"{bv['method'].replace('gradstats ', '')} | {_fmt_ms(bv['time_s'])} | "
                         f"{bv['speedup']:.2f}x | {bv['verdict']} ({bv['tolerance']:.0%}) |")
            else:
                L.append(f"| {c['model']} | {c['peer']} | {_cell(c['verdict'])} | "
                         "| | | | | | | |")
        L.append("")
    for case in result["cases"]:
        L += [f"## {case['model']}: {case['desc']}", "",
              f"{case['params'] / 1e6:.2f} M parameters; reference on {case['ref_examples']} "
              "examples. auto strategy per layer shape: "
              + "; ".join(f"{k}: {v}" for k, v in case["auto_strategies"].items()), "",
              "| method | time (ms) | spread | / plain | examples/s | peak (MiB) | peak / plain "
              "| norms err | rounds | other load |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in case["rows"]:
            t = r["time_s"]
            if isinstance(t, float):
                L.append(f"| {r['method']} | {_fmt_ms(t)} | {_fmt(r.get('spread'), '.0%')} | "
                         f"{_fmt(r['ratio_to_plain'], '.2f', 'x')} | "
                         f"{_fmt(r.get('throughput'), '.0f')} | {_mib(r.get('peak_bytes'))} | "
                         f"{_fmt(r.get('mem_ratio_to_plain'), '.2f', 'x')} | "
                         f"{_fmt(r.get('norms_max_rel_err'), '.1e')} | {r.get('rounds', '')} | "
                         f"{_fmt(r.get('other_load'), '.2f')} |")
            else:
                L.append(f"| {r['method']} | {_cell(t)} | | | | | | | | |")
        L.append("")
        for r in case["rows"]:
            if r.get("note"):
                L.append(f"- {r['method']}: {r['note']}")
        if any(r.get("note") for r in case["rows"]):
            L.append("")
    bds = [(c["model"], c["breakdown"]) for c in result["cases"] if c.get("breakdown")]
    if bds:
        L += ["## Where gradstats's time goes", "",
              "Wall time per step of each monitor phase, rule method and op, in the best "
              "user-selectable mode, from a separate instrumented run (a few steps; entries "
              "nest: monitor._collect includes the rule methods, a rule's norms include its "
              "op).", ""]
        for name, bd in bds:
            if isinstance(bd, str):
                L += [f"- {name}: {bd}", ""]
                continue
            L += [f"**{name}** ({bd['mode']} mode): plain {bd['plain_ms']:.1f} ms, gradstats "
                  f"{bd['gradstats_ms']:.1f} ms per step in this run (other load "
                  f"{_fmt(bd.get('other_load'), '.2f') or '?'})", "",
                  "| component | ms / step | what |", "|---|---:|---|"]
            L += [f"| {c['component']} | {c['ms_per_step']:.1f} | {_cell(c['what'])} |"
                  for c in bd["components"]]
            L.append("")
    if result.get("micro"):
        L += ["## Linear kernels (micro-benchmarks)", "",
              "A `[B, T, d_in]`, G `[B, T, d_out]`; / matmul = time / the plain weight-gradient "
              "GEMM `G2d.T @ A2d`; `norms[s]` = `linear_norms` (norms only), `fused[s]` = "
              "`linear_fused` (dW, db and the norms).", "",
              "| B | T | d_in | d_out | auto | method | time (ms) | spread | / matmul | err |",
              "|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
        for r in result["micro"]:
            L.append(f"| {r['B']} | {r['T']} | {r['d_in']} | {r['d_out']} | {r['auto']} | "
                     f"{r['method']} | {_fmt_ms(r['time_s'])} | {_fmt(r.get('spread'), '.0%')} "
                     f"| {_fmt(r.get('ratio_to_matmul'), '.2f', 'x')} | "
                     f"{_fmt(r.get('norms_max_rel_err'), '.1e')} |")
        L.append("")
    if result.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(L)


def notes_for(result: dict) -> list[str]:
    """Data-driven notes: where gradstats's default is not ahead of a peer, by how much, what
    its best mode does there, and how much of its own time the contract probe takes."""
    notes = []
    for case in result["cases"]:
        not_ahead = [c for c in case["comparison"] if c.get("verdict") in ("behind", "level")]
        if not not_ahead:
            continue
        parts = []
        for c in not_ahead:
            bv = c["best"]
            parts.append(f"{c['verdict']}{' with' if c['verdict'] == 'level' else ''} "
                         f"{c['peer']} (peer {_fmt_ms(c['peer_time_s'])} ms, gradstats "
                         f"{_fmt_ms(c['gradstats_time_s'])} ms, speedup {c['speedup']:.2f}x; "
                         f"best mode {bv['method'].replace('gradstats ', '')} "
                         f"{_fmt_ms(bv['time_s'])} ms, {bv['verdict']})")
        n = f"{case['model']}: gradstats {not_ahead[0]['gradstats'].replace('gradstats ', '')} is "
        n += "; ".join(parts)
        bd = case.get("breakdown")
        if isinstance(bd, dict):
            probe = sum(c["ms_per_step"] for c in bd["components"]
                        if c["component"].endswith(("probe", "_probe")))
            n += (f". In the instrumented run the monitor added "
                  f"{bd['gradstats_ms'] - bd['plain_ms']:.1f} ms/step to plain "
                  f"{bd['plain_ms']:.1f} ms, of which the hook-side contract probe took "
                  f"{probe:.1f} ms/step (see 'Where gradstats's time goes')")
        notes.append(n)
    return notes


def run_suite(device: torch.device, *, models: list[str] | None = None, quick: bool = False,
              micro: bool = True, memory: bool = True, gpu_full: bool | None = None,
              rounds: int | None = None, only: set[str] | None = None, log=print) -> dict:
    """Runs the suite; returns ``{"meta", "cases", "micro", "notes"}`` (JSON-ready)."""
    from . import build_info

    dtype = torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    timing = (Timing(rounds=rounds or 3, min_rounds=2, warmup=1, budget_s=2.0, retries=0)
              if quick else
              Timing(rounds=rounds or 9, min_rounds=3, warmup=1, min_sample_s=0.1, budget_s=8.0))
    memory = memory and (device.type == "cuda" or cpu_peak_supported())
    meta = {
        "device_name": device_name(device),
        "device": str(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gradstats_build_info": build_info(),
        "peers": _versions(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "python": platform.python_version(),
        "git": _git_state(),
        "timing": vars(timing),
        "peak_memory_method": (
            "torch.cuda.max_memory_allocated above memory_allocated before the step"
            if device.type == "cuda" else
            "process RSS high-water mark (VmHWM, reset via /proc/self/clear_refs after "
            "gc.collect + malloc_trim) minus RSS before the step, gradients released first"
            if memory else "not measured"),
        "loadavg_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "quick": quick,
    }
    log(f"device: {meta['device_name']} ({device}), torch {torch.__version__}, "
        f"threads {meta['threads']}; gradstats {meta['gradstats_build_info']}; "
        f"peers {meta['peers']}")
    t0 = time.perf_counter()
    cases = make_cases(device, quick=quick, gpu_full=gpu_full)
    names = models or list(cases)
    for n in names:
        if n not in cases:
            raise ValueError(f"unknown model {n!r}; choose from {', '.join(cases)}")
    out_cases = []
    for n in names:
        case = cases[n]
        log(f"{n}: {case.desc}")
        out_cases.append(measure_case(case, device, dtype, timing, memory, only, log))
    micro_rows = []
    if micro:
        log("Linear kernels:")
        shapes = (MICRO_SHAPES_CUDA if device.type == "cuda" else MICRO_SHAPES_CPU)
        if quick:
            shapes = [(8, 1, 64, 64), (4, 16, 64, 32)]
        micro_timing = Timing(rounds=3 if quick else 5, min_rounds=3, warmup=1,
                              min_sample_s=0.0 if quick else 0.05, budget_s=2.0,
                              retries=0 if quick else 3)
        micro_rows = micro_benchmarks(device, dtype, shapes, micro_timing, log)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    if hasattr(os, "getloadavg"):
        meta["loadavg_after"] = os.getloadavg()
    result = {"meta": meta, "cases": out_cases, "micro": micro_rows}
    result["notes"] = notes_for(result)
    return result


def default_out_dir() -> Path:
    """``benchmarks/results`` of the source checkout this module lives in, else
    ``./gradstats-bench-results``."""
    repo = Path(__file__).resolve().parent.parent / "benchmarks"
    return repo / "results" if repo.is_dir() else Path.cwd() / "gradstats-bench-results"


def save(result: dict, out_dir: Path, device: torch.device) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"suite_{device_tag(device)}"
    with open(base.with_suffix(".json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(base.with_suffix(".md"), "w") as f:
        f.write(markdown(result))
    return base.with_suffix(".json"), base.with_suffix(".md")


# ============================================================================ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--models", default=None, metavar="M1,M2",
                   help="comma-separated subset of mlp,transformer,cnn (default: all)")
    p.add_argument("--only", default=None, metavar="S1,S2",
                   help="time only methods whose name contains one of these (plus plain)")
    p.add_argument("--quick", action="store_true",
                   help="small models and few rounds (a smoke run); results are not saved "
                        "unless --out-dir is given")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per method")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: all cores)")
    p.add_argument("--gpu-full", dest="gpu_full", action="store_true", default=None,
                   help="full GPT-2 small (default on CUDA)")
    p.add_argument("--no-gpu-full", dest="gpu_full", action="store_false",
                   help="the CPU-sized transformer on CUDA too")
    p.add_argument("--no-micro", action="store_true", help="skip the Linear kernel grid")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--out-dir", default=None,
                   help=f"where suite_<device>.json/.md go (default {default_out_dir()})")
    p.add_argument("--no-save", action="store_true", help="print the tables only")


def run_cli(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gradstats bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    only = {s.strip() for s in args.only.split(",")} if args.only else None

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        result = run_suite(device, models=models, quick=args.quick, micro=not args.no_micro,
                           memory=not args.no_memory, gpu_full=args.gpu_full,
                           rounds=args.rounds, only=only, log=log)
    except ValueError as e:
        print(f"gradstats bench: {e}", file=sys.stderr)
        return 2
    print(markdown(result))
    if not args.no_save and (args.out_dir or not args.quick):
        j, m = save(result, Path(args.out_dir) if args.out_dir else default_out_dir(), device)
        print(f"wrote {j} and {m}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradstats bench", description=HELP)
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
