"""The fallback for modules without a rule (``unsupported="fallback"``): per-example gradients of
the module's own parameters through torch.func (vmap of a vector-Jacobian product). Correct for
any module whose outputs carry the batch first, including tuple outputs (nn.LSTM, nn.GRU): the
contributions of every output are summed per example before squaring. It forms ``B x P``
gradients for that module: slower, more memory."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp
from torch.utils._pytree import tree_flatten

from .base import Rule, dense_probe


class FallbackRule(Rule):
    wants_kwargs = True
    multi_output = True

    def capture(self, module, inputs, output):
        from .functional import autocast_state

        args, kwargs = inputs
        return (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
                autocast_state())

    def per_example(self, module: nn.Module, saved: Any, index: int, G: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """Per-example gradients ``[B, *shape]`` of the module's own trainable parameters from
        the gradient ``G`` of output leaf ``index`` (the other outputs' gradients zero)."""
        from .functional import _batch_axis, per_example, replaying

        args, kwargs, amp = saved
        first = next(a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0)
        B = first.shape[0]
        params = {k: p.detach() for k, p in module.named_parameters(recurse=False)
                  if p.requires_grad}
        batched = [i for i, a in enumerate(args)
                   if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == B]

        def call(p, xs):
            a = list(args)
            for i, x in zip(batched, xs):
                a[i] = x
            return tree_flatten(functional_call(module, p, tuple(a), kwargs, strict=False))[0]

        name = type(module).__name__
        with torch.no_grad(), replaying(amp):
            full, single = call(params, [args[i] for i in batched]), call(
                params, [args[i][:1] for i in batched])
        axis = _batch_axis(full[index], single[index], B, name)
        keys = list(params)

        def one(xs, g):
            _, pull = vjp(lambda *pv: call(dict(zip(keys, pv)), [x.unsqueeze(0) for x in xs])[index],
                          *params.values())
            return pull(g.unsqueeze(axis))

        with replaying(amp):
            grads = per_example(one, tuple(args[i] for i in batched), G.movedim(axis, 0), name)
        return dict(zip(keys, grads))

    def collect_output(self, module, saved, index, grad, sink, stash) -> None:
        """Hands output ``index``'s per-example contributions to ``stash(name, [B, ...])``, which
        sums them over outputs before they are squared; the probe is linear and goes to the
        sink at once."""
        for k, g in self.per_example(module, saved, index, grad).items():
            stash(k, g)
            vec = sink.vec(k)
            if vec is not None:
                sink.probe(k, dense_probe(g, vec))

    def collect(self, module, saved, grad_output, sink):
        for k, g in self.per_example(module, saved, 0, grad_output).items():
            sink.add(k, g.double().flatten(1).square().sum(1))
            vec = sink.vec(k)
            if vec is not None:
                sink.probe(k, dense_probe(g, vec))


__all__ = ["FallbackRule"]
