"""The independent reference: per-example gradients from an explicit per-example autograd loop
on a float64 copy of the model (same rounded weights and inputs, checkpointing off), the
statistics formed from them in float64, and the comparison with what the monitor reported.

Units: example ``i`` of a micro-batch contributes ``u_i = c_i g_i`` to ``.grad`` (``c_i`` from
the loss reduction, the accumulation and the DDP average), with ``g_i`` the gradient of its own
loss. With weights ``w_i = c_i / sum_j c_j`` (equal weights ``1/N`` when every ``c_i`` agrees):

    S = sum_i |g_i|^2      m = |sum_i w_i g_i|^2      w2 = sum_i w_i^2
    tr = (S/N - m) / (1 - w2)          g2 = m - tr (w2 - 1/M)         B = tr / g2

(``1/M`` only with a dataset size; with equal weights ``tr = (S - N m) / (N - 1)``.)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from .models import build, example_losses
from .runner import StepRecord
from .spec import Case, Chunk

#: a gradstats value off by more than the tolerance still counts as "precision-limited" (not a
#: mismatch) when it is within this factor of how far torch's own computation in the case's
#: precision is from the float64 reference
LIMITED_FACTOR = 4.0


@dataclass
class Quantities:
    """Reference statistics of one step, whole model (``""``) and per layer."""

    S_i: torch.Tensor                        # [N] per-example |g_i|^2 (whole model)
    ranks: torch.Tensor                      # [N] rank of each example
    groups: dict[str, dict[str, float]]      # layer -> {S, m, tr, g2, w2, shrink}
    grad: dict[str, torch.Tensor]            # sum_i c_i g_i per trainable parameter
    grad_scale: dict[str, torch.Tensor]      # sum_i |c_i g_i| (elementwise rounding scale)
    n: int = 0


@dataclass
class Failure:
    step: int
    what: str
    got: float
    want: float
    atol: float
    limited: bool = False
    inherent: float = math.nan

    def __str__(self) -> str:
        tag = (f" (precision-limited: torch's own error in this precision {self.inherent:.3g})"
               if self.limited else "")
        return (f"step {self.step} {self.what}: got {self.got:.9g}, reference {self.want:.9g}, "
                f"|diff| {abs(self.got - self.want):.3g} > tol {self.atol:.3g}{tag}")


def _as_ref_inputs(chunk: Chunk, dtype: torch.dtype) -> tuple:
    def f(t):
        return None if t is None else (t.to(dtype) if t.is_floating_point() else t)
    return f(chunk.x), f(chunk.mask), f(chunk.target)


class Reference:
    """Per-example gradients of a case's model at given weights, in float64 or (``low``) in the
    case's own precision (the torch-in-that-precision yardstick)."""

    def __init__(self, case: Case, low: bool = False):
        self.case, self.low = case, low
        dtype = case.dtype if low else torch.float64
        self.model = build(case.model).to(dtype)
        self.model.plain = True
        self.model.train(case.train)
        self.dtype = dtype

    def per_example(self, weights: dict[str, torch.Tensor], trainable: tuple[str, ...],
                    chunks: list[Chunk]) -> tuple[dict[str, torch.Tensor], torch.Tensor,
                                                  torch.Tensor]:
        """``{name: [N, numel]}`` float64 gradients of each example's own loss, ``c [N]`` and
        the examples' ranks ``[N]``."""
        m = self.model
        m.load_state_dict({k: v.to(self.dtype) if v.is_floating_point() else v
                           for k, v in weights.items()})
        params = dict(m.named_parameters())
        for k, p in params.items():
            p.requires_grad_(k in trainable)
        names = [k for k in params if k in trainable]
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in names}
        cs, ranks = [], []
        amp = (torch.autocast("cpu", dtype=self.case.autocast)
               if self.low and self.case.autocast else contextlib.nullcontext())
        in_dtype = self.dtype if not self.low else None
        for chunk in chunks:
            for i in range(len(chunk)):
                ex = chunk.example(i)
                x, mask, target = (_as_ref_inputs(ex, in_dtype) if in_dtype is not None
                                   else (ex.x, ex.mask, ex.target))
                with amp:
                    out = m(x) if mask is None else m(x, mask)
                    loss = example_losses(self.case.model, out, target, self.case.seq_reduce)
                gs = torch.autograd.grad(loss.sum(), [params[k] for k in names],
                                         allow_unused=True)
                for k, g in zip(names, gs):
                    p = params[k]
                    rows[k].append(torch.zeros(p.numel(), dtype=torch.float64) if g is None
                                   else g.detach().double().flatten())
                cs.append(chunk.c)
                ranks.append(chunk.rank)
        G = {k: torch.stack(v) if v else torch.zeros(0, params[k].numel(), dtype=torch.float64)
             for k, v in rows.items()}
        return G, torch.tensor(cs, dtype=torch.float64), torch.tensor(ranks)


def owner(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def assign_layers(params: list[str], layers: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Each parameter filed under the deepest reported layer that is its owning module or an
    ancestor of it; returns ``(layer -> params, params under no reported layer)``."""
    out: dict[str, list[str]] = {}
    orphans = []
    for p in params:
        o = owner(p)
        best = None
        for L in layers:
            if L == "" or o == L or o.startswith(L + "."):
                if best is None or len(L) > len(best):
                    best = L
        if best is None:
            orphans.append(p)
        else:
            out.setdefault(best, []).append(p)
    return out, orphans


def group_stats(G: dict[str, torch.Tensor], names: list[str], c: torch.Tensor,
                M: int | None, store: torch.dtype | None = None) -> dict[str, float]:
    """``store``: round the mean gradient to this dtype first, as torch's ``.grad`` of a
    low-precision parameter is (the monitor's ``|G|^2`` comes from ``.grad``)."""
    N = c.numel()
    w = c / c.sum()
    S = sum(float(G[k].square().sum()) for k in names)

    def mean(k: str) -> torch.Tensor:
        g = (w[:, None] * G[k]).sum(0)
        return g if store is None else g.to(store).double()

    m = sum(float(mean(k).square().sum()) for k in names)
    w2 = float(w.square().sum())
    shrink = w2 - (1.0 / M if M else 0.0)
    if N < 2 or w2 >= 1.0:
        return {"S": S, "m": m, "tr": math.nan, "g2": math.nan, "w2": w2, "shrink": shrink}
    tr = (S / N - m) / (1.0 - w2)
    return {"S": S, "m": m, "tr": tr, "g2": m - tr * shrink, "w2": w2, "shrink": shrink}


def quantities(case: Case, G: dict[str, torch.Tensor], c: torch.Tensor, ranks: torch.Tensor,
               layers: list[str] | None, store: torch.dtype | None = None
               ) -> tuple[Quantities, list[str]]:
    names = list(G)
    S_i = sum((G[k].square().sum(1) for k in names), torch.zeros(c.numel(), dtype=torch.float64))
    groups = {"": group_stats(G, names, c, case.dataset_size, store)}
    orphans: list[str] = []
    if layers is not None:
        by_layer, orphans = assign_layers(names, layers)
        for L, ps in by_layer.items():
            groups[f"layer:{L}"] = group_stats(G, ps, c, case.dataset_size, store)
    grad = {k: (c[:, None] * G[k]).sum(0) for k in names}
    scale = {k: (c[:, None] * G[k]).abs().sum(0) for k in names}
    return Quantities(S_i, ranks, groups, grad, scale, c.numel()), orphans


# ------------------------------------------------------------------------------------ checks
@dataclass
class StepCheck:
    """The comparisons of one rank's step: values keyed by what they are, so that the same keys
    can be evaluated on torch's own low-precision computation."""

    step: int
    tol: float
    values: list[tuple[str, float, float, float]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # discrete failures (no tolerance)
    unresolved: list[str] = field(default_factory=list)  # below the precision's resolution

    def close(self, what: str, got: float, want: float, atol: float) -> None:
        self.values.append((what, got, want, atol))

    def failures(self) -> list[Failure]:
        out = [Failure(self.step, what, g, w, a) for what, g, w, a in self.values
               if not (math.isfinite(g) and abs(g - w) <= a)]
        return out


def _flat(d: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    parts = [d[k].double().flatten() for k in names]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def compare_step(case: Case, rec: StepRecord, q: Quantities, orphans: list[str],
                 rank: int) -> StepCheck:
    """Every statistic of ``rec.stats`` against ``q`` (see the module docstring), with the
    issue's tolerances: relative ``tol`` for ``S``, ``m`` and ``tr``; ``tol m`` (absolute) for
    ``g2``; ``tol m / |g2|`` (relative) for ``B``."""
    tol = case.tol
    chk = StepCheck(rec.step, tol)
    st = rec.stats
    if not all(bool(torch.isfinite(g).all()) for g in rec.grads.values() if g is not None):
        # torch's own .grad overflowed: there is nothing to measure; a refusal is expected
        if st is not None and st["measured"]:
            chk.flags.append(f"step {rec.step}: statistics returned although .grad is "
                             "non-finite (refused by name in the README)")
        return chk
    if st is None:  # a refused step: .grad must still be autograd's
        _compare_grad(chk, ".grad", rec.grads, q.grad, q.grad_scale, tol)
        return chk
    if not st["measured"] or st["skipped"]:
        chk.flags.append(f"step {rec.step}: not measured ({st['skip_reason']})")
        return chk
    if st["n"] != q.n:
        chk.flags.append(f"step {rec.step}: n = {st['n']}, reference {q.n}")
    local = q.S_i[q.ranks == rank]
    pe = st["per_example"]
    if pe is None and local.numel() == 0:
        pass  # a DDP rank without examples
    elif pe is None or pe.numel() != local.numel():
        chk.flags.append(f"step {rec.step}: per_example_sq_norms has "
                         f"{None if pe is None else pe.numel()} entries, reference {local.numel()}")
    else:
        floor = case.resolution * float(q.S_i.mean()) if q.S_i.numel() else 0.0
        for i, (g, w) in enumerate(zip(pe.tolist(), local.tolist())):
            chk.close(f"|g_{i}|^2", g, w, tol * max(w, floor))
        chk.close("sum_i |g_i|^2 (this rank)", float(pe.sum()), float(local.sum()),
                  tol * float(local.sum()))
    _compare_group(chk, "model", st["tr"], st["g2"], st["b"], st["defined"], q.groups[""], tol)
    reported = list(st["layers"])
    for p in orphans:
        chk.flags.append(f"step {rec.step}: parameter {p} is in no reported layer "
                         f"(layers: {reported})")
    for L in reported:
        ref = q.groups.get(f"layer:{L}")
        if ref is None:
            chk.flags.append(f"step {rec.step}: layer {L!r} reported, but it holds no trainable "
                             "parameter")
            continue
        if ref["S"] < case.resolution * q.groups[""]["S"]:
            chk.unresolved.append(f"step {rec.step} layer {L}")
            continue
        tr, g2, b, defined = st["layers"][L]
        _compare_group(chk, f"layer {L}", tr, g2, b, defined, ref, tol)
    _compare_grad(chk, ".grad", rec.grads, q.grad, q.grad_scale, tol)
    return chk


def _compare_group(chk: StepCheck, where: str, tr: float, g2: float, b: float, defined: bool,
                   ref: dict[str, float], tol: float) -> None:
    if math.isnan(ref["tr"]):
        if defined:
            chk.flags.append(f"step {chk.step} {where}: B_simple defined with one example "
                             "carrying all the weight")
        return
    m = ref["m"]
    chk.close(f"{where} tr(Sigma)", tr, ref["tr"], tol * abs(ref["tr"]))
    chk.close(f"{where} |ubar|^2 (= g2 + tr shrink)", g2 + tr * ref["shrink"], m,
              tol * (m + ref["shrink"] * abs(ref["tr"])))
    chk.close(f"{where} |G|^2", g2, ref["g2"], tol * m)
    if abs(ref["g2"]) > tol * m:
        chk.close(f"{where} B_simple defined (1) or not (0)", float(defined),
                  float(ref["g2"] > 0), 0.0)
        if defined and ref["g2"] > 0:
            B = ref["tr"] / ref["g2"]
            chk.close(f"{where} B_simple", b, B, tol * m / abs(ref["g2"]) * abs(B))


def _compare_grad(chk: StepCheck, what: str, grads: dict, ref: dict[str, torch.Tensor],
                  scale: dict[str, torch.Tensor], tol: float) -> None:
    names = list(ref)
    missing = [k for k in names if grads.get(k) is None and bool(ref[k].abs().sum() > 0)]
    if missing:
        chk.flags.append(f"step {chk.step}: {what} is None for {missing}")
        return
    got = _flat({k: grads[k] if grads.get(k) is not None else torch.zeros_like(ref[k])
                 for k in names}, names)
    want = _flat(ref, names)
    err = float((got - want).norm())
    chk.close(f"{what} |grad - sum_i c_i g_i|", err, 0.0, tol * float(_flat(scale, names).norm()))


def compare_copy(case: Case, step: int, grads: dict, G: dict[str, torch.Tensor],
                 G_ref: dict[str, torch.Tensor]) -> StepCheck:
    """A deepcopy's ``.grad`` (``grads``; mean loss over its micro-batch) against the mean of
    the float64 per-example gradients ``G_ref`` of the copy's weights; ``G`` gives the rounding
    scale (the same as ``G_ref``, or torch's own low-precision ones)."""
    chk = StepCheck(step, case.tol)
    ref = {k: G_ref[k].mean(0) for k in G_ref}
    scale = {k: G[k].abs().mean(0) for k in G}
    _compare_grad(chk, "deepcopy's .grad", grads, ref, scale, case.tol)
    return chk


def mark_limited(failures: list[Failure], chk_low: StepCheck) -> None:
    """Marks the failures that torch's own computation in the case's precision misses by as
    much (``chk_low``: the same comparisons with torch's low-precision values as "got")."""
    low = {what: got for what, got, _, _ in chk_low.values}
    for f in failures:
        v = low.get(f.what)
        if v is None:
            continue
        if not math.isfinite(v):  # torch's own computation overflows as well
            f.limited = not math.isfinite(f.got)
            continue
        f.inherent = abs(v - f.want)
        f.limited = abs(f.got - f.want) <= LIMITED_FACTOR * f.inherent + f.atol
