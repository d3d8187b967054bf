"""The built-in models: the demo's MLP of plain ``nn.Linear`` layers with GELU."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["make_mlp", "describe_mlp"]


def make_mlp(hidden: int = 128, seed: int = 0, in_features: int = 64,
             classes: int = 10) -> nn.Sequential:
    """``in -> hidden -> hidden -> classes`` with GELU, initialised from ``seed`` (the global
    RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(),
                             nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, classes))


def describe_mlp(model: nn.Module) -> str:
    """``MLP 64-128-128-10 (GELU)``: the widths of the model's Linear layers."""
    sizes = [m.weight.shape for m in model.modules() if isinstance(m, nn.Linear)]
    return "MLP " + "-".join([str(sizes[0][1])] + [str(s[0]) for s in sizes]) + " (GELU)"
