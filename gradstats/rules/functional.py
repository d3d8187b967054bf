"""Rules per torch function, for parameters used where no layer rule sees them (the function
level of :mod:`gradstats.provenance`).

Where a derived (parameter-computed, batch-free) tensor ``Y`` meets the batch in a call
``out = f(..., X, ..., Y, ...)``, the rule for ``f`` gets each example's gradient of ``Y``:

* ``linear``, ``addmm``, ``mm``, ``matmul`` with ``Y`` the weight (HF ``Conv1D`` is
  ``addmm(b, x.view(-1, d), W)``): the Linear maths on ``(X, dout)``, no per-example gradient
  formed, when ``Y`` is the parameter up to transposes, views and casts;
* ``embedding``, ``layer_norm``, ``rms_norm``, ``group_norm``, ``conv1d/2d/3d``: the layer rules'
  maths on the call's arguments;
* broadcasting elementwise ops (``x * gamma``, ``x + pos_embed``, Gemma's ``x * (1 + w)``) and
  calls where ``Y`` already runs over the batch (``cat([cls.expand(B, 1, d), x], 1)``): ``Y`` is
  replaced by ``Y`` expanded to the batch, whose gradient, tapped, is per example;
* anything else: ``torch.func`` (vmap of a vector-Jacobian product) for that one call.

The per-example gradients of ``Y`` then go back through ``Y``'s replay to its sources
(parameters, or a layer-rule call on batch-free inputs: nanoGPT's ``wpe(arange(T))``, T5's
shared position bias), and are written into the accumulators like a layer rule's.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import ops
from ..provenance import (Derived, Provenance, ProvenanceError, alignment,
                          in_recomputation)
from ..saved import pack_saved, unpack_saved
from .base import Factor, Sink, dense_factor, dense_probe, flat3

__all__ = ["FunctionLevel"]


def autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """The autocast contexts active now, to replay a call inside backward as it ran."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
                 if torch.is_autocast_enabled(d))


class replaying(contextlib.ExitStack):
    """Re-enters the autocast contexts of :func:`autocast_state`, with grad enabled (the
    per-example vector-Jacobian products run inside backward hooks, where grad is off)."""

    def __init__(self, state: tuple[tuple[str, torch.dtype], ...]):
        super().__init__()
        self.state = state

    def __enter__(self):
        super().__enter__()
        self.enter_context(torch.enable_grad())
        for device, dtype in self.state:
            self.enter_context(torch.autocast(device, dtype=dtype))
        return self


class FunctionLevel:
    """The meeting handler of :class:`~gradstats.provenance.Provenance`: per-example gradients
    of derived tensors, written through the monitor's hooks (``hooks``) into its accumulators.
    ``params`` maps ``id(parameter)`` to its :class:`~gradstats.layers.ParamState`."""

    def __init__(self, hooks: Any, prov: Provenance, params: dict[int, Any]):
        self.hooks, self.prov, self.params = hooks, prov, params
        self._rules: dict[Callable, Callable] = {
            F.linear: self._linear, torch.addmm: self._linear, torch.mm: self._linear,
            torch.matmul: self._linear, torch.Tensor.matmul: self._linear,
            torch.Tensor.mm: self._linear, torch.Tensor.__matmul__: self._linear,
            F.embedding: self._embedding,
            F.layer_norm: self._norm, F.rms_norm: self._norm, F.group_norm: self._norm,
            F.conv1d: self._conv, F.conv2d: self._conv, F.conv3d: self._conv,
            F.scaled_dot_product_attention: self._sdpa,
        }

    # ------------------------------------------------------------------------- entry
    def meet(self, func, args, kwargs, derived: dict[int, Derived]):
        fwd = self.hooks.fwd
        if fwd is None or self.prov.batch == 0 or not torch.is_grad_enabled():
            return func(*args, **kwargs)  # an empty batch, or no backward to take: nothing to do
        self._amp = autocast_state()
        for d in derived.values():
            if d.random:
                raise ProvenanceError(
                    f"a random op (dropout?) acts on a parameter-derived tensor before it meets "
                    f"the batch in {getattr(func, '__name__', func)}: its per-example gradients "
                    "cannot be replayed; use dropout 0 there, or unsupported='ignore'")
        rule = self._rules.get(func)
        out = NotImplemented
        if rule is not None:
            out = rule(func, args, kwargs, derived, fwd)
        if out is NotImplemented:
            out = self._tap_operands(func, args, kwargs, derived, fwd)
        if isinstance(out, torch.Tensor):
            self.hooks.note_dtype(out.dtype)
        return out

    # ------------------------------------------------------------------------- common
    def _count(self, d: Derived, fwd) -> None:
        if in_recomputation():
            return  # the first forward counted these uses
        for s in d.sources:
            s.uses += 1
            for slot in self._slots_of(s):
                key = (slot, fwd.fid)
                self.hooks.uses[key] = self.hooks.uses.get(key, 0) + 1

    def _slots_of(self, s) -> list[int]:
        if s.param is not None:
            st = self.params.get(id(s.param))
            return [] if st is None else [st.slot]
        return list(s.layer.slots.values())

    def _sink(self, st, fwd) -> Sink:
        return self.hooks.function_sink({st.local: st.slot}, {st.local: st.vectors}, fwd)

    def _give_dense(self, param: torch.Tensor, g: torch.Tensor, fwd) -> None:
        """One use's per-example gradients ``[B, *param.shape]`` of a parameter."""
        st = self.params.get(id(param))
        if st is None:
            return  # frozen, or left out by the policy
        sink = self._sink(st, fwd)
        name = st.local
        sink.add(name, g.double().flatten(1).square().sum(1))
        if sink.vec(name) is not None:
            sink.probe(name, dense_probe(g, sink.vec(name)))
        if self.hooks.slot_uses(st.slot, fwd.fid) > 1:
            self.hooks.add_cross_terms(fwd, None, {name: dense_factor(g)}, sink)

    def _backward(self, d: Derived, dY: torch.Tensor, fwd, aligned_rows: bool = False,
                  amp: tuple = ()) -> None:
        """Per-example gradients ``dY`` ``[B, *Y.shape]`` of a derived tensor, through its replay
        to its sources. ``aligned_rows``: ``Y``'s dim 0 runs over the examples (a layer call on
        batched-by-alignment inputs), so its sources get ``dY`` itself."""
        self.hooks.settle()
        fwd.seen = True
        values = [s.value.detach() for s in d.sources]
        if len(d.sources) == 1 and d.fn is not None and d.iso and d.fn.__name__ == "_identity":
            grads = (dY,)
        else:
            with replaying(amp):
                _, pull = vjp(d.fn, *values)
                grads = vmap(pull)(dY)
        for s, g in zip(d.sources, grads):
            if s.param is not None:
                self._give_dense(s.param, g, fwd)
            else:
                self._give_layer(s, g, fwd, aligned_rows)

    def _give_layer(self, s, dZ: torch.Tensor, fwd, aligned: bool) -> None:
        """A layer-rule call on batch-free inputs: its per-example output gradients ``dZ``; its
        inputs are the same for every example (expanded to the batch), or, ``aligned``, already
        run over the examples."""
        layer = s.layer
        B = dZ.shape[0]
        saved = s.saved if aligned else tuple(
            t.unsqueeze(0).expand(B, *t.shape) if isinstance(t, torch.Tensor) else t
            for t in s.saved)
        if aligned:
            dZ = dZ.reshape(s.output.shape)
        self.hooks.layer_contribution(layer, fwd, saved, dZ.detach())

    # ------------------------------------------------------------------------- generic taps
    def _tap_operands(self, func, args, kwargs, derived, fwd):
        """Replaces each derived operand by itself expanded to the batch (broadcasting ops) or
        by an identity view (operands that already run over the batch), and taps its gradient;
        otherwise torch.func for this call."""
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        batched = [t for t in tensors if self.prov.derived(t) is None]
        if not batched:
            return func(*args, **kwargs)
        X = batched[0]
        lay = self.prov.layout(X)
        out_dim = max(t.dim() for t in tensors)
        plans = []
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor) or id(leaf) not in derived:
                continue
            kind, k = alignment(func, out_dim, X, lay, leaf)
            if kind == "other":
                return self._per_call(func, args, kwargs, derived, fwd)
            plans.append((i, leaf, derived[id(leaf)], kind, k))
        new = list(leaves)
        axis = lay.axis + (out_dim - X.dim())  # the batch's dim in the output
        for i, Y, d, kind, k in plans:
            self._count(d, fwd)
            self.hooks.note_meet(d, kind, k, out_dim - Y.dim(), axis, fwd)
            new[i] = self._tapped(Y, d, kind, k, out_dim, axis, fwd)
        a, kw = tree_unflatten(new, spec)
        return func(*a, **kw)

    def _tapped(self, Y: torch.Tensor, d: Derived, kind: str, k: int, out_dim: int, axis: int,
                fwd) -> torch.Tensor:
        B = self.prov.batch
        if not Y.requires_grad:
            return Y  # frozen since the monitor was built: step() notices and re-attaches
        amp = self._amp
        if kind == "aligned" and d.base is not None and d.expanded_dim == k:
            # Y = base.expand(...) over the batch dim: each example uses all of base
            base = d.base_tensor
            Yb = base.expand(Y.shape)
            Yb.register_hook(lambda g: self._backward(
                d.base, g.movedim(k, 0).unsqueeze(k + 1), fwd, amp=amp))
            return Yb
        if kind == "broadcast":
            if k < 0:
                pre = out_dim - Y.dim()
                Yb = Y.reshape((1,) * pre + tuple(Y.shape))
                shape = list(Yb.shape)
                shape[axis] = B
                Yb = Yb.expand(shape)
                Yb.register_hook(lambda g: self._backward(d, g.reshape(B, *Y.shape), fwd,
                                                          amp=amp))
            else:
                shape = list(Y.shape)
                shape[k] = B
                Yb = Y.expand(shape)
                Yb.register_hook(lambda g: self._backward(
                    d, g.movedim(k, 0).unsqueeze(k + 1), fwd, amp=amp))
            return Yb
        # aligned: Y's dim k runs over the examples
        Yt = Y.view_as(Y)
        if k == 0 and all(s.param is None for s in d.sources) and d.fn.__name__ == "_identity":
            Yt.register_hook(lambda g: self._backward(d, g, fwd, aligned_rows=True, amp=amp))
            return Yt

        def per_example(g: torch.Tensor) -> None:
            # example i's cotangent: its slice of g, zeros elsewhere
            gi = g.movedim(k, 0)
            eye = torch.eye(B, dtype=g.dtype, device=g.device)
            cot = (eye.reshape(B, B, *[1] * (gi.dim() - 1)) * gi.unsqueeze(0)).movedim(1, k + 1)
            self._backward(d, cot, fwd, amp=amp)

        Yt.register_hook(per_example)
        return Yt

    def _per_call(self, func, args, kwargs, derived, fwd):
        """``torch.func`` for one call: per example, the vector-Jacobian product of the call with
        respect to its derived operands (vmap, or a loop where vmap has no batching rule)."""
        leaves, spec = tree_flatten((args, kwargs))
        idx_d = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and id(t) in derived]
        idx_b = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)
                 and i not in idx_d and self.prov.derived(t) is None]
        name = getattr(func, "__name__", repr(func))
        batched = [self.prov.batch_first(leaves[i], name).detach() for i in idx_b]
        out = func(*args, **kwargs)
        outs = tree_flatten(out)[0]
        wanted = [j for j, t in enumerate(outs) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not wanted:
            return out
        for _ in wanted:  # each output is a use: their contributions get cross terms
            for i in idx_d:
                self._count(derived[id(leaves[i])], fwd)
        ys = [leaves[i].detach() for i in idx_d]
        consts = list(leaves)

        def call(xs, yv):
            new = list(consts)
            for i, x in zip(idx_b, xs):
                new[i] = x
            for i, y in zip(idx_d, yv):
                new[i] = y
            a, kw = tree_unflatten(new, spec)
            return tree_flatten(func(*a, **kw))[0]

        amp = self._amp
        with torch.no_grad():  # each output's batch axis: where one example gives size 1
            single = call([x[:1] for x in batched], ys)
        axes = {j: _batch_axis(outs[j], single[j], self.prov.batch, name) for j in wanted}

        def hook_for(j):
            axis = axes[j]

            def one(xs, gi):
                _, pull = vjp(lambda *yv: call([x.unsqueeze(0) for x in xs], yv)[j], *ys)
                return pull(gi.unsqueeze(axis))

            def hook(g):
                gs = g.movedim(axis, 0)
                with replaying(amp):
                    grads = per_example(one, tuple(batched), gs, name)
                for i, gy in zip(idx_d, grads):
                    self._backward(derived[id(leaves[i])], gy, fwd, amp=amp)

            return hook

        for j in wanted:
            outs[j].register_hook(hook_for(j))
        return out

    # ------------------------------------------------------------------------- rules
    def _weight_source(self, d: Derived | None):
        """The parameter behind a weight that is the parameter up to transposes, views and
        casts, else None."""
        if d is None or not d.iso or len(d.sources) != 1 or d.sources[0].param is None:
            return None
        return d.sources[0].param

    def _linear(self, func, args, kwargs, derived, fwd):
        a = list(args) + [kwargs[k] for k in ("input", "weight", "bias", "mat1", "mat2", "other")
                          if k in kwargs]
        if func is F.linear:
            x, W = a[0], a[1]
            b = a[2] if len(a) > 2 else kwargs.get("bias")
            transposed = False  # W is [out, in]
        elif func is torch.addmm:
            if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
                return NotImplemented
            b, x, W = a[0], a[1], a[2]
            transposed = True  # W is [in, out]
        else:
            x, W, b = a[0], a[1], None
            transposed = True
        if not isinstance(W, torch.Tensor) or W.dim() != 2 or id(x) in derived:
            return NotImplemented
        dW = derived.get(id(W))
        db = derived.get(id(b)) if isinstance(b, torch.Tensor) else None
        pw = self._weight_source(dW) if dW is not None else None
        pb = self._weight_source(db) if db is not None else None
        if (dW is not None and pw is None) or (db is not None and pb is None):
            return NotImplemented
        if pw is not None and tuple(W.shape) != tuple(pw.shape) and \
                tuple(W.shape) != tuple(pw.shape)[::-1]:
            return NotImplemented
        name = getattr(func, "__name__", "linear")
        for d in (dW, db):
            if d is not None:
                self._count(d, fwd)
        out = func(*args, **kwargs)
        if not out.requires_grad:
            return out
        layout = self.prov.layout(x)
        packed = pack_saved((x.detach(),))
        # the parameter's layout relative to the W used: [out, in] rows/cols
        w_rows_out = (not transposed) == (pw is None or tuple(W.shape) == tuple(pw.shape))

        def hook(g):
            self.hooks.settle()
            (xs,) = unpack_saved(*packed)
            A = self.prov.batch_first(xs, name, layout)
            G = self.prov.batch_first(g.detach(), name, layout)
            fwd.seen = True
            wn, bn = ops.linear_norms(A, G)
            if pw is not None:
                self._give_linear(pw, wn, A, G, w_rows_out, fwd)
            if pb is not None:
                self._give_bias(pb, bn, G, fwd)

        out.register_hook(hook)
        return out

    def _give_linear(self, p, norms, A, G, rows_out: bool, fwd) -> None:
        st = self.params.get(id(p))
        if st is None:
            return
        sink = self._sink(st, fwd)
        sink.add(st.local, norms)
        rows, cols = (G, A) if rows_out else (A, G)
        B = A.shape[0]
        r2, c2 = flat3(rows, B), flat3(cols, B)
        vec = sink.vec(st.local)
        if vec is not None:
            from .base import factored_probe

            sink.probe(st.local, factored_probe(r2.reshape(-1, r2.shape[-1]),
                                                c2.reshape(-1, c2.shape[-1]), *vec))
        if self.hooks.slot_uses(st.slot, fwd.fid) > 1:
            self.hooks.add_cross_terms(fwd, None, {st.local: Factor(cols=c2, rows=r2)}, sink)

    def _give_bias(self, p, norms, G, fwd) -> None:
        st = self.params.get(id(p))
        if st is None:
            return
        sink = self._sink(st, fwd)
        sink.add(st.local, norms)
        B = G.shape[0]
        G3 = flat3(G, B)
        vec = sink.vec(st.local)
        if vec is not None:
            from .base import summed_probe

            sink.probe(st.local, summed_probe(G3.reshape(-1, G3.shape[-1]), vec[0]))
        if self.hooks.slot_uses(st.slot, fwd.fid) > 1:
            self.hooks.add_cross_terms(
                fwd, None, {st.local: Factor(cols=torch.ones_like(G3[..., :1]), rows=G3)}, sink)

    def _module_call(self, rule, module, args, kwargs, derived, fwd, names, x):
        """A function with a layer rule's maths: ``module`` is a stand-in holding the call's
        options and its (parameter) weights; ``names`` maps the stand-in's weight names to the
        derived operands."""
        params = {}
        for local, t in names.items():
            if t is None:
                continue
            d = derived.get(id(t))
            if d is None:
                continue
            p = self._weight_source(d)
            if p is None or tuple(t.shape) != tuple(p.shape):
                return NotImplemented
            params[local] = (p, d)
        if id(x) in derived or not params:
            return NotImplemented
        for _, d in params.values():
            self._count(d, fwd)
        out = rule.func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return out
        layout = self.prov.layout(x)
        packed = pack_saved((x.detach(),))
        name = getattr(rule.func, "__name__", "a norm or conv function")

        def hook(g):
            self.hooks.settle()
            (xs,) = unpack_saved(*packed)
            X = self.prov.batch_first(xs, name, layout)
            Gb = self.prov.batch_first(g.detach(), name, layout)
            fwd.seen = True
            for local, (p, _) in params.items():
                st = self.params.get(id(p))
                if st is None:
                    continue
                setattr(module, local, p)
            slots = {local: self.params[id(p)].slot for local, (p, _) in params.items()
                     if id(p) in self.params}
            vectors = {local: self.params[id(p)].vectors for local, (p, _) in params.items()
                       if id(p) in self.params}
            sink = self.hooks.function_sink(slots, vectors, fwd)
            rule.collect(module, (X,), Gb, sink)
            if any(self.hooks.slot_uses(s, fwd.fid) > 1 for s in slots.values()):
                self.hooks.add_cross_terms(fwd, None, rule.factors(module, (X,), Gb), sink)

        out.register_hook(hook)
        return out

    def _sdpa(self, func, args, kwargs, derived, fwd):
        """``scaled_dot_product_attention`` with a parameter-derived ``attn_mask`` (T5's relative
        position bias): the mask is added to the ``[B, H, L, S]`` scores, so it is tapped like
        an operand of a broadcasting add."""
        a = list(args)
        mask = a[3] if len(a) > 3 else kwargs.get("attn_mask")
        if mask is None or id(mask) not in derived or len(derived) != 1:
            return NotImplemented
        q = a[0] if a else kwargs["query"]
        lay = self.prov.layout(q)
        if lay.axis != 0 or lay.groups != 1 or q.dim() != 4:
            return NotImplemented
        k = 0 - (4 - mask.dim())
        if k < 0 or mask.shape[k] == 1:
            kind = "broadcast"
        elif mask.shape[k] == self.prov.batch:
            kind = "aligned"
        else:
            return NotImplemented
        d = derived[id(mask)]
        self._count(d, fwd)
        tapped = self._tapped(mask, d, kind, k, 4, 0, fwd)
        if len(a) > 3:
            a[3] = tapped
        else:
            kwargs = {**kwargs, "attn_mask": tapped}
        return func(*a, **kwargs)

    def _embedding(self, func, args, kwargs, derived, fwd):
        from .embedding import EmbeddingRule

        a = list(args)
        ids, W = a[0], a[1] if len(a) > 1 else kwargs["weight"]
        padding_idx = a[2] if len(a) > 2 else kwargs.get("padding_idx")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += W.shape[0]
        scale = a[5] if len(a) > 5 else kwargs.get("scale_grad_by_freq", False)
        module = SimpleNamespace(num_embeddings=W.shape[0], padding_idx=padding_idx,
                                 scale_grad_by_freq=scale, weight=W)
        rule = _Call(EmbeddingRule(), func)
        return self._module_call(rule, module, args, kwargs, derived, fwd, {"weight": W}, ids)

    def _norm(self, func, args, kwargs, derived, fwd):
        from .norm import GroupNormRule, LayerNormRule, RMSNormRule

        a = list(args)
        x = a[0]
        if func is F.group_norm:
            groups = a[1] if len(a) > 1 else kwargs["num_groups"]
            w = a[2] if len(a) > 2 else kwargs.get("weight")
            b = a[3] if len(a) > 3 else kwargs.get("bias")
            eps = a[4] if len(a) > 4 else kwargs.get("eps", 1e-5)
            module = SimpleNamespace(num_groups=groups, eps=eps, weight=w, bias=b)
            rule = _Call(GroupNormRule(), func)
        else:
            shape = a[1] if len(a) > 1 else kwargs["normalized_shape"]
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            w = a[2] if len(a) > 2 else kwargs.get("weight")
            if func is F.layer_norm:
                b = a[3] if len(a) > 3 else kwargs.get("bias")
                eps = a[4] if len(a) > 4 else kwargs.get("eps", 1e-5)
                rule = _Call(LayerNormRule(), func)
            else:
                b = None
                eps = a[3] if len(a) > 3 else kwargs.get("eps")
                rule = _Call(RMSNormRule(), func)
            module = SimpleNamespace(normalized_shape=shape, eps=eps, weight=w, bias=b)
        return self._module_call(rule, module, args, kwargs, derived, fwd,
                                 {"weight": w, "bias": b}, x)

    def _conv(self, func, args, kwargs, derived, fwd):
        from .conv import ConvRule

        a = list(args)
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        v = dict(zip(names, a))
        v.update(kwargs)
        W = v["weight"]
        n = W.dim() - 2

        def tup(x, default):
            x = default if x is None else x
            return tuple(x) if isinstance(x, (list, tuple)) else (x,) * n

        padding = v.get("padding", 0)
        module = SimpleNamespace(
            kernel_size=tuple(W.shape[2:]), stride=tup(v.get("stride"), 1),
            padding=padding if isinstance(padding, str) else tup(padding, 0),
            dilation=tup(v.get("dilation"), 1), groups=v.get("groups", 1) or 1,
            padding_mode="zeros", out_channels=W.shape[0],
            in_channels=W.shape[1] * (v.get("groups", 1) or 1), weight=W, bias=v.get("bias"))
        rule = _Call(ConvRule(), func)
        return self._module_call(rule, module, args, kwargs, derived, fwd,
                                 {"weight": W, "bias": v.get("bias")}, v["input"])


class _Call:
    """A layer rule with the torch function it stands for."""

    def __init__(self, rule, func):
        self.rule, self.func = rule, func

    def collect(self, *a):
        return self.rule.collect(*a)

    def factors(self, *a):
        return self.rule.factors(*a)


def _batch_axis(full: torch.Tensor, single: torch.Tensor, B: int, what: str) -> int:
    """The dim of an output that runs over the examples: size B for the batch, 1 for one
    example."""
    if full.dim() == single.dim():
        for d in range(full.dim()):
            if full.shape[d] == B and single.shape[d] == 1 and (B != 1 or d == 0):
                return d
        if B == 1 and full.dim():
            return 0
    raise ProvenanceError(f"{what}: cannot tell which dim of its {tuple(full.shape)} output runs "
                          "over the examples; for a module such as nn.LSTM pass "
                          "unsupported='fallback' (torch.func over the whole module)")


def per_example(one: Callable, xs: tuple, g: torch.Tensor, what: str):
    """``one(x_i, g_i)`` for every example (dim 0 of ``xs`` and ``g``), stacked: through vmap,
    or a loop where torch.func has no batching rule for the call."""
    try:
        return vmap(one)(xs, g)
    except Exception:  # noqa: BLE001 - a missing batching rule raises several kinds
        pass
    try:
        rows = [one(tuple(x[i] for x in xs), g[i]) for i in range(g.shape[0])]
    except Exception as e:
        raise ProvenanceError(f"gradstats cannot take per-example gradients through {what} "
                              f"({type(e).__name__}: {e}); pass unsupported='ignore' to leave "
                              "its parameters out") from e
    return tuple(torch.stack(parts) for parts in zip(*rows))


