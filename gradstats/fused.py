"""Fused layers' forwards in the eager path: a layer whose rule replaces its forward
(attention) or fuses the norms into its backward (Linear in ``mode="fused"``)."""
from __future__ import annotations

from typing import Any

import torch

from .contract import ContractError
from .layers import LayerState
from .provenance import in_recomputation, tensor_leaves
from .saved import pack_saved

__all__ = ["run_fused"]


def run_fused(hooks, layer: LayerState, args: tuple, kwargs: dict) -> Any:
    """A fused (or forward-replacing) layer's call: its rule's forward, whose backward writes
    the accumulators, after the same provenance checks as a hooked layer's."""
    x = args[0] if args else None
    if hooks._derived_input((args, kwargs)):
        return type(layer.module).forward(layer.module, *args, **kwargs)
    if (isinstance(x, torch.Tensor) and hooks.fwd is not None and hooks._mode_depth
            and not hooks.paused and hooks.provenance.derived(x) is not None):
        # batch-free input: measured through the function level, like hooks mode
        hooks.provenance.inside += 1
        try:
            out = type(layer.module).forward(layer.module, *args, **kwargs)
        finally:
            hooks.provenance.inside -= 1
        if (isinstance(out, torch.Tensor) and out.requires_grad
                and hooks._use(layer, True) is not None):
            hooks._batch_free_call(layer, args, out)
        return out
    lay = hooks.provenance.layout(x) if isinstance(x, torch.Tensor) else None
    if layer.rule.replaces_forward and lay is not None and hooks._mode_depth:
        expected = 0 if getattr(layer.module, "batch_first", True) else 1
        if x.dim() == 3 and lay.axis != expected:
            raise ContractError(
                f"{layer.name} ({type(layer.module).__name__}, batch_first="
                f"{getattr(layer.module, 'batch_first', None)}): its query keeps the batch in "
                f"dim {lay.axis}, not {expected}")
    elif lay is not None and (lay.axis != 0 or lay.groups != 1):
        raise ContractError(
            f"{layer.name} ({type(layer.module).__name__}) in fused mode gets an input whose "
            "batch is not in dim 0; use mode='hooks' for it")
    hooks.provenance.inside += 1
    try:
        out = _run_fused(hooks, layer, args, kwargs)
    finally:
        hooks.provenance.inside -= 1
    if isinstance(out, torch.Tensor) and hooks.fwd is not None:
        hooks.note_dtype(out.dtype)
    if lay is not None and hooks._mode_depth:
        for t in tensor_leaves(out):
            if t.dim() == x.dim():
                hooks.provenance.set_layout(t, lay)
    return out

def _run_fused(hooks, layer: LayerState, args: tuple, kwargs: dict) -> Any:
    module, rule = layer.module, layer.rule
    if rule.replaces_forward:
        needs = any(p.param.requires_grad for p in layer.params.values())
        use = hooks._use(layer, needs)
        watch = None
        if use is not None:
            fwd, _ = use
            sink = hooks._sink(layer, fwd)

            def watch(y, saved, part, collect, factors):
                packed, unpack = pack_saved((saved,))
                cell = [packed]

                def hook(grad):
                    if not hooks.paused:
                        (s,) = hooks._take(cell, layer, unpack)
                        hooks._collect(layer, fwd, part, s, grad.detach(), sink, factors,
                                      collect)

                y.register_hook(hook)

        return rule.forward(module, watch, *args, **kwargs)
    (x,) = args
    needs = any(p.param.requires_grad for p in layer.params.values())
    use = hooks._use(layer, needs and torch.is_grad_enabled())
    if use is None:
        return type(module).forward(module, x)
    fwd, _ = use
    sink = hooks._sink(layer, fwd)
    if x.dim() and x.shape[0] == fwd.batch and not in_recomputation():
        hooks._plain(layer, fwd)

    def on_backward(saved_x, grad):
        if hooks._repeated(layer, fwd.fid):
            hooks.add_cross_terms(fwd, None, rule.factors(module, (saved_x,), grad), sink)

    return rule.fused_forward(module, x, sink, on_backward, gate=hooks)
