"""Checking the units contract instead of assuming it.

The statistics assume ``p.grad = sum_i u_i`` over the examples the hooks saw. Two checks back it:

* **The probe** (on probe steps): fixed random directions ``V_j`` per parameter (rank-1
  ``x_j y_j^T`` for matrices), ``<V_j, p.grad>`` from one pass over ``.grad`` against the same
  projection accumulated by the rules from what the hooks saw. Any contribution the hooks did
  not see (``.grad`` not zeroed, clipped, weight decay or an L2 term added into it, a loss term
  that bypasses the layer's output, a second backward) moves one side only and is named by
  :func:`diagnose`.
* **The version check** (every step, nearly free): each covered ``.grad``'s version counter and
  identity, against what autograd's accumulation of the counted backwards gives. Accumulation
  into an existing ``.grad``, clipping, an ``add_`` of an L2 term and ``zero_()`` each bump it.
  An unexpected version makes the step a probe step, so a change is diagnosed when it happens.

Between probe steps the version check still catches a ``.grad`` not zeroed (with
``zero_grad(set_to_none=True)``, torch's default), in-place clipping, weight decay or
``zero_()`` applied between backward and ``step()``. It cannot see contributions that arrive
through autograd itself in the same backward (a loss term on a parameter directly, a module
called outside the model's forward), or in-place changes through ``.data``; the first probe
steps and every ``probe_every``-th step catch those, and such steps carry ``verified=True``.

The tolerance is an error model, not a fixed relative bound. For probe ``j`` of a parameter::

    |<V_j, p.grad> - hooks_j| <= (C_ACC * eps_acc + C_TERM * eps_store) * bound_j
                                 + C_STORE * eps_store * rms_j

``bound_j`` is the rules' bound on the sum of the absolute values of the terms (the rounding
scale of a sum computed in the accumulation precision ``eps_acc``: float32's for float32 and
half inputs, float64's for float64), and ``rms_j = (sum_k (V_jk g_k)^2)^(1/2)`` from the same
pass over ``.grad`` scales the rounding of the stored gradient: every element of ``.grad``
carries a relative error up to ``eps_store``, the unit roundoff of the lowest precision it
passed through (a bfloat16 parameter's ``.grad``, or a weight gradient computed in bfloat16
under autocast), and against random directions these errors add like a random walk. The
``C_TERM`` term covers torch's native backward forming the terms themselves in that storage
precision (a bfloat16 LayerNorm's ``g * xhat``): where the gradient is rounding noise (a norm
layer followed by another normalisation) the measured error reached 0.04 ``eps_store * bound_j``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ops
from .errors import ContractError
from .rules.base import PROBES

__all__ = ["ContractError", "ProbeSchedule", "grad_summaries", "mismatches", "tolerance", "diagnose",
           "unit_roundoff"]

#: safety factors of the error model (the accumulation bound is already a worst case; the
#: storage term is ~30 standard deviations of a random walk of uniform rounding errors)
C_ACC = 64.0
C_STORE = 16.0
C_TERM = 1.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the spacing of floating-point numbers near 1 in ``dtype``."""
    return torch.finfo(dtype).eps / 2


@dataclass
class ProbeSchedule:
    """Which steps run the full probe: the first ``warmup`` steps, then every ``every``-th, and
    any step after a configuration change (scale, batch size, micro-batch count, coverage) or an
    unexpected ``.grad`` version. ``every=1`` probes every step; ``every=0`` only the warm-up
    and forced steps."""

    warmup: int = 3
    every: int = 50
    _forced: bool = False
    _last_config: tuple | None = None

    def due(self, step: int) -> bool:
        """Whether measured step ``step`` (0-based) probes."""
        forced, self._forced = self._forced, False
        return (forced or step < self.warmup
                or (self.every > 0 and (step - self.warmup) % self.every == 0))

    def note(self, config: tuple) -> None:
        """The configuration a step ran with (micro-batch sizes, loss scale); a change makes the
        next step a probe step."""
        if self._last_config is not None and config != self._last_config:
            self._forced = True
        self._last_config = config

    def force(self) -> None:
        self._forced = True


def local_shard(g: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """A gradient's part held here: ``(local tensor, its first row in the full tensor, weight)``.
    A plain tensor is all of it; a DTensor sharded on dim 0 (FSDP2) gives its local rows, in
    ``torch.chunk``'s split, and a weight of ``1 / replicas`` so that summing the parts over all
    ranks (HSDP replicates each shard) counts every row once."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(g, DTensor):
        return g, 0, 1.0
    mesh, offset, replicas = g.device_mesh, 0, 1
    for dim, placement in enumerate(g.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise ContractError(f"a gradient sharded on dim {placement.dim}: gradstats reads "
                                    "FSDP2's dim-0 shards only")
            n, k = mesh.size(dim), mesh.get_local_rank(dim)
            offset += k * -(-g.shape[0] // n)
        elif isinstance(placement, Replicate):
            replicas *= mesh.size(dim)
    return g.to_local(), offset, 1.0 / replicas


def grad_summaries(grads: list[torch.Tensor | None], rows: list[int],
                   xs: list[torch.Tensor], ys: list[torch.Tensor], probing: bool,
                   device: torch.device) -> torch.Tensor:
    """``[params, 1 + 2 PROBES]`` float64: ``|grad|^2``, then on probe steps the projections
    and their rounding scales (zeros otherwise), one pass over each ``.grad``. Sharded
    gradients give their local part (see :func:`local_shard`): sum it over ranks."""
    width = 1 + 2 * PROBES
    out = torch.zeros(len(grads), width, dtype=torch.float64, device=device)
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return out
    if any(type(grads[i]) is not torch.Tensor and not grads[i].is_sparse for i in present):
        for i in present:  # sharded (FSDP2): this rank's rows, weighted, summed over ranks later
            local, offset, weight = local_shard(grads[i])
            n = local.shape[0] if local.dim() else 1
            if local.numel() == 0:
                continue
            if probing:
                summary = ops.grad_summary(local.reshape(n, -1), xs[i][offset:offset + n], ys[i])
            else:
                summary = torch.zeros(width, dtype=torch.float64, device=local.device)
                summary[0] = local.double().square().sum()
            out[i] = weight * summary.to(device)
        return out
    if not probing:
        dense = [i for i in present if not grads[i].is_sparse]
        if dense:
            norms = torch._foreach_norm([grads[i] for i in dense])
            sq = torch.stack([n.double().to(device) for n in norms]).square()
            out[dense, 0] = sq
        for i in present:
            if grads[i].is_sparse:
                out[i, 0] = grads[i].coalesce().values().double().square().sum()
        return out
    for i in present:
        g = grads[i]
        if g.is_sparse:
            g = g.coalesce().to_dense()
        out[i] = ops.grad_summary(g.reshape(rows[i], -1), xs[i], ys[i]).to(device)
    return out


def tolerance(hv, gv, j: int, factor: float, eps_acc: float, eps_store: float) -> float:
    """The error model's bound for probe ``j`` of one parameter (see the module docstring):
    ``hv`` its hooks' row (values, bounds), ``gv`` its ``.grad`` row (|g|^2, values, rms^2)."""
    return ((C_ACC * eps_acc + C_TERM * eps_store) * hv[PROBES + j]
            + C_STORE * eps_store * math.sqrt(max(gv[1 + PROBES + j], 0.0)) * abs(factor))


def mismatches(hook_probe, grad_side, factor: float, eps_acc, eps_store) -> list[int]:
    """Indices of parameters whose probe disagrees beyond the error model. ``hook_probe``
    ``[n, 2P]`` (values, bounds), ``grad_side`` ``[n, 1 + 2P]`` (|g|^2, values, rms^2),
    ``factor`` turns ``.grad`` into the hooks' units."""
    bad = []
    for i in range(len(hook_probe)):
        hv, gv = hook_probe[i], grad_side[i]
        for j in range(PROBES):
            tol = tolerance(hv, gv, j, factor, eps_acc[i], eps_store[i])
            if not abs(gv[1 + j] * factor - hv[j]) <= tol + 1e-300:
                bad.append(i)
                break
    return bad


def diagnose(names: list[str], got: list[list[float]], want: list[list[float]],
             tol: list[list[float]], previous: list[list[float] | None],
             param_probe: list[list[float]]) -> str:
    """Names the likeliest cause of a probe mismatch for the parameters ``names``: ``got`` the
    projections of ``.grad`` (hooks' units), ``want`` the hooks' own, ``previous`` last probe
    step's projections of ``.grad`` (None where there was none), ``param_probe`` the projections
    of the parameters themselves. Each test must hold for every direction."""
    where = ", ".join(names)

    def same(xs: list[float], slack: list[float]) -> bool:
        """All ``xs`` agree within their rounding slack (and 1e-3 relative)."""
        return bool(xs) and all(
            math.isfinite(x) and abs(x - xs[0]) <= 1e-3 * abs(xs[0]) + s + slack[0]
            for x, s in zip(xs, slack))

    if all(p is not None and all(abs(g[j] - w[j] - p[j]) <= max(t[j], 1e-3 * abs(p[j]))
                                 for j in range(PROBES))
           for g, w, p, t in zip(got, want, previous, tol)):
        return (f".grad of {where} was not zeroed since the last step: it still holds the "
                "previous gradient (call optimizer.zero_grad() after monitor.step())")
    # a uniform scale c moves every projection by the same relative amount c - 1
    pairs = [(g[j] / w[j] - 1, t[j] / abs(w[j])) for g, w, t in zip(got, want, tol)
             for j in range(PROBES) if w[j] != 0]
    shifts, slack = [p[0] for p in pairs], [p[1] for p in pairs]
    if same(shifts, slack) and -1 <= shifts[0] < 0:
        return (f".grad of {where} was scaled by {1 + shifts[0]:.6g} before step() (gradient "
                "clipping?): call monitor.step() before clipping")
    pairs = [((g[j] - w[j]) / p[j], t[j] / abs(p[j])) if p[j] else (math.nan, 0.0)
             for g, w, p, t in zip(got, want, param_probe, tol) for j in range(PROBES)]
    lams, slack = [p[0] for p in pairs], [p[1] for p in pairs]
    if same(lams, slack) and lams[0] != 0:
        return (f".grad of {where} had {lams[0]:.3g} x param added before step() (weight decay "
                "or an L2 term written into .grad): call monitor.step() before it is added")
    return (f".grad of {where} holds contributions the hooks never saw (a loss term that "
            "bypasses the layer's output, a call outside the model's forward, a "
            "parametrization, or a second backward): per-example norms would not match .grad")
