"""The monitor's hooks: forward bookkeeping, the output-gradient taps, fused forwards, cross
terms of shared parameters and deferred contributions.

Data path: the root's forward pre-hook finds the batch and reserves accumulator columns for its
examples; a covered module's forward hook saves what its rule needs (through autograd's
saved-tensor hooks, so activation checkpointing discards and recomputes it like the module's own
saved tensors) and registers a hook on its output; when the output's gradient arrives that hook
makes one rule call, which writes norms and probe values into the accumulators. Fused layers run a
forward whose backward does the same inside one op.

Counting happens in backward: a use counts when its gradient arrives. Under non-reentrant
checkpointing the recomputed forward registers hooks that never fire; under reentrant
checkpointing the first forward runs without grad and the recomputed one, inside backward, is the
one whose hooks fire. Either way each use is counted once.

Everything the hooks hold is reached through weak references and a registry keyed by module, so a
``copy.deepcopy`` of the model (an EMA or teacher copy) is a plain model.
"""
from __future__ import annotations

import threading
import types
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .accumulators import Accumulators
from .contract import ContractError
from .layers import Coverage, LayerState
from . import traced
from .provenance import Derived, Layout, Provenance, Source, in_recomputation, tensor_leaves
from .rules.base import Factor, Sink, cross_term, dense_factor
from .saved import pack_saved, unpack_saved

__all__ = ["Hooks", "Forward"]

#: root module -> its hooks (one monitor per model)
_WATCHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()
#: module -> (hooks, layer) for fused and replaced forwards; copies of a module are not in it
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, LayerState]] = (
    weakref.WeakKeyDictionary())


RECOMPUTED = ("a covered layer's forward ran inside backward (activation checkpointing "
              "recomputes it)")


class Forward:
    """One counted forward of the root module: its index in the step and its examples'
    accumulator columns."""

    __slots__ = ("fid", "rows", "batch", "seen")

    def __init__(self, fid: int, rows: torch.Tensor, batch: int):
        self.fid, self.rows, self.batch = fid, rows, batch
        self.seen = False  # set when a backward pass reaches one of its uses


def _eager(fn: Callable) -> Callable:
    """``fn`` run outside any torch.compile graph (dynamo breaks the graph around it)."""
    return torch.compiler.disable(fn, recursive=True)


def _identity_fn(x: torch.Tensor) -> torch.Tensor:
    return x


_identity_fn.__name__ = "_identity"


def _layer_installed(module: nn.Module):
    entry = _INSTALLED.get(module)
    if entry is None:
        return None, None
    return entry


def _fused_forward(module: nn.Module, *args, **kwargs):
    hooks, layer = _layer_installed(module)
    if hooks is None:  # a deepcopy of a watched module
        return type(module).forward(module, *args, **kwargs)
    from .fused import run_fused

    return run_fused(hooks, layer, args, kwargs)


class Hooks:
    """Installs and runs the monitor's hooks on ``model``; writes into ``acc``."""

    def __init__(self, model: nn.Module, coverage: Coverage, acc: Accumulators, *,
                 mode: str, batch_dim: int, strategy: str,
                 begin_forward: Callable[[Any, Any], Forward | None],
                 note_dtype: Callable[[torch.dtype], None] = lambda dtype: None):
        from .rules.functional import FunctionLevel

        self.model, self.coverage, self.acc = model, coverage, acc
        self.provenance = Provenance(model, on_meet=self._meet)
        by_id = {id(p.param): p for p in coverage.params}
        self.provenance.refresh(model, by_id)
        self.functional = FunctionLevel(self, self.provenance, by_id)
        self._mode_depth = 0
        self._backward_mode: int | None = None  # thread that pushed the mode for a recompute
        self._traced: list[str] = []  # per running covered module: how its forward is followed
        self.uses: dict[tuple[int, int], int] = {}  # (slot, fid) -> function-level uses
        self._slot_layer = {p.slot: layer for layer in coverage.layers.values()
                            for p in layer.params.values()}
        self.note_dtype = note_dtype
        self.batch_dim, self.strategy = batch_dim, strategy
        self.begin_forward = begin_forward
        self.measuring = True
        self.probing = True
        self.paused = 0
        self.fwd: Forward | None = None
        self.calls: dict[tuple[int, int], int] = {}
        self.factors: dict[tuple[int, int, str | None], list[Factor]] = {}
        self.stash: dict[tuple[int, int], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.by_module: weakref.WeakKeyDictionary[nn.Module, LayerState] = (
            weakref.WeakKeyDictionary())
        self.handles: list[Any] = []
        # the compiled path (gradstats.traced): its plan, and what the eager path learns for it
        self.plan = "learning"  # "ready": compiled forwards take gradstats.traced; or "never"
        self.never_why: str | None = None
        self.fast = False  # this step's eager forwards take gradstats.traced too (the monitor)
        self.no_fast: str | None = None  # why eager steps never take it (found on the way)
        self.spoiled: str | None = None  # why this fast-path step cannot be measured
        self.plain: dict[tuple[int, int], int] = {}  # (layer, fid) -> uses on a dim-0 batch
        self.plain_root = True
        self.free: dict[tuple[int, int], tuple] = {}  # (layer, fid) -> forms of its meets
        self.treatment: dict[int, str] = {}  # id(layer) -> its form on the compiled path
        self.traced_rows: torch.Tensor | None = None
        self.traced_batch: Any = None
        self.units: Any = None  # the monitor's LossUnits
        acc.hits = torch.zeros(len(coverage.layers), dtype=torch.int64)
        acc.fast_hits = [0] * len(coverage.layers)
        self._vectors = {id(layer): {k: p.vectors for k, p in layer.params.items()}
                         for layer in coverage.layers.values()}
        self._slots = {id(layer): layer.slots for layer in coverage.layers.values()}
        self._attach(mode)

    # ------------------------------------------------------------------------- install
    def _attach(self, mode: str) -> None:
        ref = weakref.ref(self)
        other = _WATCHED.get(self.model)
        if other is not None and other() is not None:
            raise ValueError("this model already has a GradStatsMonitor attached; call "
                             "detach() on it first (two monitors would split the hooks and "
                             "one would silently record nothing)")
        _WATCHED[self.model] = ref

        def root_pre(module, args, kwargs):
            hooks = ref()
            if hooks is not None and module is hooks.model:
                hooks._on_root(args, kwargs)

        def root_post(module, args, kwargs, output):
            hooks = ref()
            if hooks is not None and module is hooks.model:
                hooks._on_root_end()

        def on_forward(module, args, *rest):
            hooks = ref()
            if hooks is None or module not in hooks.by_module:
                return None
            how = hooks._traced.pop()
            if how == "traced":
                return None  # followed through the function level instead
            if how == "inside":
                hooks.provenance.inside -= 1
            return hooks._on_forward(module, args, rest)

        def enter(module, args, *rest):
            hooks = ref()
            if hooks is not None and module in hooks.by_module:
                hooks._wake()
                if hooks._derived_input(args):
                    hooks._traced.append("traced")
                elif getattr(hooks.by_module[module].rule, "multi_output", False):
                    hooks._traced.append("plain")  # the fallback: its children are followed
                else:
                    hooks._traced.append("inside")
                    hooks.provenance.inside += 1

        def wake(module, args):
            hooks = ref()
            if hooks is not None:
                hooks._wake()

        owners: dict[str, list] = {}
        for st in self.coverage.functional.values():
            owners.setdefault(st.layer, []).append(st)
        modules = dict(self.model.named_modules())

        def refresh(module, args):
            hooks = ref()
            if hooks is not None:
                hooks._refresh(module)

        # torch.compile: each hook runs eagerly (a graph break around it), so the taps it
        # registers sit on real tensors and its bookkeeping runs; see README "torch.compile"
        wake, refresh, enter, on_forward = map(_eager, (wake, refresh, enter, on_forward))
        eager_pre, eager_post = _eager(root_pre), _eager(root_post)

        # with the plan ready, compiled forwards trace gradstats.traced instead: no breaks; so
        # do the eager forwards of a fast-path step
        def root_pre(module, args, kwargs):
            hooks = ref()
            if hooks is not None and hooks.plan == "ready" and module is hooks.model:
                if torch.compiler.is_compiling():
                    return None  # traced.root runs inside the root's forward
                if hooks.fast:
                    traced.root(hooks, args, kwargs)
                    return None
            return eager_pre(module, args, kwargs)

        def root_post(module, args, kwargs, output):
            hooks = ref()
            if hooks is not None and hooks.plan == "ready" and module is hooks.model:
                if torch.compiler.is_compiling():
                    return None
                if hooks.fast:
                    # traced_rows stays: a checkpointed segment recomputed in backward needs
                    # its Functions back (traced._recomputing spoils the step); a layer called
                    # on its own later shows in the counts
                    return None
            return eager_post(module, args, kwargs, output)

        traced.register(ref, self.coverage.layers.values())
        self._owners = {modules[name]: sts for name, sts in owners.items()}
        for m in self._owners:
            self.handles.append(m.register_forward_pre_hook(refresh))
        # A checkpointed segment recomputed inside backward runs without the root's forward:
        # the mode must be back for it. Every module above a function-level parameter wakes it.
        ancestors = {"" if "." not in n else n.rsplit(".", 1)[0] for n in owners}
        for name in list(ancestors):
            while name:
                name = name.rsplit(".", 1)[0] if "." in name else ""
                ancestors.add(name)
        for name in sorted(ancestors | set(owners)):
            if name and modules[name] not in self.coverage.layers.values():
                self.handles.append(modules[name].register_forward_pre_hook(wake))
        self.handles.append(self.model.register_forward_pre_hook(root_pre, with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(root_post, with_kwargs=True,
                                                             always_call=True))
        for layer in self.coverage.layers.values():
            m, rule = layer.module, layer.rule
            self.by_module[m] = layer
            fuse = mode == "fused" and rule.supports_fused and self.batch_dim == 0
            if rule.replaces_forward or fuse:
                layer.fused = True
                _INSTALLED[m] = (self, layer)
                m.forward = types.MethodType(traced.fused_method(id(layer), _eager(_fused_forward)), m)
            else:
                self.handles.append(m.register_forward_pre_hook(traced.either_pre(id(layer), enter)))
                self.handles.append(m.register_forward_hook(
                    traced.either_post(id(layer), on_forward),
                    with_kwargs=getattr(rule, "wants_kwargs", False), always_call=True))

    def detach(self) -> None:
        if _WATCHED.get(self.model) is not None and _WATCHED[self.model]() is self:
            del _WATCHED[self.model]
        for h in self.handles:
            h.remove()
        self.handles.clear()
        traced.unregister(self.coverage.layers.values())
        traced.unwrap_root(self.model)
        for layer in self.coverage.layers.values():
            if _INSTALLED.get(layer.module, (None,))[0] is self:
                del _INSTALLED[layer.module]
                if "forward" in vars(layer.module):
                    del layer.module.forward
            layer.fused = False

    # ------------------------------------------------------------------------- forward
    def counting(self) -> bool:
        """Whether a forward starting now is a training forward to count: measured step, not
        paused, grad enabled, and not inside a torch.func transform (a user's own per-example
        reference, or the fallback rule)."""
        return (self.measuring and not self.paused and torch.is_grad_enabled()
                and torch._C._functorch.peek_interpreter_stack() is None)

    def _on_root(self, args, kwargs) -> None:
        self.settle()
        if not self.counting() or in_recomputation():
            return
        self.fwd = self.begin_forward(args, kwargs)
        if self.fwd is not None:
            # the compiled path takes the batch from this tensor, found by traced's own walk
            # (plain containers only): an input it would not find, or find another way, never
            # lets the plan become ready
            first = next(traced.tensors((args, kwargs)), None)
            if (first is None or first is not next(tensor_leaves((args, kwargs)), None)
                    or first.dim() == 0 or first.shape[0] != self.fwd.batch):
                self.plain_root = False
        if self.fwd is not None and self._mode_depth == 0:
            self.provenance.begin(self.fwd.batch)
            if self.batch_dim:
                for t in tensor_leaves((args, kwargs)):
                    if t.dim() > self.batch_dim and t.shape[self.batch_dim] == self.fwd.batch:
                        self.provenance.set_layout(t, Layout(self.batch_dim))
            self.provenance.inside = 0
            self.provenance.__enter__()
            self._mode_depth = 1

    def _on_root_end(self) -> None:
        if self._mode_depth:
            self._mode_depth = 0
            self.provenance.__exit__(None, None, None)

    def reset(self) -> None:
        self.fwd = None
        self.uses.clear()
        self.calls.clear()
        self.factors.clear()
        self.stash.clear()
        self.plain.clear()
        self.free.clear()
        self.plain_root = True
        self.spoiled = None

    def _sink(self, layer: LayerState, fwd: Forward) -> Sink:
        vectors = self._vectors[id(layer)] if self.probing else None
        return Sink(self.acc.E, self.acc.P, fwd.rows, self._slots[id(layer)], vectors,
                    self.strategy, fwd)

    def _use(self, layer: LayerState, requires_grad: bool) -> tuple[Forward, int] | None:
        """The forward a call of ``layer`` belongs to and its index among that forward's calls
        of the layer, or None when the call is not counted."""
        fwd = self.fwd
        if fwd is None or not self.measuring or self.paused:
            return None
        key = (id(layer), fwd.fid)
        call = self.calls.get(key, 0)
        if torch._C._current_graph_task_id() != -1:
            self.no_fast = RECOMPUTED
        if not in_recomputation():
            # also under no_grad (reentrant checkpointing's first forward): a layer whose later
            # recomputed uses need cross terms must know it is called more than once
            self.calls[key] = call + 1
        if not requires_grad or not self.counting():
            return None
        return fwd, call

    def _plain(self, layer: LayerState, fwd: Forward) -> None:
        key = (id(layer), fwd.fid)
        self.plain[key] = self.plain.get(key, 0) + 1

    def note_meet(self, d: Derived, kind: str, k: int, prepended: int, axis: int,
                  fwd: Forward) -> None:
        """A batch-free layer's output met the batch in a broadcasting op: the form in which the
        compiled path can reproduce it at the layer's output (:mod:`gradstats.traced`)."""
        if in_recomputation() or len(d.sources) != 1 or d.sources[0].layer is None:
            return
        form = None
        if axis == 0 and d.fn is _identity_fn:  # the layer's output itself, not a view of it
            form = {("broadcast", True): "prepend" if prepended == 1 else None,
                    ("broadcast", False): "dim0" if k == 0 else None,
                    ("aligned", False): "plain" if k == 0 else None}.get((kind, k < 0))
        key = (id(d.sources[0].layer), fwd.fid)
        self.free[key] = self.free.get(key, ()) + (form,)

    def _repeated(self, layer: LayerState, fid: int) -> bool:
        """Whether a use of ``layer`` needs cross terms: a parameter shared with another layer,
        the layer called more than once, or one of its parameters also used outside it."""
        return (layer.shared or self.calls.get((id(layer), fid), 1) > 1
                or any((p.slot, fid) in self.uses for p in layer.params.values()))

    def slot_uses(self, slot: int, fid: int) -> int:
        """Uses of parameter ``slot`` in forward ``fid``: function-level ones, and the calls of
        the layer rule that covers it."""
        n = self.uses.get((slot, fid), 0)
        layer = self._slot_layer.get(slot)
        if layer is not None:
            n += self.calls.get((id(layer), fid), 0) + (1 if layer.shared else 0)
        return n

    def _meet(self, func, args, kwargs, derived):
        return self.functional.meet(func, args, kwargs, derived)

    def layer_contribution(self, layer: LayerState, fwd: Forward, saved: tuple,
                           grad: torch.Tensor) -> None:
        """A layer-rule use on batch-free inputs, reached through the function level."""
        self._collect(layer, fwd, None, saved, grad, self._sink(layer, fwd),
                      lambda s, g: layer.rule.factors(layer.module, s, g),
                      lambda s, g, k: layer.rule.collect(layer.module, s, g, k))

    def _on_forward(self, module: nn.Module, args: Any, rest: tuple) -> Any:
        layer = self.by_module.get(module)
        if layer is None:
            return None
        output = rest[-1]
        inputs = (args, rest[0]) if len(rest) == 2 else args
        leaves = [t for t in tree_flatten(output)[0]
                  if isinstance(t, torch.Tensor) and t.requires_grad]
        use = self._use(layer, bool(leaves))
        if use is None:
            return None
        fwd, _ = use
        self.note_dtype(leaves[0].dtype)
        x = inputs[0] if isinstance(inputs, tuple) and inputs else None
        if isinstance(x, torch.Tensor) and not self.batch_dim:
            if self._batch_free_call(layer, inputs, output):
                return None
            lay = self.provenance.layout(x)
            if lay.axis != 0 or lay.groups != 1:
                return self._moved_batch(layer, fwd, inputs, output, lay)
            if x.dim() and x.shape[0] != fwd.batch and not getattr(layer.rule, "multi_output",
                                                                    False):
                raise ContractError(
                    f"{layer.name} ({type(module).__name__}): its input {tuple(x.shape)} should "
                    f"carry the batch of {fwd.batch} examples in dim 0, but it came through ops "
                    "gradstats does not follow")
        saved = layer.rule.capture(module, inputs, output)
        if (isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == fwd.batch
                and not self.batch_dim and isinstance(output, torch.Tensor)
                and not getattr(layer.rule, "multi_output", False) and not in_recomputation()):
            self._plain(layer, fwd)
        if self.batch_dim:
            saved = tuple(t.movedim(self.batch_dim, 0) if isinstance(t, torch.Tensor) else t
                          for t in saved)
        packed, unpack = pack_saved(saved)
        sink = self._sink(layer, fwd)
        multi = getattr(layer.rule, "multi_output", False)
        if isinstance(output, torch.Tensor) and not multi:
            output.register_hook(self._tap(layer, fwd, packed, unpack, sink))
            return None
        if not multi:
            raise ContractError(f"{layer.name} ({type(module).__name__}) returned "
                                f"{type(output).__name__}; its rule needs a single tensor output")
        leaves_all = tree_flatten(output)[0]
        for i, t in enumerate(leaves_all):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self._tap_leaf(layer, fwd, packed, unpack, sink, i))
        return None

    def _wake(self) -> None:
        """A forward inside backward (a checkpointed segment recomputed) runs with the
        provenance mode, as the first forward did, so it repeats the first forward's choices."""
        if self._backward_mode is not None and self.provenance not in \
                torch.overrides._get_current_function_mode_stack():
            self._mode_depth, self._backward_mode = 0, None  # discarded with its autograd node
        if (self._mode_depth == 0 and self.fwd is not None and self.measuring and not self.paused
                and not torch.compiler.is_compiling()
                and torch._C._current_graph_task_id() != -1):
            self.provenance.__enter__()
            self._mode_depth = 1
            self._backward_mode = threading.get_ident()

    def settle(self) -> None:
        """Leaves the mode pushed for a recomputation once it is over. The autograd engine
        restores its thread-local state around each node, so the mode may already be gone."""
        if self._backward_mode is None or in_recomputation():
            return
        stack = torch.overrides._get_current_function_mode_stack()
        if self._backward_mode == threading.get_ident() and stack and stack[-1] is self.provenance:
            self.provenance.__exit__(None, None, None)
        if self.provenance not in stack or self._backward_mode == threading.get_ident():
            self._mode_depth = 0
            self._backward_mode = None

    def _refresh(self, module: nn.Module) -> None:
        """The parameter objects a module holds now stand for its covered parameters: FSDP2
        swaps the sharded ones for unsharded copies around each forward."""
        for st in self._owners.get(module, ()):
            p = module._parameters.get(st.local)
            if p is not None and p is not st.param and self.functional.params.get(id(p)) is not st:
                self.functional.params[id(p)] = st
                self.provenance.add_source(p)

    def _derived_input(self, args: tuple) -> bool:
        """Whether a covered module gets an input computed from parameters without the batch
        (a Linear on learned queries): then the function level follows the module's own
        computation instead of its layer rule."""
        if not self._mode_depth or self.fwd is None:
            return False
        for t in tensor_leaves(args):
            d = self.provenance.derived(t)
            if d is not None and d.sources:
                return True
        return False

    def _batch_free_call(self, layer: LayerState, inputs: tuple, output: Any) -> bool:
        """A layer called on batch-free inputs only (position ids, learned queries): its output
        is a derived tensor whose gradient per example is taken where it meets the batch."""
        tensors = [t for t in tensor_leaves(inputs)]
        if not tensors or any(self.provenance.derived(t) is None for t in tensors):
            return False
        if not isinstance(output, torch.Tensor):
            raise ContractError(f"{layer.name}: a layer with batch-free inputs must return one "
                                "tensor")
        if getattr(layer.module, "scale_grad_by_freq", False):
            raise ContractError(f"{layer.name}: scale_grad_by_freq with ids shared by the whole "
                                "batch is not supported")
        saved = layer.rule.capture(layer.module, inputs, output)
        src = Source(layer=layer, saved=saved, output=output.detach())
        self.provenance.mark(output, Derived((src,), _identity_fn))
        return True

    def _moved_batch(self, layer: LayerState, fwd: Forward, inputs, output, lay: Layout):
        """A layer whose input keeps its batch in another dim: the rule sees it moved first."""
        if lay.axis is None or lay.groups != 1 or not layer.rule.batch_dim_movable:
            raise ContractError(
                f"{layer.name} ({type(layer.module).__name__}): cannot tell which axis of its "
                f"input {tuple(inputs[0].shape)} is the batch (it was reshaped with the "
                "positions, or went through an op gradstats does not follow)")
        saved = tuple(t.movedim(lay.axis, 0) if isinstance(t, torch.Tensor) else t
                      for t in layer.rule.capture(layer.module, inputs, output))
        packed, unpack = pack_saved(saved)
        sink = self._sink(layer, fwd)
        cell = [packed]
        axis = lay.axis

        def hook(grad):
            if not self.paused:
                s = self._take(cell, layer, unpack)
                self._collect(layer, fwd, None, s, grad.detach().movedim(axis, 0), sink,
                              lambda a, g: layer.rule.factors(layer.module, a, g),
                              lambda a, g, k: layer.rule.collect(layer.module, a, g, k))

        output.register_hook(hook)
        self.provenance.set_layout(output, lay)
        return None

    def _tap(self, layer: LayerState, fwd: Forward, packed, unpack, sink: Sink):
        cell = [packed]

        def hook(grad: torch.Tensor) -> None:
            self.settle()
            if self.paused:
                return
            saved = self._take(cell, layer, unpack)
            if self.batch_dim:
                grad = grad.movedim(self.batch_dim, 0)
            self._collect(layer, fwd, None, saved, grad.detach(), sink,
                          lambda s, g: layer.rule.factors(layer.module, s, g),
                          lambda s, g, k: layer.rule.collect(layer.module, s, g, k))

        return hook

    def _tap_leaf(self, layer, fwd, packed, unpack, sink, index: int):
        """The torch.func fallback: each output's contribution (of each call, when the module runs
        more than once per forward) is stashed per example and summed with the others' before it
        is squared (in :meth:`flush`), so no cross terms are needed."""
        done = [False]
        saved = [None]

        def hook(grad: torch.Tensor) -> None:
            if self.paused:
                return
            if done[0]:
                raise self._twice(layer)
            done[0] = True
            fwd.seen = True
            if saved[0] is None:
                saved[0] = unpack_saved(packed, unpack)
            if sink.rows.numel() == 0:
                return
            self.paused += 1  # the fallback runs the module again
            try:
                layer.rule.collect_output(layer.module, saved[0], index, grad.detach(), sink,
                                          lambda k, g: self._defer(sink.slots[k], fwd, g))
            finally:
                self.paused -= 1

        return hook

    @staticmethod
    def _twice(layer: LayerState) -> ContractError:
        return ContractError(
            f"backward reached the output of {layer.name} twice for one forward; wrap backward "
            "passes that are not training steps in monitor.paused()")

    def _take(self, cell: list, layer: LayerState, unpack) -> tuple:
        if cell[0] is None:
            raise self._twice(layer)
        packed, cell[0] = cell[0], None  # release the activation at once
        return unpack_saved(packed, unpack)

    def _collect(self, layer: LayerState, fwd: Forward, part: str | None, saved, grad, sink,
                 factors: Callable, collect: Callable) -> None:
        """One use's rule call, and cross terms with the layer's other uses in this forward
        when its parameters are shared or it was called more than once."""
        fwd.seen = True
        if sink.rows.numel() == 0:
            return
        self.paused += 1  # a rule may run the module again (the torch.func fallback)
        try:
            collect(saved, grad, sink)
            if self._repeated(layer, fwd.fid):
                try:
                    fs = factors(saved, grad)
                except NotImplementedError:
                    names = ", ".join(p.qualname for p in layer.params.values())
                    raise ContractError(
                        f"{names} is used more than once per forward, and the "
                        f"{type(layer.rule).__name__} has no cross terms for it") from None
                self.add_cross_terms(fwd, part, fs, sink)
        finally:
            self.paused -= 1

    def add_cross_terms(self, fwd: Forward, part: str | None, factors: dict[str, Factor],
                        sink: Sink) -> None:
        for name, f in factors.items():
            slot = sink.slots.get(name, -1)
            if slot < 0:
                continue
            prev = self.factors.setdefault((slot, fwd.fid, part), [])
            if prev:
                extra = sum(2.0 * cross_term(p, f) for p in prev)
                self.acc.E[slot].index_add_(0, fwd.rows, extra.to(self.acc.E.device))
            prev.append(f)

    def _defer(self, slot: int, fwd: Forward, per_example: torch.Tensor) -> None:
        rows, parts = self.stash.setdefault((slot, fwd.fid), (fwd.rows, []))
        parts.append(per_example.detach())

    def flush(self) -> None:
        """Squares the deferred per-example contributions (summed over their parts) into E."""
        for (slot, fid), (rows, parts) in self.stash.items():
            total = parts[0].double() if len(parts) == 1 else sum(p.double() for p in parts)
            norms = total.flatten(1).square().sum(1)
            shared = self.factors.get((slot, fid, None), ())  # the same parameter in a layer rule
            if shared:
                mine = dense_factor(total)
                norms = norms + sum(2.0 * cross_term(f, mine) for f in shared)
            self.acc.E[slot].index_add_(0, rows, norms)
        self.stash.clear()

    def function_sink(self, slots: dict[str, int], vectors: dict, fwd: Forward) -> Sink:
        return Sink(self.acc.E, self.acc.P, fwd.rows, slots, vectors if self.probing else None,
                    self.strategy, fwd)

