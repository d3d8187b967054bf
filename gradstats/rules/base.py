"""What every layer rule implements, and the helpers rules share.

A rule knows, for one kind of layer, how to get each example's squared gradient norm for each of
the layer's parameters from what the layer saw in forward (its inputs) and in backward (the
gradient of its output), and how to evaluate a cheap random projection of the summed gradient
(the contract probe, :mod:`gradstats.contract`). Rules hand every result to the monitor one
way: they write into a :class:`Sink`, a view of the monitor's preallocated accumulators.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: independent random directions per parameter in the contract probe
PROBES = 2


def needs(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is a parameter that needs a gradient."""
    p = getattr(module, name, None)
    return isinstance(p, torch.Tensor) and p.requires_grad


def directions(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[n, PROBES]`` float64 Gaussian probe directions from ``gen``."""
    return torch.randn(n, PROBES, generator=gen, dtype=torch.float64).to(device)


def flat3(t: torch.Tensor, B: int) -> torch.Tensor:
    """``t`` ``[B, ..., d]`` as ``[B, T, d]`` (the middle dims flattened), also for ``B = 0``."""
    return t.reshape(B, t.shape[1:-1].numel(), t.shape[-1])


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The precision rules compute in: the widest input dtype, at least float32."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


class Sink:
    """Where one use of a layer writes its results: the accumulator columns (``rows``) of its
    examples and the accumulator rows (slots) of its parameters.

    ``E[slot, rows[i]] += |u_i|^2`` for example ``i`` (:meth:`add`); when :attr:`probing`,
    ``P[slot] += (values, bounds)`` of the probe (:meth:`probe`). Slots of parameters that need
    no gradient are -1 and skipped.
    """

    __slots__ = ("E", "P", "rows", "slots", "vectors", "probing", "strategy", "forward")

    def __init__(self, E: torch.Tensor, P: torch.Tensor, rows: torch.Tensor,
                 slots: dict[str, int], vectors: dict[str, tuple[torch.Tensor, ...]] | None,
                 strategy: str = "auto", forward: Any = None):
        self.E, self.P, self.rows, self.slots = E, P, rows, slots
        self.vectors = vectors
        self.probing = vectors is not None
        self.strategy = strategy
        self.forward = forward  # the monitor's record of the forward these examples came from

    def slot(self, name: str) -> int:
        return self.slots.get(name, -1)

    def vec(self, name: str) -> tuple[torch.Tensor, ...] | None:
        """The probe directions of ``name`` on a probe step, else None."""
        if self.vectors is None or name not in self.slots:
            return None
        return self.vectors[name]

    def add(self, name: str, norms: torch.Tensor) -> None:
        """``E[slot(name), rows] += norms`` (``[B]``)."""
        s = self.slots.get(name, -1)
        if s >= 0 and self.rows.numel():
            self.E[s].index_add_(0, self.rows, norms.detach().to(self.E.dtype))

    def probe(self, name: str, value_bound: torch.Tensor) -> None:
        """``P[slot(name)] += value_bound`` (``[2 PROBES]``: values, then rounding bounds)."""
        s = self.slots.get(name, -1)
        if s >= 0:
            self.P[s].add_(value_bound.detach().to(self.P.dtype))


class Rule:
    """How one layer kind yields per-example squared gradient norms.

    In the layer's forward the monitor calls :meth:`capture`; the tensors it returns are saved
    through autograd (so activation checkpointing discards and recomputes them like the layer's
    own). When the gradient of the layer's output arrives, :meth:`collect` gets them back with
    that gradient and writes norms (and, on probe steps, the probe) into the sink. All tensors
    are in autograd's units (whatever scale the loss carried); the monitor converts.
    """

    #: whether :meth:`fused_forward` exists (dW and norms from one backward computation)
    supports_fused: bool = False
    #: whether the layer accepts inputs whose batch dim is not first (the monitor moves it)
    batch_dim_movable: bool = False
    #: whether the rule runs the module through its own forward in every mode
    replaces_forward: bool = False
    #: whether the rule also accounts for the parameters of the module's children
    claims_children: bool = False
    #: whether :meth:`capture` and :meth:`collect` trace into a torch.compile graph (pure tensor
    #: ops, no host reads): the compiled path of :mod:`gradstats.traced` may use the rule
    traceable: bool = False

    def check(self, module: nn.Module, name: str) -> None:
        """Raises ValueError, naming the module and option, for configurations not handled."""

    def params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters this rule accounts for, by the names its norms use."""
        return dict(module.named_parameters(recurse=False))

    def capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any
                ) -> tuple[torch.Tensor, ...]:
        """The tensors backward needs from forward; by default the first input, detached."""
        return (inputs[0].detach(),)

    def collect(self, module: nn.Module, saved: tuple[torch.Tensor, ...],
                grad_output: torch.Tensor, sink: Sink) -> None:
        """Writes each covered parameter's ``[B]`` per-example squared norms, and on probe steps
        its probe, into ``sink``."""
        raise NotImplementedError

    def norms(self, module: nn.Module, saved: Any, grad_output: torch.Tensor,
              batch: int | None = None) -> dict[str, torch.Tensor]:
        """``{name: [B] float64}`` per-example squared norms through :meth:`collect` into a
        scratch sink: a rule on its own, outside the monitor (for tests and tools)."""
        saved = saved if isinstance(saved, tuple) else (saved,)
        names = [k for k, p in self.params(module).items() if p.requires_grad]
        B = grad_output.shape[0] if batch is None else batch
        f64 = dict(dtype=torch.float64, device=grad_output.device)
        E = torch.zeros(len(names), B, **f64)
        P = torch.zeros(len(names), 2 * PROBES, **f64)
        rows = torch.arange(B, device=grad_output.device)
        self.collect(module, saved, grad_output, Sink(E, P, rows, {k: i for i, k in
                                                                  enumerate(names)}, None))
        return {k: E[i] for i, k in enumerate(names)}

    def factors(self, module: nn.Module, saved: tuple[torch.Tensor, ...],
                grad_output: torch.Tensor) -> dict[str, Factor]:
        """Factored per-example gradients (see :class:`Factor`), needed when a parameter is
        used more than once per forward; rules without them refuse shared parameters."""
        raise NotImplementedError

    def probe_vectors(self, name: str, param: torch.Tensor, gen: torch.Generator
                      ) -> tuple[torch.Tensor, ...]:
        """Fixed random directions for ``PROBES`` projections ``<V_j, grad>`` of ``name``.

        The default, which every rule of a shared parameter must agree on: rank-1
        ``V_j = x_j y_j^T`` over ``[shape[0], prod(shape[1:])]`` for tensors of 2+ dims (cheap
        against factored gradients), a plain vector for others."""
        if param.dim() >= 2:
            return (directions(param.shape[0], gen, param.device),
                    directions(param[0].numel(), gen, param.device))
        return (directions(param.numel(), gen, param.device),)

    def probe_grad(self, name: str, grad: torch.Tensor, vectors: tuple[torch.Tensor, ...]
                   ) -> torch.Tensor:
        """``[PROBES]`` float64: ``<V_j, grad>`` evaluated on a full gradient."""
        return probe_full(grad, vectors)


def probe_full(grad: torch.Tensor, vectors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``[PROBES]`` float64 ``<V_j, grad>`` for rank-1 (two vectors) or full (one) directions."""
    g = grad.double()
    if len(vectors) == 2:
        x, y = vectors
        return ((g.reshape(g.shape[0], -1) @ y) * x).sum(0)
    return vectors[0].t() @ g.reshape(-1)


@dataclass
class Factor:
    """One use's per-example gradient of a parameter in factored form,
    ``u_i = sum_t r_it c_it^T``: ``rows`` ``[B, T, R]`` (or ``row_ids`` ``[B, T]``, the one-hot
    rows of an embedding lookup, ``-1`` where a position contributes nothing) and ``cols``
    ``[B, T, C]``. A bias is ``cols = 1``. Cross terms between two uses of a shared parameter
    come from these without forming ``u_i``."""

    cols: torch.Tensor
    rows: torch.Tensor | None = None
    row_ids: torch.Tensor | None = None


def dense_factor(g: torch.Tensor) -> Factor:
    """A per-example gradient ``[B, *shape]`` as a factor ``sum_j D[:, j] e_j^T`` over the
    ``[shape[0], rest]`` view (columns as positions)."""
    B = g.shape[0]
    d = g.reshape(B, g.shape[1] if g.dim() > 1 else 1, -1)
    C = d.shape[2]
    eye = torch.eye(C, dtype=d.dtype, device=d.device).expand(B, C, C)
    return Factor(cols=eye, rows=d.transpose(1, 2))


def cross_term(f1: Factor, f2: Factor) -> torch.Tensor:
    """``[B]`` float64: ``<u1_i, u2_i> = sum_{t,s} (c1_t . c2_s)(r1_t . r2_s)``."""
    if f1.rows is None and f2.rows is None:
        return _ids_cross_term(f1, f2)
    c1, c2 = f1.cols.double(), f2.cols.double()
    ka = torch.bmm(c1, c2.transpose(1, 2))
    if f1.rows is not None and f2.rows is not None:
        kg = torch.bmm(f1.rows.double(), f2.rows.double().transpose(1, 2))
    elif f1.rows is not None or f2.rows is not None:
        dense, ids, flip = ((f1.rows, f2.row_ids, False) if f1.rows is not None
                            else (f2.rows, f1.row_ids, True))
        T_dense = dense.shape[1]
        idx = ids.clamp_min(0)[:, None, :].expand(-1, T_dense, -1)
        # gather at the ids first: never a float64 copy of a [B, T, vocab] logits gradient
        kg = dense.gather(2, idx).double() * (ids >= 0)[:, None, :]
        if flip:
            kg = kg.transpose(1, 2)
    return (ka * kg).sum((1, 2))


def _ids_cross_term(f1: Factor, f2: Factor) -> torch.Tensor:
    """Two embedding lookups: ``<dE1_i, dE2_i> = sum_v S1_i[v] . S2_i[v]`` with ``S_i[v]`` the
    sum of the columns at the positions holding id ``v``; segment sums over (example, id), so
    memory grows with the positions, not with their pairs (T5's bias has Tq x Tk of them)."""
    B = f1.cols.shape[0]
    i1, i2 = f1.row_ids.long(), f2.row_ids.long()
    width = int(max(i1.max().item() if i1.numel() else 0, i2.max().item() if i2.numel() else 0)) + 2
    ex1 = torch.arange(B, device=i1.device)[:, None].expand_as(i1)
    ex2 = torch.arange(B, device=i2.device)[:, None].expand_as(i2)
    k1 = (ex1 * width + i1 + 1).reshape(-1)  # id -1 (padding) -> column 0 of the example
    k2 = (ex2 * width + i2 + 1).reshape(-1)
    keys, inv = torch.unique(torch.cat([k1, k2]), return_inverse=True)
    d = f1.cols.shape[-1]
    s1 = torch.zeros(keys.numel(), d, dtype=torch.float64, device=keys.device)
    s2 = torch.zeros_like(s1)
    s1.index_add_(0, inv[:k1.numel()], f1.cols.reshape(-1, d).double())
    s2.index_add_(0, inv[k1.numel():], f2.cols.reshape(-1, d).double())
    dots = (s1 * s2).sum(1) * ((keys % width) != 0)  # padding positions contribute nothing
    return torch.zeros(B, dtype=torch.float64, device=keys.device).index_add_(0, keys // width,
                                                                               dots)


def _work(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def factored_probe(rows: torch.Tensor, cols: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                   ) -> torch.Tensor:
    """``[2 PROBES]``: ``<x_j y_j^T, sum_t r_t c_t^T>`` for rows ``[N, R]`` and cols ``[N, C]``,
    then a bound on the sum of the absolute values of its terms (the rounding scale),
    ``|x_j||y_j| sum_t |r_t||c_t|`` by Cauchy-Schwarz.

    Matrix-vector products run in the inputs' precision (float32 or float64) and their per-row
    results are combined in float64: no float64 or absolute-value copies of ``rows``/``cols``."""
    r, c = _work(rows), _work(cols)
    xs, ys = x.to(r.dtype), y.to(c.dtype)
    value = [(r @ xs[:, j]).double() @ (c @ ys[:, j]).double() for j in range(x.shape[1])]
    scale = (torch.linalg.vector_norm(r, dim=1).double()
             @ torch.linalg.vector_norm(c, dim=1).double())
    bound = scale * torch.linalg.vector_norm(x, dim=0) * torch.linalg.vector_norm(y, dim=0)
    return torch.cat([torch.stack(value), bound])


def summed_probe(rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[2 PROBES]``: ``<v_j, sum_t r_t>`` for rows ``[N, R]``, then the bound
    ``|v_j| sum_t |r_t|``."""
    r = _work(rows)
    value = r.sum(0).double() @ v
    bound = torch.linalg.vector_norm(r, dim=1).double().sum() * torch.linalg.vector_norm(v, dim=0)
    return torch.cat([value, bound])


def dense_probe(per_example: torch.Tensor, vectors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``[2 PROBES]`` from explicit per-example gradients ``[B, *shape]``: ``<V_j, sum_i u_i>``
    and the bound ``<|V_j|, sum_i |u_i|>``."""
    d = per_example.double()
    total, absolute = d.sum(0), d.abs().sum(0)
    return torch.cat([probe_full(total, vectors),
                      probe_full(absolute, tuple(v.abs() for v in vectors))])
