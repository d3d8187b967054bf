"""Plain-PyTorch float64 references of every gradstats op; tests and benchmarks compare
against these. They favour obviousness over speed (they form per-example gradients)."""
from __future__ import annotations

import torch


def _flat(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = A.shape[0], A.shape[1:-1].numel()
    return (A.detach().to(torch.float64).reshape(B, T, A.shape[-1]),
            G.detach().to(torch.float64).reshape(B, T, G.shape[-1]))


def linear_per_example_grads(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example Linear gradients in float64: ``dW_i = G_i^T A_i`` ``[B, d_out, d_in]`` and
    ``db_i = sum_t g_it`` ``[B, d_out]``."""
    a, g = _flat(A, G)
    return torch.einsum("bto,bti->boi", g, a), g.sum(1)


def linear_norms(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|dW_i|_F^2, |db_i|^2)`` in float64 from explicit per-example gradients."""
    dw, db = linear_per_example_grads(A, G)
    return dw.square().sum((1, 2)), db.square().sum(1)


def linear_fused(A: torch.Tensor, G: torch.Tensor):
    """``(dW, db, |dW_i|^2, |db_i|^2)`` in float64."""
    dw, db = linear_per_example_grads(A, G)
    return dw.sum(0), db.sum(0), dw.square().sum((1, 2)), db.square().sum(1)
