"""Which tensors carry the batch, decided from where they came from, never from their sizes, and
the function-level coverage of parameters that no layer rule claims.

The root module's inputs carry the batch (the most common leading size among the tensors in its
positional and keyword arguments and in nested dicts, lists, tuples and dataclasses). During a
counted forward a :class:`torch.overrides.TorchFunctionMode` follows two kinds of tensors:

* **batch-free** ones: factory outputs (``torch.arange(T)``, ``zeros``, ...), buffers, parameters
  and everything computed from those alone. A *derived* tensor is one that depends on
  parameters; it keeps a replay of how it was computed from its *sources* (parameters, or a
  layer-rule call on batch-free inputs such as nanoGPT's ``wpe(torch.arange(T))``);
* the **layout** of batched tensors whose batch axis moved (``x.transpose(0, 1)``) or was merged
  with positions (HF ``Conv1D``'s ``x.view(-1, d)``), so the batch axis is known from
  provenance, never from a size coincidence (``T == B`` included).

Where a derived tensor meets a batched one, a function rule (:mod:`gradstats.rules.functional`)
takes each example's gradient of the derived tensor: the matmul family, embedding, the norm
functions and convolutions through the layer maths; broadcasting ops and ``cat`` by tapping the
derived operand expanded to the batch; anything else through ``torch.func`` for that one call.
The per-example gradients then flow back through the replay to the sources.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["find_batch", "tensor_leaves", "Provenance", "Derived", "Source", "ProvenanceError",
           "in_recomputation"]


class ProvenanceError(RuntimeError):
    """A parameter use the function level cannot take per example (named in the message)."""


_F = torch.nn.functional
_FACTORIES = {
    torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor,
    torch.as_tensor, torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn,
    torch.randint, torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
    torch.rand_like, torch.randn_like, torch.Tensor.new_zeros, torch.Tensor.new_ones,
    torch.Tensor.new_full, torch.Tensor.new_empty, torch.Tensor.new_tensor, torch.tril_indices,
    torch.triu_indices,
}
_RANDOM = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
           torch.bernoulli, torch.Tensor.bernoulli_, torch.Tensor.uniform_, torch.Tensor.normal_,
           _F.dropout, torch.dropout, torch.Tensor.random_, torch.multinomial}
#: ops that leave the batch axis where it is and combine operands by broadcasting
ELEMENTWISE = {
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.addcmul,
    torch.addcdiv, torch.where, torch.maximum, torch.minimum, torch.lerp, torch.pow,
    torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div,
    torch.Tensor.add_, torch.Tensor.sub_, torch.Tensor.mul_, torch.Tensor.div_,
    torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__,
    torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.__isub__,
    torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__imul__,
    torch.Tensor.__truediv__, torch.Tensor.__rtruediv__, torch.Tensor.__itruediv__,
    torch.Tensor.addcmul, torch.Tensor.addcmul_, torch.Tensor.lerp, torch.Tensor.pow,
    torch.Tensor.__pow__, torch.Tensor.masked_fill, torch.Tensor.type_as,
}
#: ops that map a parameter onto a tensor with the same entries (norms of gradients preserved)
ISOMETRIC = {
    torch.Tensor.t, torch.t, torch.transpose, torch.Tensor.transpose, torch.Tensor.T.__get__,
    torch.Tensor.mT.__get__, torch.Tensor.permute, torch.permute, torch.Tensor.view,
    torch.Tensor.reshape, torch.reshape, torch.flatten, torch.Tensor.flatten,
    torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze, torch.squeeze,
    torch.Tensor.contiguous, torch.Tensor.clone, torch.clone, torch.Tensor.to,
    torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16,
    torch.Tensor.type_as, torch.Tensor.view_as, torch.Tensor.reshape_as,
}
_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.flatten,
          torch.Tensor.flatten}
_MOVES = {torch.transpose, torch.Tensor.transpose, torch.Tensor.permute, torch.permute,
          torch.movedim, torch.Tensor.movedim, torch.swapaxes, torch.Tensor.swapaxes,
          torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze, torch.squeeze,
          torch.t, torch.Tensor.t}


def in_recomputation() -> bool:
    """Whether this forward is non-reentrant checkpointing's recomputation inside backward."""
    if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
        return False
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return hooks is not None and "_recomputation_hook" in getattr(hooks[0], "__qualname__", "")


def tensor_leaves(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in ``obj``: itself, or inside mappings, lists, tuples and dataclasses."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 8:
        return
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensor_leaves(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensor_leaves(v, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensor_leaves(getattr(obj, f.name), depth + 1)


def find_batch(args: tuple, kwargs: dict, batch_dim: int = 0) -> int | None:
    """The batch size of a root call: the most common size of dim ``batch_dim`` among the tensor
    inputs (positional, keyword, nested) that have it; the first such input breaks ties."""
    sizes: dict[int, int] = {}
    for t in tensor_leaves((args, kwargs)):
        if t.dim() > batch_dim:
            b = t.shape[batch_dim]
            sizes[b] = sizes.get(b, 0) + 1
    if not sizes:
        return None
    top = max(sizes.values())
    return next(b for b, c in sizes.items() if c == top)


def _args_tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among an op's arguments (top level and one level of lists/tuples)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


@dataclasses.dataclass(eq=False)
class Source:
    """A parameter (``param``), or a layer-rule call on batch-free inputs (``layer`` with the
    ``saved`` inputs its rule needs and its ``output``)."""

    param: nn.Parameter | None = None
    layer: Any = None
    saved: tuple = ()
    output: torch.Tensor | None = None
    uses: int = 0  # meetings with the batch in this forward

    @property
    def value(self) -> torch.Tensor:
        return self.param if self.param is not None else self.output


@dataclasses.dataclass(eq=False)
class Derived:
    """A batch-free tensor: ``fn(*source values)`` recomputes it from its sources (none for a
    constant). ``expanded`` records that its last op broadcast dim ``dim`` of ``base`` from 1."""

    sources: tuple[Source, ...] = ()
    fn: Callable[..., torch.Tensor] | None = None
    random: bool = False
    iso: bool = True  # a single source mapped entry for entry (transposes, views, casts)
    base: Derived | None = None
    base_tensor: torch.Tensor | None = None
    expanded_dim: int = -1


@dataclasses.dataclass(eq=False)
class Layout:
    """Where a batched tensor keeps its batch: dim ``axis`` holds ``groups`` consecutive
    positions of each example (``groups > 1`` after merging the batch with positions);
    ``axis=None`` when it cannot be told."""

    axis: int | None
    groups: int = 1


class Provenance(TorchFunctionMode):
    """Follows one counted forward (see the module docstring). ``on_meet(func, args, kwargs,
    derived)`` is called where a derived tensor meets the batch and returns the op's result."""

    def __init__(self, model: nn.Module, on_meet: Callable[..., Any]):
        super().__init__()
        self.on_meet = on_meet
        self.batch = 0
        self.inside = 0  # depth of covered modules whose forward is running
        self._tracked: dict[int, tuple[weakref.ref, Derived]] = {}
        self._layouts: dict[int, tuple[weakref.ref, Layout]] = {}
        self._static: dict[int, tuple[weakref.ref, Derived]] = {}
        self.refresh(model, {})

    def refresh(self, model: nn.Module, function_params: dict[int, Any]) -> None:
        """Parameters covered at the function level are sources; buffers and every other
        parameter are constants (a layer rule covers those within their module)."""
        self._static.clear()
        const = Derived()
        for t in [*model.parameters(), *model.buffers()]:
            self._static[id(t)] = (weakref.ref(t), const)
        self._function_params = function_params
        for pid, st in function_params.items():
            if getattr(st.rule, "multi_output", False):
                continue  # the torch.func fallback accounts for its module's own parameters
            p = st.param
            self._static[pid] = (weakref.ref(p), Derived((Source(param=p),), _identity))

    def add_source(self, p: torch.Tensor) -> None:
        """A parameter object (FSDP2's unsharded copy) that stands for a covered parameter."""
        self._static[id(p)] = (weakref.ref(p), Derived((Source(param=p),), _identity))

    def begin(self, batch: int) -> None:
        self.batch = batch
        self._tracked.clear()
        self._layouts.clear()
        for _, d in self._static.values():
            for s in d.sources:
                s.uses = 0

    # ------------------------------------------------------------------------- queries
    def derived(self, t: torch.Tensor) -> Derived | None:
        """The record of a batch-free tensor (a constant has no sources), None when batched."""
        i = id(t)
        entry = self._tracked.get(i) or self._static.get(i)
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def layout(self, t: torch.Tensor) -> Layout:
        entry = self._layouts.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return Layout(0, 1)

    def batch_first(self, t: torch.Tensor, what: str, lay: Layout | None = None) -> torch.Tensor:
        """``t`` as ``[B, ...]``: its batch axis moved first and merged positions split off
        (``lay``: its layout when ``t`` is shaped like a tracked tensor, e.g. its gradient)."""
        lay = self.layout(t) if lay is None else lay
        if lay.axis is None:
            raise ProvenanceError(f"{what}: cannot tell which axis of a {tuple(t.shape)} tensor "
                                  "is the batch (it went through an op gradstats does not "
                                  "follow)")
        if lay.axis:
            t = t.movedim(lay.axis, 0)
        if lay.groups > 1:
            t = t.unflatten(0, (-1, lay.groups))
        if t.shape[0] != self.batch:
            raise ProvenanceError(f"{what}: a {tuple(t.shape)} tensor should carry the batch "
                                  f"of {self.batch} examples in dim 0")
        return t

    def mark(self, t: torch.Tensor, d: Derived) -> None:
        self._tracked[id(t)] = (weakref.ref(t), d)

    def set_layout(self, t: torch.Tensor, lay: Layout) -> None:
        if lay.axis == 0 and lay.groups == 1:
            self._layouts.pop(id(t), None)
        else:
            self._layouts[id(t)] = (weakref.ref(t), lay)

    # ------------------------------------------------------------------------- the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside:
            return func(*args, **kwargs)
        if func in _FACTORIES:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                self.mark(out, Derived(random=_random(func, args, kwargs)))
            return out
        tensors = _args_tensors(args, kwargs)
        if not tensors:
            return func(*args, **kwargs)
        records = [self.derived(t) for t in tensors]
        target = _inplace_target(func, args)
        if target is not None:
            return self._inplace(func, args, kwargs, tensors, records, target)
        if not any(r is not None and r.sources for r in records):
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                if all(r is not None for r in records):
                    self.mark(out, Derived(random=_random(func, args, kwargs)
                                           or any(r.random for r in records)))
                else:
                    self._follow_layout(func, args, tensors, records, out)
            return out
        if all(r is not None for r in records):
            return self._derive(func, args, kwargs, tensors, records)
        derived = {id(t): r for t, r in zip(tensors, records) if r is not None and r.sources}
        out = self.on_meet(func, args, kwargs, derived)
        self._follow_layout(func, args, tensors, records, out)
        return out

    def _inplace(self, func, args, kwargs, tensors, records, target: torch.Tensor):
        """An op that writes into ``target`` (``x.mul_(w)``, ``x[:, 1:] = y``): a batch-free
        target that receives batched values carries the batch from now on; one that receives
        parameter-derived values cannot be replayed per example."""
        others = [r for t, r in zip(tensors, records) if t is not target]
        mine = self.derived(target)
        if mine is None or all(r is None for r in others):
            if mine is not None:  # batched values written into a batch-free tensor
                self._tracked.pop(id(target), None)
            if any(r is not None and r.sources for r in others):
                derived = {id(t): r for t, r in zip(tensors, records)
                           if r is not None and r.sources}
                return self.on_meet(func, args, kwargs, derived)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if any(r.sources for r in others) or mine.sources:
            src = tuple(dict.fromkeys([*mine.sources, *(s for r in others for s in r.sources)]))
            self.mark(target, Derived(src, _unreplayable, random=True))
        else:
            self.mark(target, Derived(random=mine.random or _random(func, args, kwargs)))
        return out

    def _derive(self, func, args, kwargs, tensors, records):
        """A batch-free op on derived tensors: the result is derived, with a replay."""
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return out
        leaves, spec = tree_flatten((args, kwargs))
        sources: list[Source] = []
        slots = []  # per leaf: None, or (record, indices of its sources)
        by_id = {id(t): r for t, r in zip(tensors, records)}
        for leaf in leaves:
            r = by_id.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if r is None or not r.sources:
                slots.append(None)
                continue
            idx = []
            for s in r.sources:
                if s not in sources:
                    sources.append(s)
                idx.append(sources.index(s))
            slots.append((r, idx))
        consts = [None if sl is not None else leaf for leaf, sl in zip(leaves, slots)]

        def fn(*values):
            new = [c if sl is None else sl[0].fn(*(values[i] for i in sl[1]))
                   for c, sl in zip(consts, slots)]
            a, k = tree_unflatten(new, spec)
            return func(*a, **k)

        derived = [r for r in records if r.sources]
        d = Derived(tuple(sources), fn, random=_random(func, args, kwargs) or any(r.random for r in records),
                    iso=(len(sources) == 1 and len(derived) == 1 and derived[0].iso
                         and func in ISOMETRIC))
        if func in (torch.Tensor.expand, torch.Tensor.expand_as, torch.broadcast_to):
            src = tensors[0]
            grown = [i for i in range(out.dim()) if i >= out.dim() - src.dim()
                     and src.shape[i - (out.dim() - src.dim())] == 1 and out.shape[i] > 1]
            if len(grown) == 1 and out.dim() == src.dim():
                d.base, d.base_tensor, d.expanded_dim = by_id[id(src)], src, grown[0]
        self.mark(out, d)
        return out

    def _follow_layout(self, func, args, tensors, records, out) -> None:
        """Records where a batched result keeps its batch when an op moved it, or merged it with
        positions; results that keep dim 0 keep the batched operand's layout."""
        src = next((t for t, r in zip(tensors, records) if r is None), None)
        if src is None or not isinstance(out, torch.Tensor):
            return
        lay = self.layout(src)
        if func in _VIEWS:
            self.set_layout(out, self._viewed(src, out, lay))
        elif func in _MOVES:
            self.set_layout(out, _moved(func, args, src, out, lay))
        elif lay.axis == 0 and lay.groups == 1:
            return
        elif func in ELEMENTWISE and lay.axis is not None:
            self.set_layout(out, Layout(lay.axis + out.dim() - src.dim(), lay.groups))
        elif lay.axis == 0 and out.dim() and out.shape[0] == src.shape[0]:
            self.set_layout(out, lay)
        else:
            self.set_layout(out, Layout(None))

    def _viewed(self, src: torch.Tensor, out: torch.Tensor, lay: Layout) -> Layout:
        """A reshape of a tensor whose dim 0 holds ``B * groups`` rows, examples first: the
        output's dim 0 is the batch again, or the batch merged with ``g`` positions."""
        if lay.axis != 0 or out.dim() == 0:
            return Layout(None) if lay.axis != 0 else lay
        B = self.batch
        if out.shape[0] == B:
            return Layout(0, 1)
        if B and out.shape[0] % B == 0:
            return Layout(0, out.shape[0] // B)
        return Layout(None)


def _moved(func, args, src: torch.Tensor, out: torch.Tensor, lay: Layout) -> Layout:
    """The batch axis after a transpose, permute, movedim, unsqueeze or squeeze."""
    if lay.axis is None:
        return lay
    a = lay.axis
    rest = [x for x in args[1:]]
    try:
        if func in (torch.t, torch.Tensor.t):
            return Layout(1 - a if src.dim() == 2 else a, lay.groups)
        if func in (torch.transpose, torch.Tensor.transpose, torch.swapaxes,
                    torch.Tensor.swapaxes):
            d0, d1 = (x % src.dim() for x in rest[:2])
            return Layout(d1 if a == d0 else d0 if a == d1 else a, lay.groups)
        if func in (torch.Tensor.permute, torch.permute):
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            dims = [d % src.dim() for d in dims]
            return Layout(dims.index(a), lay.groups)
        if func in (torch.movedim, torch.Tensor.movedim):
            s, d = rest[0], rest[1]
            s = [s] if isinstance(s, int) else list(s)
            d = [d] if isinstance(d, int) else list(d)
            order = [i for i in range(src.dim()) if i not in [x % src.dim() for x in s]]
            for si, di in sorted(zip([x % src.dim() for x in s], [x % out.dim() for x in d]),
                                 key=lambda p: p[1]):
                order.insert(di, si)
            return Layout(order.index(a), lay.groups)
        if func in (torch.Tensor.unsqueeze, torch.unsqueeze):
            d = rest[0] % out.dim()
            return Layout(a + 1 if d <= a else a, lay.groups)
        if func in (torch.Tensor.squeeze, torch.squeeze):
            if out.dim() == src.dim():
                return lay
            if not rest:
                return Layout(a - sum(1 for i in range(a) if src.shape[i] == 1), lay.groups)
            dims = rest[0] if isinstance(rest[0], (list, tuple)) else [rest[0]]
            dims = [x % src.dim() for x in dims if src.shape[x % src.dim()] == 1]
            return Layout(a - sum(1 for x in dims if x < a), lay.groups)
    except (TypeError, ValueError, IndexError):
        pass
    return Layout(None)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _unreplayable(*values):
    raise ProvenanceError("a parameter-derived tensor was written in place before it met the "
                          "batch; its per-example gradients cannot be replayed")


def _random(func, args: tuple, kwargs: dict) -> bool:
    """Whether a call draws random numbers (dropout only with p > 0 in training)."""
    if func not in _RANDOM:
        return False
    if func in (_F.dropout, torch.dropout):
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        train = args[2] if len(args) > 2 else kwargs.get("training", kwargs.get("train", True))
        return bool(train) and float(p) > 0
    return True


def _inplace_target(func, args: tuple) -> torch.Tensor | None:
    """The tensor an in-place method writes into (``add_``, ``copy_``, ``__setitem__``)."""
    name = getattr(func, "__name__", "")
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    if name == "__setitem__" or (name.endswith("_") and not name.startswith("__")) or \
            name in ("__iadd__", "__isub__", "__imul__", "__itruediv__"):
        return args[0]
    return None


def alignment(func, out_dim: int, batched: torch.Tensor, batched_layout: Layout,
              y: torch.Tensor) -> tuple[str, int]:
    """How a derived operand ``y`` lines up with the batch in ``func``: ``("broadcast", k)``
    (``y`` has no batch: every example uses all of it; ``k`` its dim aligned with the batch,
    negative when absent), ``("aligned", k)`` (``y``'s dim ``k`` runs over the examples) or
    ``("other", -1)``."""
    if batched_layout.axis is None or batched_layout.groups > 1:
        return "other", -1
    if func in ELEMENTWISE:
        a = batched_layout.axis + (out_dim - batched.dim())
        k = a - (out_dim - y.dim())
        if k < 0 or y.shape[k] == 1:
            return "broadcast", k
        if y.shape[k] == batched.shape[batched_layout.axis]:
            return "aligned", k
        return "other", -1
    if y.dim() == batched.dim() and y.shape[batched_layout.axis] == batched.shape[batched_layout.axis]:
        return "aligned", batched_layout.axis
    return "other", -1


def prod(xs) -> int:
    return math.prod(xs)
