"""The fallback for layers without a rule: per-example gradients of the module's own parameters
through torch.func (vmap of a vector-Jacobian product). Correct for any module whose output is a
tensor with the batch first, but it forms ``B x P`` gradients for that module: slower, more
memory."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .base import Rule


class FallbackRule(Rule):
    wants_kwargs = True

    def capture(self, module, inputs, output):
        args, kwargs = inputs
        return (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    def _per_example(self, module: nn.Module, saved: Any, G: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
        args, kwargs = saved
        B = G.shape[0]
        params = {k: p.detach() for k, p in module.named_parameters(recurse=False)
                  if p.requires_grad}
        in_dims = tuple(0 if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == B
                        else None for a in args)

        def loss(p, g, *a):
            a = tuple(x.unsqueeze(0) if d == 0 else x for x, d in zip(a, in_dims))
            out = functional_call(module, p, a, kwargs, strict=False)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"the torch.func fallback for {type(module).__name__} needs a "
                                "single tensor output")
            return (out * g.unsqueeze(0)).sum()

        return vmap(grad(loss), in_dims=(None, 0, *in_dims))(params, G, *args)

    def collect(self, module, saved, grad_output, vectors):
        per = self._per_example(module, saved, grad_output)
        norms = {k: g.double().flatten(1).square().sum(1) for k, g in per.items()}
        probes = {}
        for k, vec in (vectors or {}).items():
            g = per[k].double()
            total, bound = g.sum(0), g.abs().sum(0)
            absvec = tuple(v.abs() for v in vec)
            probes[k] = torch.cat([self.probe_grad(k, total, vec),
                                   self.probe_grad(k, bound, absvec)])
        return norms, probes

    def norms(self, module, saved, grad_output):
        return self.collect(module, saved, grad_output, None)[0]
