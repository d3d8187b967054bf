"""The methods the suite compares. Each builds, for one model and batch, a step function that
runs one training step (gradients released, forward, mean loss, backward) and returns every
example's squared gradient norm over the whole model, in per-example loss units (``None`` for
the plain step):

  plain                  forward + backward only: the baseline of every ratio
  gradstats default      ``GradStatsMonitor(model)``: the defaults a user gets (contract check on)
  gradstats fused, no check   ``mode="fused", check_contract=False``
  gradstats hooks        ``mode="hooks"``
  gradstats ... linear_strategy=s   fused, no check, the Linear strategy forced (``outer``,
                         ``gram``, ``direct``); "unavailable in this build" where the monitor has
                         no ``linear_strategy=`` option
  opacus ghost           ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)``,
                         ``get_norm_sample()`` after the one backward
  opacus hooks           ``GradSampleModule``; norms from ``p.grad_sample``
  vmap(grad)             ``torch.func.vmap(grad(functional_call))`` in chunks; each chunk's
                         per-example gradients are reduced to norms inside the vmapped function
  loop                   a per-example autograd loop (small models only)
  backpack ...           BackPACK ``extend`` + ``BatchL2Grad`` (and ``+ Variance``); refused with
                         the reason where a layer with parameters has no extension (BackPACK
                         skips such layers with a warning, undercounting the norm)

``vmap`` and ``loop`` return the norms only, no batch gradient in ``.grad``: a head start. Every
gradstats step times ``monitor.step()`` in ``step.inner`` (a :class:`harness.Stopwatch`).
Only public gradstats names are used.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from benchmarks.harness import Stopwatch, Unsupported
from benchmarks.models import ModelCase

__all__ = ["Method", "Step", "methods_for", "reference_norms", "max_rel_err", "release"]

Step = Callable[[], "torch.Tensor | None"]
Maker = Callable[[ModelCase, nn.Module, torch.Tensor, torch.Tensor], Step]


def release(model: nn.Module) -> None:
    """Drops the gradients and whatever per-example state a tool left on the parameters."""
    for p in model.parameters():
        p.grad = None
        if getattr(p, "grad_sample", None) is not None:
            p.grad_sample = None
        for attr in ("_norm_sample", "batch_l2", "variance"):
            if hasattr(p, attr):
                delattr(p, attr)


@dataclass(frozen=True)
class Method:
    key: str       # stable id: --only, the memory subprocess
    name: str      # shown in the tables
    family: str    # "baseline", "gradstats" or "peer"
    make: Maker


# ============================================================================ baseline, gradstats
def plain(case: ModelCase, model: nn.Module, x, y) -> Step:
    def step():
        release(model)
        case.loss(model(x), y).backward()
        return None
    return step


def gradstats_method(**options) -> Maker:
    """A GradStatsMonitor with ``options`` (none: the defaults)."""
    def make(case: ModelCase, model: nn.Module, x, y) -> Step:
        import gradstats

        try:
            mon = gradstats.GradStatsMonitor(model, **options)
        except TypeError as e:
            if "linear_strategy" in options and "linear_strategy" in str(e):
                raise Unsupported("unavailable in this build: GradStatsMonitor has no "
                                  "linear_strategy= option") from None
            raise
        watch = Stopwatch(x.device)

        def step():
            release(model)
            case.loss(model(x), y).backward()
            with watch, record_function("gradstats: monitor.step()"):
                stats = mon.step()
            return stats.per_example_sq_norms
        step.inner = watch  # type: ignore[attr-defined]
        step.monitor = mon  # type: ignore[attr-defined]
        return step
    return make


# ============================================================================ plain PyTorch peers
def loop(case: ModelCase, model: nn.Module, x, y) -> Step:
    if not case.small:
        raise Unsupported("skipped: the per-example loop runs on the small models only")
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
        for i in range(x.shape[0]):
            gs = torch.autograd.grad(case.loss(model(x[i:i + 1]), y[i:i + 1]), params)
            out[i] = torch.stack([g.square().sum() for g in gs]).sum()
        return out
    return step


def vmap(case: ModelCase, model: nn.Module, x, y) -> Step:
    from torch.func import functional_call, grad
    from torch.func import vmap as vmap_

    params = {k: v.detach() for k, v in model.named_parameters()}

    def sq_norm(p, xi, yi):
        g = grad(lambda q: case.loss(functional_call(model, q, (xi.unsqueeze(0),)),
                                     yi.unsqueeze(0)))(p)
        return torch.stack([v.square().sum() for v in g.values()]).sum()

    f = vmap_(sq_norm, in_dims=(None, 0, 0), chunk_size=min(case.vmap_chunk, x.shape[0]))
    return lambda: f(params, x, y)


# ============================================================================ Opacus
def _opacus_ready(model: nn.Module) -> nn.Module:
    try:
        from opacus.validators import ModuleValidator
    except ImportError as e:
        raise Unsupported(f"opacus not installed ({e})") from None
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise Unsupported("opacus: " + "; ".join(str(e) for e in errors[:2]))
    return model


def opacus_hooks(case: ModelCase, model: nn.Module, x, y) -> Step:
    model = _opacus_ready(model)
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in gsm.parameters() if p.requires_grad]

    def step():
        release(gsm)
        case.loss(gsm(x), y).backward()
        return torch.stack([p.grad_sample.reshape(len(p.grad_sample), -1).square().sum(1)
                            for p in params]).sum(0)
    return step


def opacus_ghost(case: ModelCase, model: nn.Module, x, y) -> Step:
    model = _opacus_ready(model)
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", use_ghost_clipping=True,
        max_grad_norm=1.0)

    def step():
        release(gsm)
        case.loss(gsm(x), y).backward()
        return gsm.get_norm_sample().square()
    return step


# ============================================================================ BackPACK
def _check_backpack_coverage(m: nn.Module) -> None:
    """After a backward: refuses when a layer with parameters got no ``batch_l2``."""
    missing = [type(mod).__name__ for mod in m.modules()
               if any(p.requires_grad for p in mod.parameters(recurse=False))
               and not all(hasattr(p, "batch_l2") for p in mod.parameters(recurse=False))]
    if missing:
        release(m)
        raise Unsupported(f"BackPACK has no BatchL2Grad/Variance extension for "
                          f"{', '.join(dict.fromkeys(missing))} (it skips such layers with a "
                          "warning: the whole-model norm would be undercounted)")


def backpack_method(variance: bool) -> Maker:
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
        checked = []

        def run():
            with backpack(*exts):
                case.loss(m(x), y).backward()

        def step():
            release(m)
            if checked:
                run()
            else:  # the first call: BackPACK warns for each layer it skips; refuse those
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        run()
                    except NotImplementedError as e:
                        raise Unsupported(f"BackPACK: {e}") from None
                _check_backpack_coverage(m)
                checked.append(True)
            # a mean loss: BackPACK's per-example quantities carry its 1/B
            return torch.stack([p.batch_l2 for p in params]).sum(0) * (B * B)

        return step
    return make


# ============================================================================ the list
def methods_for(case: ModelCase, strategies: bool = True) -> list[Method]:
    """Every method for one model (``strategies``: also the forced Linear strategies)."""
    out = [
        Method("plain", "plain fwd+bwd", "baseline", plain),
        Method("gs-default", "gradstats default", "gradstats", gradstats_method()),
        Method("gs-fused-nocheck", "gradstats fused, no check", "gradstats",
               gradstats_method(mode="fused", check_contract=False)),
        Method("gs-hooks", "gradstats hooks", "gradstats", gradstats_method(mode="hooks")),
    ]
    if strategies:
        out += [Method(f"gs-fused-{s}", f"gradstats fused, no check, linear_strategy={s}",
                       "gradstats", gradstats_method(mode="fused", check_contract=False,
                                                     linear_strategy=s))
                for s in case.strategies]
    out += [
        Method("opacus-ghost", "opacus ghost (norms)", "peer", opacus_ghost),
        Method("opacus-hooks", "opacus hooks (grad_sample)", "peer", opacus_hooks),
        Method("vmap", f"vmap(grad), chunk {case.vmap_chunk}", "peer", vmap),
        Method("loop", "per-example loop", "peer", loop),
        Method("backpack", "backpack BatchL2Grad", "peer", backpack_method(False)),
        Method("backpack-var", "backpack BatchL2Grad+Variance", "peer", backpack_method(True)),
    ]
    return out


# ============================================================================ correctness
def reference_norms(case: ModelCase, model: nn.Module, x, y) -> torch.Tensor:
    """``[R]`` float64 per-example squared norms: an autograd loop over a float64 copy."""
    m = copy.deepcopy(model).double()
    xs = x.double() if x.is_floating_point() else x
    params = [p for p in m.parameters() if p.requires_grad]
    out = []
    for i in range(xs.shape[0]):
        gs = torch.autograd.grad(case.loss(m(xs[i:i + 1]), y[i:i + 1]), params)
        out.append(sum(g.square().sum() for g in gs))
    return torch.stack(out).cpu()


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max relative error of ``x`` against ``ref`` (both ``[R]``)."""
    x = x.detach().double().cpu().reshape(-1)[: ref.numel()]
    return ((x - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()
