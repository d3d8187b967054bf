"""Models, data and an explicit per-example reference shared by the monitor tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


class TokenMLP(nn.Module):
    """A transformer-like stack of Linear layers over [B, T, d] with a residual and mean pooling."""

    def __init__(self, d: int = 6, hidden: int = 10, out: int = 3):
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out, bias=False)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.nn.functional.gelu(self.mix(h))
        return self.head(h).mean(1)


@dataclass(frozen=True)
class Problem:
    name: str
    make_model: Callable[[], nn.Module]
    x_shape: tuple[int, ...]  # per example
    n_out: int


PROBLEMS = [
    Problem("mlp", lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                                         nn.Linear(8, 3)), (5,), 3),
    Problem("tokens", lambda: TokenMLP(), (4, 6), 3),
]


def data(problem: Problem, n: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *problem.x_shape, generator=g, dtype=torch.float64).to(dtype)
    Y = (2.0 + 0.5 * torch.randn(n, problem.n_out, generator=g, dtype=torch.float64)).to(dtype)
    return X, Y


def example_losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).square().sum(-1)


def per_example_grads(model: nn.Module, X, Y, names=None) -> torch.Tensor:
    """[N, P] explicit per-example gradients (float64) of the per-example losses."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return example_losses(functional_call(model, p, (x[None],)), y[None]).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, Y)
    keep = [k for k in g if names is None or k in names]
    return torch.cat([g[k].double().flatten(1) for k in keep], 1)


def reference_stats(grads: torch.Tensor, dataset_size: int | None = None) -> dict:
    n = grads.shape[0]
    sq = grads.square().sum(1)
    gbar_sq = grads.mean(0).square().sum()
    tr = (sq.sum() - n * gbar_sq) / (n - 1)
    corr = 1.0 / n - (1.0 / dataset_size if dataset_size else 0.0)
    g2 = gbar_sq - tr * corr
    return {"sq": sq, "tr": tr.item(), "g2": g2.item(), "b": (tr / g2).item(),
            "gbar_sq": gbar_sq.item()}


def train_step(model, monitor, X, Y, *, k: int = 1, reduction: str = "mean", divide=True,
               scaler=None, optimizer=None, unscale_first: bool = False):
    """One optimizer step over X split into k equal micro-batches; returns monitor.step()."""
    for xb, yb in zip(X.chunk(k), Y.chunk(k)):
        losses = example_losses(model(xb), yb)
        loss = losses.mean() if reduction == "mean" else losses.sum()
        if divide:
            loss = loss / k
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None and unscale_first:
        scaler.unscale_(optimizer)
    stats = monitor.step()
    if optimizer is not None:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
    else:
        model.zero_grad()
    return stats
