"""The interface every per-layer rule implements."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: independent random directions per parameter in the contract probe
PROBES = 2


class Rule:
    """How one layer kind yields per-example squared gradient norms.

    The monitor calls :meth:`capture` in the layer's forward hook and, when the gradient of the
    layer's output arrives, :meth:`norms` and :meth:`probe` with what was captured. All tensors
    are in autograd's units (whatever scale the loss carried); the monitor converts.
    """

    #: whether :meth:`fused_forward` exists (dW and norms from one backward computation)
    supports_fused: bool = False

    def capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        """What backward needs from forward; by default the first input, detached."""
        return inputs[0].detach()

    def norms(self, module: nn.Module, saved: Any, grad_output: torch.Tensor
              ) -> dict[str, torch.Tensor]:
        """``{param_name: [B] per-example squared norms}`` for the parameters that need grads."""
        raise NotImplementedError

    def probe_vectors(self, name: str, param: torch.Tensor, gen: torch.Generator
                      ) -> tuple[torch.Tensor, ...]:
        """Fixed random vectors defining ``PROBES`` projections ``<V_j, grad>`` of ``name``."""
        raise NotImplementedError

    def probe_grad(self, name: str, grad: torch.Tensor, vectors: tuple[torch.Tensor, ...]
                   ) -> torch.Tensor:
        """``[PROBES]`` float64: ``<V_j, grad>`` evaluated on a full gradient."""
        raise NotImplementedError

    def probe(self, module: nn.Module, saved: Any, grad_output: torch.Tensor,
              vectors: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        """``{param_name: [2 PROBES] float64}``: the projections ``<V_j, sum_i u_i>`` from
        forward/backward data, then for each a bound on the sum of the absolute values of its
        terms (which sets the rounding tolerance of the comparison)."""
        raise NotImplementedError
