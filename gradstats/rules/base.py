"""The interface every per-layer rule implements."""
from __future__ import annotations

from dataclasses import dataclass
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
    #: whether the layer accepts inputs whose batch dim is not first (the monitor moves it)
    batch_dim_movable: bool = False
    #: whether the rule runs the module through its own forward in every mode
    replaces_forward: bool = False
    #: whether the rule also accounts for the parameters of the module's children
    claims_children: bool = False
    #: whether an input without the batch dim (position ids shared by every example) may be
    #: expanded to the batch, so each example's gradient arrives before broadcasting sums it
    broadcast_inputs: bool = False

    def check(self, module: nn.Module, name: str) -> None:
        """Raises ValueError, naming the module and option, for configurations not handled."""

    def params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters this rule accounts for, by the names its norms use."""
        return dict(module.named_parameters(recurse=False))

    def factors(self, module: nn.Module, saved: Any, grad_output: torch.Tensor
                ) -> dict[str, Factor]:
        """Factored per-example gradients (see :class:`Factor`), needed when a parameter is
        used more than once per forward; rules without them refuse shared parameters."""
        raise NotImplementedError

    def capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        """What backward needs from forward; by default the first input, detached."""
        return inputs[0].detach()

    def norms(self, module: nn.Module, saved: Any, grad_output: torch.Tensor
              ) -> dict[str, torch.Tensor]:
        """``{param_name: [B] per-example squared norms}`` for the parameters that need grads."""
        raise NotImplementedError

    def collect(self, module: nn.Module, saved: Any, grad_output: torch.Tensor,
                vectors: dict[str, tuple[torch.Tensor, ...]] | None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """:meth:`norms` and (when ``vectors`` is given) :meth:`probe` together."""
        norms = self.norms(module, saved, grad_output)
        probes = {} if vectors is None else self.probe(module, saved, grad_output, vectors)
        return norms, probes

    def probe_vectors(self, name: str, param: torch.Tensor, gen: torch.Generator
                      ) -> tuple[torch.Tensor, ...]:
        """Fixed random directions for ``PROBES`` projections ``<V_j, grad>`` of ``name``.

        The default, which every rule of a shared parameter must agree on: rank-1
        ``V_j = x_j y_j^T`` over ``[shape[0], prod(shape[1:])]`` for tensors of 2+ dims (cheap
        against factored gradients), a plain vector for 1-D ones."""
        def rand(n: int) -> torch.Tensor:
            return torch.randn(n, PROBES, generator=gen, dtype=torch.float64).to(param.device)

        if param.dim() >= 2:
            return rand(param.shape[0]), rand(param[0].numel())
        return (rand(param.numel()),)

    def probe_grad(self, name: str, grad: torch.Tensor, vectors: tuple[torch.Tensor, ...]
                   ) -> torch.Tensor:
        """``[PROBES]`` float64: ``<V_j, grad>`` evaluated on a full gradient."""
        g = grad.double()
        if len(vectors) == 2:
            x, y = vectors
            g = g.reshape(g.shape[0], -1)
            return torch.stack([x[:, j] @ (g @ y[:, j]) for j in range(x.shape[1])])
        return vectors[0].t() @ g.flatten()

    def probe(self, module: nn.Module, saved: Any, grad_output: torch.Tensor,
              vectors: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        """``{param_name: [2 PROBES] float64}``: the projections ``<V_j, sum_i u_i>`` from
        forward/backward data, then for each a bound on the sum of the absolute values of its
        terms (which sets the rounding tolerance of the comparison)."""
        raise NotImplementedError


@dataclass
class Factor:
    """One use's per-example gradient of a 2-D (or 1-D) parameter in factored form,
    ``u_i = sum_t r_it c_it^T``: ``rows`` ``[B, T, R]`` (or ``row_ids`` ``[B, T]``, the one-hot
    rows of an embedding lookup, ``-1`` where a position contributes nothing) and ``cols``
    ``[B, T, C]``. A bias is ``cols = 1``. Cross terms between two uses of a shared parameter
    come from these without forming ``u_i``."""

    cols: torch.Tensor
    rows: torch.Tensor | None = None
    row_ids: torch.Tensor | None = None


def cross_term(f1: Factor, f2: Factor) -> torch.Tensor:
    """``[B]`` float64: ``<u1_i, u2_i> = sum_{t,s} (c1_t . c2_s)(r1_t . r2_s)``."""
    c1, c2 = f1.cols.double(), f2.cols.double()
    ka = torch.bmm(c1, c2.transpose(1, 2))
    if f1.rows is not None and f2.rows is not None:
        kg = torch.bmm(f1.rows.double(), f2.rows.double().transpose(1, 2))
    elif f1.rows is not None or f2.rows is not None:
        dense, ids, flip = ((f1.rows, f2.row_ids, False) if f1.rows is not None
                            else (f2.rows, f1.row_ids, True))
        T_dense = dense.shape[1]
        idx = ids.clamp_min(0)[:, None, :].expand(-1, T_dense, -1)
        kg = dense.double().gather(2, idx) * (ids >= 0)[:, None, :]
        if flip:
            kg = kg.transpose(1, 2)
    else:
        i1, i2 = f1.row_ids, f2.row_ids
        kg = ((i1[:, :, None] == i2[:, None, :]) & (i1 >= 0)[:, :, None]).double()
    return (ka * kg).sum((1, 2))


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
