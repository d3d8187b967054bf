"""The monitor inside a ``torch.compile`` graph, with no graph break.

The eager path (:mod:`gradstats.hooks`) decides on every forward, with the provenance mode, which
axis of each layer's input is the batch, and keeps Python records of each use; neither can run
inside a compiled graph, so there it runs eagerly around each layer (a graph break each). Once
the model's layout is known it needs neither, and compiled forwards take this path instead:

* **the plan.** The monitor's measured eager-path steps (the first step of a compiled model runs
  that path) show, per covered layer, how it was used. When every covered layer was called
  exactly once per forward, on an input whose dim 0 is the batch of the root's first tensor
  argument (not moved, not batch-free, not computed from parameters), with a rule that is
  traceable, no shared parameter, no parameter covered at the function level, no GradScaler,
  DDP or sharding, and a ``"sum"`` or ``"mean"`` loss reduction, the plan is *ready*. Compiled
  forwards traced after that (dynamo guards on the flag, so one recompile) take this path;
  compiled forwards of a model whose plan never becomes ready keep the eager path.
* **forward.** The root's pre-hook reserves the examples' accumulator columns with tensor
  offsets (:meth:`Accumulators.begin_forward`). Each layer's output passes through an identity
  :class:`torch.autograd.Function` (:class:`_Tap`) whose backward runs the layer rule on the
  saved inputs and the output gradient and writes the accumulators in place; a fused Linear is
  one Function whose backward computes ``dW``, ``db`` and the norms in one op
  (:class:`_TracedLinear`). Nothing else: no Python containers, no host reads.
* **counting.** Each of these backwards adds one to its layer's entry of ``Accumulators.hits``;
  ``step()`` requires every layer's count to equal the number of compiled forwards (each
  forward's backward reached each layer once) and reports the step unmeasured otherwise.

* **eager steps.** Between probe steps (the monitor's probe schedule) eager forwards take
  this path too (``hooks.fast``): the same Functions, run eagerly, with the counts kept in
  Python (``Accumulators.fast_sizes`` / ``fast_hits``). Every schedule step runs the full path
  and re-checks the plan with :func:`learn`; a forward recomputed inside backward (activation
  checkpointing) or counts that do not add up turn the eager use off for good.

What the plan cannot see: a model whose layout changes after the learning step in a way that
keeps every input's dim 0 the batch size (a layer that starts getting batch-free inputs of a
size equal to the batch). The contract probe still runs on its schedule.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .rules.base import Sink

__all__ = ["learn", "root", "tap", "fused_linear"]

#: id(layer state) -> (weak reference to the hooks, layer, index): what the compiled hooks and
#: backwards need, looked up by a constant key
_ENTRIES: dict[int, tuple[Any, Any, int]] = {}


def register(hooks_ref, layers) -> None:
    for i, layer in enumerate(layers):
        _ENTRIES[id(layer)] = (hooks_ref, layer, i)


def unregister(layers) -> None:
    for layer in layers:
        _ENTRIES.pop(id(layer), None)


def learn(hooks, forwards, eligible: str | None) -> str | None:
    """Checks this step's eager-path forwards against the plan (see the module docstring) and
    marks it ready when they fit; a ready plan whose forwards no longer fit goes back to
    learning. ``eligible``: why the monitor's configuration cannot fit it, or None. Returns why
    the plan is not ready (None: ready); gives up for good on a configuration that never fits."""
    if hooks.plan == "never":
        return hooks.never_why
    why = _never(hooks, eligible)
    if why is not None:
        hooks.plan, hooks.never_why = "never", why
        return why
    if not forwards:
        return "no counted forward and backward"
    why, treatment = _fit(hooks, forwards)
    if why is not None:
        hooks.plan = "learning"
        return why
    hooks.treatment = treatment
    if hooks.plan != "ready":
        hooks.plan = "ready"
        _wrap_root(hooks)
    return None


def _never(hooks, eligible: str | None) -> str | None:
    if eligible is not None:
        return eligible
    if hooks.batch_dim:
        return f"batch_dim={hooks.batch_dim}"
    if hooks.coverage.functional:
        names = sorted(st.qualname for st in hooks.coverage.functional.values())
        return f"parameters covered at the function level ({', '.join(names[:3])})"
    for layer in hooks.coverage.layers.values():
        if layer.shared:
            return f"{layer.name} shares a parameter with another layer"
        if not getattr(layer.rule, "traceable", False):
            return f"{layer.name} ({type(layer.module).__name__}) has a rule without a traced form"
    return None


def _fit(hooks, forwards) -> tuple[str | None, dict[int, str]]:
    """Why the forwards do not fit the plan (None: they do), and each layer's form."""
    if not hooks.plain_root:
        return "the root's first tensor argument does not carry the batch in dim 0", {}
    treatment: dict[int, str] = {}
    free_slots = set()
    for layer in hooks.coverage.layers.values():
        forms = set()
        for f in forwards:
            key = (id(layer), f.fid)
            calls = hooks.calls.get(key, 0)
            if calls != 1:
                return f"{layer.name} ran {calls} times in one forward", {}
            if hooks.plain.get(key, 0) == 1:
                forms.add("plain")
                continue
            meets = hooks.free.get(key, ())
            if len(meets) != 1 or meets[0] is None:
                return (f"{layer.name} got an input without the batch in dim 0 (batch-free, "
                        "moved, or computed from parameters) and its output did not meet the "
                        "batch once, as it is, in a broadcasting op"), {}
            forms.add(meets[0])
            free_slots.update((p.slot, f.fid) for p in layer.params.values())
        if len(forms) != 1:
            return f"{layer.name} was used in different ways by different forwards", {}
        treatment[id(layer)] = forms.pop()
    extra = {k: n for k, n in hooks.uses.items() if k not in free_slots or n != 1}
    if extra or hooks.stash:
        return "parameters were used outside their layers", {}
    return None, treatment


def _wrap_root(hooks) -> None:
    """Starts compiled forwards inside the root's own forward rather than in its pre-hook, so
    that dynamo traces them into the forward's graph (a pre-hook is a frame of its own)."""
    import functools
    import types
    import weakref

    model = hooks.model
    own = vars(model).get("forward")  # an instance-level forward another library installed
    if getattr(own, "_gradstats_root", False):
        return
    ref = weakref.ref(hooks)

    # a method, so that a deepcopy of the model is bound to the copy (which runs plainly); the
    # signature stays the model's (inspect follows __wrapped__): trainers read it
    @functools.wraps(type(model).forward if own is None else getattr(own, "__func__", own))
    def forward(self, *args, **kwargs):
        h = ref()
        if h is None or h.model is not self:
            return type(self).forward(self, *args, **kwargs)
        if torch.compiler.is_compiling() and h.plan == "ready":
            root(h, args, kwargs)
        if own is not None:
            return own(*args, **kwargs)
        return type(self).forward(self, *args, **kwargs)

    forward._gradstats_root = True
    forward._gradstats_own = own
    model.forward = types.MethodType(forward, model)


def unwrap_root(model) -> None:
    f = vars(model).get("forward")
    if f is not None and getattr(f, "_gradstats_root", False):
        if f._gradstats_own is not None:
            model.forward = f._gradstats_own
        else:
            del model.forward


def root(hooks, args: tuple, kwargs: dict) -> None:
    """The root's pre-hook in a compiled graph: the examples' columns, as a tensor."""
    hooks.traced_rows = None
    if not hooks.measuring or hooks.paused or not torch.is_grad_enabled():
        return
    eager = not torch.compiler.is_compiling()
    if eager and (not hooks.counting() or torch._C._current_graph_task_id() != -1):
        return
    x = next(tensors((args, kwargs)), None)
    if x is None or x.dim() == 0:
        return
    B = x.shape[0]
    units = hooks.units
    if eager:
        factor = 1.0 / B if units.reduction_kind == "mean" else 1.0
    else:
        factor = torch.ones((), dtype=torch.float64, device=hooks.acc.device)
        if units.reduction_kind == "mean":
            factor = factor / B  # a tensor: a Python float of B would specialise the graph
    hooks.traced_batch = B
    hooks.traced_rows = hooks.acc.begin_forward(B, factor, traced=True)
    units.on_forward()


def tensors(obj):
    """The tensors in ``obj`` through tuples, lists and dicts only (what dynamo traces here)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def _ready(key: int, module):
    """``(hooks, layer)`` when ``module`` runs on the traced path: inside a compiled graph with
    the plan ready, or in a fast-path eager step (``hooks.fast``); else None (a copy of a
    watched module never matches)."""
    entry = _ENTRIES.get(key)
    if entry is None:
        return None
    hooks = entry[0]()
    if (hooks is None or hooks.plan != "ready" or entry[1].module is not module
            or not (hooks.fast or torch.compiler.is_compiling())):
        return None
    return hooks, entry[1]


def either_pre(key: int, eager: Callable) -> Callable:
    """A covered layer's forward pre-hook: ``eager`` unless compiling with the plan ready."""

    def hook(module, args, *rest):
        if _ready(key, module) is not None:
            return None
        return eager(module, args, *rest)

    return hook


def either_post(key: int, eager: Callable) -> Callable:
    """A covered layer's forward hook: :func:`tap` when compiling with the plan ready."""

    def hook(module, args, *rest):
        found = _ready(key, module)
        if found is not None:
            return tap(*found, (args, rest[0]) if len(rest) == 2 else args, rest[-1])
        return eager(module, args, *rest)

    return hook


def fused_method(key: int, eager: Callable) -> Callable:
    """A fused layer's forward: ``eager`` unless compiling with the plan ready."""

    def forward(module, *args, **kwargs):
        found = _ready(key, module)
        if found is not None and not found[1].rule.replaces_forward:
            hooks, layer = found
            if hooks.treatment.get(key, "plain") == "plain":
                return fused_linear(hooks, layer, *args)
            out = type(module).forward(module, *args, **kwargs)  # batch-free: tapped as hooks
            tapped = tap(hooks, layer, args, out)
            return out if tapped is None else tapped
        return eager(module, *args, **kwargs)

    return forward


def tap(hooks, layer, inputs: tuple, output: Any) -> Any:
    """A covered layer's output in a compiled graph: through :class:`_Tap` (None: unchanged).
    A batch-free call (``form`` "prepend" or "dim0", learned where its output met the batch)
    has its output and saved inputs expanded to the batch first, as broadcasting would: the
    gradient arriving at the expanded output is then each example's own."""
    rows = hooks.traced_rows
    if rows is None or not isinstance(output, torch.Tensor) or not output.requires_grad:
        return None
    _recomputing(hooks)
    saved = layer.rule.capture(layer.module, inputs, output)
    form = hooks.treatment.get(id(layer), "plain")
    if form != "plain":
        B = hooks.traced_batch
        if form == "prepend":
            output = output.unsqueeze(0).expand(B, *output.shape)
            saved = tuple(t.unsqueeze(0).expand(B, *t.shape) for t in saved)
        else:
            output = output.expand(B, *output.shape[1:])
            saved = tuple(t.expand(B, *t.shape[1:]) for t in saved)
    return _Tap.apply(output, rows, id(layer), hooks.probing, *saved)


def _recomputing(hooks) -> None:
    """An eager fast-path layer recomputed inside backward (activation checkpointing) would
    write the columns of whichever forward ran last: the step is not measured, and eager steps
    keep the full path from now on."""
    if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
        from .hooks import RECOMPUTED

        hooks.no_fast = hooks.spoiled = RECOMPUTED


def _sink(hooks, layer, rows: torch.Tensor, probing: bool) -> Sink:
    vectors = {k: p.vectors for k, p in layer.params.items()} if probing else None
    return Sink(hooks.acc.E, hooks.acc.P, rows, layer.slots, vectors, hooks.strategy)


def _hit(hooks, index: int) -> None:
    if torch.compiler.is_compiling():
        hooks.acc.hits[index] += 1
    else:
        hooks.acc.fast_hits[index] += 1


class _Tap(torch.autograd.Function):
    """The identity on a layer's output; its backward writes the layer rule's per-example norms
    (and probe, on probe steps) for the saved inputs and the output gradient."""

    @staticmethod
    def forward(ctx, y, rows, key, probing, *saved):
        ctx.save_for_backward(rows, *saved)
        ctx.key, ctx.probing = key, probing
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        rows, *saved = ctx.saved_tensors
        ref, layer, index = _ENTRIES[ctx.key]
        hooks = ref()
        saved = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in saved)
        layer.rule.collect(layer.module, saved, grad.detach(),
                           _sink(hooks, layer, rows, ctx.probing))
        _hit(hooks, index)
        return (grad, None, None, None) + (None,) * len(saved)


def fused_linear(hooks, layer, x: torch.Tensor) -> torch.Tensor:
    """A fused Linear in a compiled graph: dW, db and the norms from one op in backward."""
    m = layer.module
    rows = hooks.traced_rows
    if rows is None:
        return F.linear(x, m.weight, m.bias)
    _recomputing(hooks)
    return _TracedLinear.apply(x, m.weight, m.bias, rows, id(layer), hooks.probing)


class _TracedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rows, key, probing):
        ctx.save_for_backward(x, weight, rows)
        ctx.key, ctx.probing, ctx.has_bias = key, probing, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        from .rules.linear import _fused_collect

        x, weight, rows = ctx.saved_tensors
        ref, layer, index = _ENTRIES[ctx.key]
        hooks = ref()
        sink = _sink(hooks, layer, rows, ctx.probing)
        need_w = ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        slot_w = sink.slot("weight") if need_w else -1
        slot_b = sink.slot("bias") if need_b else -1
        xw = yw = vb = None
        if ctx.probing:
            vw, vbias = sink.vec("weight"), sink.vec("bias")
            if vw is not None:
                xw, yw = vw
            if vbias is not None:
                vb = vbias[0]
        grad_x = dW = db = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(x.dtype)
        if need_w or need_b:
            dW, db = _fused_collect(x)(x.detach(), grad_out.detach(), sink.E, sink.P, rows, slot_w, slot_b,
                                       xw, yw, vb, sink.strategy)
            dW = dW.to(weight.dtype) if need_w else None
            db = db.to(weight.dtype) if need_b else None
        _hit(hooks, index)
        return grad_x, dW, db, None, None, None
