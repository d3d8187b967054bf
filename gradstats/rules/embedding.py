"""nn.Embedding: per-example norms by segment sums over (example, id) pairs.

For example ``i`` with ids ``x_it`` and output gradients ``g_it`` (``[d]``), the weight gradient
is nonzero only in the rows of the ids it used:

    dE_i[v] = s_v sum_{t: x_it = v} g_it           |dE_i|^2 = sum_{unique v in x_i} |dE_i[v]|^2

with ``s_v = 1`` by default. Positions holding ``padding_idx`` contribute nothing. With
``scale_grad_by_freq=True`` torch scales each id's gradient by ``s_v = 1 / c_v``, ``c_v`` the
number of times ``v`` occurs in the *whole input batch* of that call; the per-example gradient
is then the example's part of that batch gradient (``sum_i dE_i`` is exactly ``.grad``), which
is what is reported: it depends on which examples share the batch.

The sums are formed in O(B T d): one sort of the keys ``i * V + x_it`` (``torch.unique``)
groups the positions by (example, id), and an ``index_add_`` forms the segment sums. No
``B x V`` or ``B x T x T`` tensor is ever formed. ``max_norm`` (which renormalises rows of the
weight in place during forward) leaves the gradient formula unchanged and is supported, as is
``sparse=True`` (the probe reads the sparse ``.grad``). nn.EmbeddingBag has no rule.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import register_rule
from .base import PROBES, Factor, Rule
from .linear import _needs


def _flat(module: nn.Embedding, ids: torch.Tensor, grad: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``([B*T] ids, [B*T, d] gradients, B)``; dim 0 of the ids is the batch (0-d ids are one
    example)."""
    B = ids.shape[0] if ids.dim() > 0 else 1
    return ids.reshape(-1), grad.reshape(-1, grad.shape[-1]), B


def _scale(module: nn.Embedding, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``[V]`` per-id factors ``1 / c_v`` (batch counts) under ``scale_grad_by_freq``."""
    if not module.scale_grad_by_freq:
        return None
    counts = torch.bincount(ids, minlength=module.num_embeddings).to(dtype)
    return counts.clamp_min(1).reciprocal()


def _pad_mask(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor | None:
    if module.padding_idx is None:
        return None
    return ids == module.padding_idx


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """Per-example norms of an embedding table (``padding_idx``, ``scale_grad_by_freq``,
    ``max_norm`` and ``sparse`` honoured)."""

    def capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        ids = inputs[0]
        if ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"{type(module).__name__}: expected integer ids, got {ids.dtype}")
        return ids.detach()

    def norms(self, module, saved, grad_output):
        if not _needs(module, "weight"):
            return {}
        ids, g, B = _flat(module, saved, grad_output)
        ids = ids.long()
        dt = torch.promote_types(g.dtype, torch.float32)
        V = module.num_embeddings
        example = torch.arange(B, device=ids.device).repeat_interleave(ids.numel() // B)
        key = example * V + ids
        pad = _pad_mask(module, ids)
        if pad is not None:  # one extra segment past every real key, dropped below
            key = torch.where(pad, B * V, key)
        keys, segment = torch.unique(key, return_inverse=True)
        sums = torch.zeros(keys.numel(), g.shape[1], dtype=dt, device=g.device)
        sums.index_add_(0, segment, g.to(dt))
        sq = sums.square().sum(1)
        scale = _scale(module, ids, dt)
        if scale is not None:
            sq = sq * scale[keys.remainder(V)].square()
        owner = keys // V
        if pad is not None:
            real = owner < B
            sq, owner = sq * real, owner.clamp_max(B - 1)
        return {"weight": torch.zeros(B, dtype=dt, device=g.device).index_add_(0, owner, sq)}

    def factors(self, module, saved, grad_output):
        """``dE_i = sum_t e_{x_it} (s_{x_it} g_it)^T``: one-hot rows given by the ids (-1 at
        ``padding_idx``), columns the scaled output gradients; for tied weights (an output
        Linear sharing the table) and modules called more than once per forward."""
        if not _needs(module, "weight"):
            return {}
        ids, g, B = _flat(module, saved, grad_output)
        ids = ids.long()
        scale = _scale(module, ids, torch.promote_types(g.dtype, torch.float32))
        if scale is not None:
            g = g * scale[ids, None]
        pad = _pad_mask(module, ids)
        if pad is not None:
            ids = ids.masked_fill(pad, -1)
        return {"weight": Factor(cols=g.reshape(B, -1, g.shape[1]), row_ids=ids.reshape(B, -1))}

    def probe_vectors(self, name, param, gen):
        # Rank-1 directions x y^T on [V, d]: <x y^T, dE> = sum_t s_{x_t} x[x_t] (g_t . y).
        def rand(n):
            return torch.randn(n, PROBES, generator=gen, dtype=torch.float64).to(param.device)

        return rand(param.shape[0]), rand(param.shape[1])

    def probe_grad(self, name, grad, vectors):
        x, y = vectors
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, vals = grad.indices()[0], grad.values()
            return ((vals.double() @ y) * x[rows]).sum(0)
        # A [V, d] table: the matmul in the gradient's own precision (at least float32) keeps
        # this from forming a float64 copy of the whole table; its rounding is far inside the
        # probe's tolerance.
        dt = torch.promote_types(grad.dtype, torch.float32)
        return ((grad.to(dt) @ y.to(dt)).double() * x).sum(0)

    def probe(self, module, saved, grad_output, vectors):
        if "weight" not in vectors:
            return {}
        x, y = vectors["weight"]
        ids, g, _ = _flat(module, saved, grad_output)
        ids = ids.long()
        g = g.double()
        xs = x[ids]  # [N, P]
        scale = _scale(module, ids, torch.float64)
        if scale is not None:
            xs = xs * scale[ids, None]
        pad = _pad_mask(module, ids)
        if pad is not None:
            xs = xs.masked_fill(pad[:, None], 0.0)
        value = ((g @ y) * xs).sum(0)
        bound = ((g.abs() @ y.abs()) * xs.abs()).sum(0)
        return {"weight": torch.cat([value, bound])}
