"""nn.Embedding: per-example norms by segment sums over (example, id) pairs.

For example ``i`` with ids ``x_it`` and output gradients ``g_it`` (``[d]``), the weight gradient
is nonzero only in the rows of the ids it used:

    dE_i[v] = s_v sum_{t: x_it = v} g_it           |dE_i|^2 = sum_{unique v in x_i} |dE_i[v]|^2

with ``s_v = 1`` by default. Positions holding ``padding_idx`` contribute nothing. With
``scale_grad_by_freq=True`` torch scales each id's gradient by ``s_v = 1 / c_v``, ``c_v`` the
number of times ``v`` occurs in the *whole input batch* of that call; the per-example gradient
is then the example's part of that batch gradient (``sum_i dE_i`` is exactly ``.grad``), which
is what is reported: it depends on which examples share the batch.

The sums are formed in O(B T d): one sort of the keys ``i * V + x_it`` groups the positions by
(example, id), and ``F.embedding_bag`` (mode ``"sum"``, the sorted order as its indices) forms
the segment sums. No ``B x V`` or ``B x T x T`` tensor is ever formed. ``max_norm`` (which
renormalises rows of the weight in place during forward) leaves the gradient formula unchanged
and is supported, as is ``sparse=True`` (the probe reads the sparse ``.grad``). Tied weights
(an output Linear sharing the table) get their cross terms through :meth:`factors`.
nn.EmbeddingBag has no rule.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Factor, Rule, directions, needs
from .registry import register_rule


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
    counts = torch.zeros(module.num_embeddings, dtype=dtype, device=ids.device)
    counts.index_add_(0, ids, torch.ones_like(ids, dtype=dtype))
    return counts.clamp_min(1).reciprocal()


def segment_sq_norms(key: torch.Tensor, g: torch.Tensor, fixed_size: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``g`` ``[N, d]`` grouped by equal ``key``: each group's key and the squared norm
    of its row sum. One sort; then either the exact groups (``torch.unique_consecutive``, whose
    size the host must read) or, with ``fixed_size`` (GPUs: no host round trip), ``N`` slots of
    which the unused ones hold key 0 and norm 0."""
    sorted_keys, order = torch.sort(key)
    if not fixed_size:
        keys, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
        sums = F.embedding_bag(order, g, counts.cumsum(0) - counts, mode="sum")
        return keys, torch.linalg.vector_norm(sums, dim=1).square()
    start = torch.ones_like(sorted_keys, dtype=torch.bool)
    start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    slot_sorted = start.cumsum(0) - 1
    slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)
    sums = torch.zeros_like(g).index_add_(0, slot, g)
    keys = torch.zeros_like(sorted_keys).scatter_(0, slot_sorted, sorted_keys)
    return keys, torch.linalg.vector_norm(sums, dim=1).square()


def _pad_mask(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor | None:
    if module.padding_idx is None:
        return None
    return ids == module.padding_idx


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """Per-example norms of an embedding table (``padding_idx``, ``scale_grad_by_freq``,
    ``max_norm`` and ``sparse`` honoured)."""

    broadcast_inputs = True
    traceable = True

    def capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        ids = inputs[0]
        if ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"{type(module).__name__}: expected integer ids, got {ids.dtype}")
        return (ids.detach(),)

    def collect(self, module, saved, grad_output, sink):
        if not needs(module, "weight"):
            return
        sink.add("weight", self.per_example_norms(module, saved[0], grad_output))
        vec = sink.vec("weight")
        if vec is not None:
            sink.probe("weight", self._probe(module, saved[0], grad_output, vec))

    def per_example_norms(self, module, ids, grad_output, fixed_size: bool | None = None
                          ) -> torch.Tensor:
        """``[B]`` squared norms of each example's table gradient (``fixed_size``: the route
        without a host round trip; by default on CUDA only)."""
        ids, g, B = _flat(module, ids, grad_output)
        ids = ids.long()
        dt = torch.promote_types(g.dtype, torch.float32)
        V = module.num_embeddings
        example = torch.arange(B, device=ids.device).repeat_interleave(ids.numel() // B)
        key = example * V + ids
        pad = _pad_mask(module, ids)
        if pad is not None:  # one segment past every real key (owner B), dropped below
            key = key.masked_fill(pad, B * V)
        keys, sq = segment_sq_norms(key, g.to(dt),
                                    fixed_size=(ids.is_cuda or torch.compiler.is_compiling())
                                    if fixed_size is None else fixed_size)
        scale = _scale(module, ids, dt)
        if scale is not None:
            sq = sq * scale[keys.remainder(V)].square()
        owner = (keys // V).clamp_max(B)  # padding positions' segment is owned by "B": dropped
        return torch.zeros(B + 1, dtype=dt, device=g.device).index_add_(0, owner, sq)[:B]

    def factors(self, module, saved, grad_output):
        """``dE_i = sum_t e_{x_it} (s_{x_it} g_it)^T``: one-hot rows given by the ids (-1 at
        ``padding_idx``), columns the scaled output gradients; for tied weights (an output
        Linear sharing the table) and modules called more than once per forward."""
        if not needs(module, "weight"):
            return {}
        ids, g, B = _flat(module, saved[0], grad_output)
        ids = ids.long()
        scale = _scale(module, ids, torch.promote_types(g.dtype, torch.float32))
        if scale is not None:
            g = g * scale[ids, None]
        pad = _pad_mask(module, ids)
        if pad is not None:
            ids = ids.masked_fill(pad, -1)
        T = ids.numel() // B if B else 0
        return {"weight": Factor(cols=g.reshape(B, T, g.shape[1]), row_ids=ids.reshape(B, T))}

    def probe_vectors(self, name, param, gen):
        # Rank-1 directions x y^T on [V, d]: <x y^T, dE> = sum_t s_{x_t} x[x_t] (g_t . y).
        return directions(param.shape[0], gen, param.device), directions(param.shape[1], gen,
                                                                         param.device)

    def probe_grad(self, name, grad, vectors):
        x, y = vectors
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, grad = grad.indices()[0], grad.values()
            x = x[rows]
        # For a [V, d] table: the contraction over d in the gradient's own precision (at least
        # float32; its rounding is far inside the probe's tolerance), no float64 copy.
        return (_columns_mv(grad, y) * x).sum(0)

    def _probe(self, module, ids, grad_output, vectors):
        """``<x y^T, sum_i dE_i> = sum_t s_t x[x_t] (g_t . y)``; the bound on the sum of the
        terms' absolute values uses ``sum_k |g_tk y_k| <= |g_t| |y|`` (Cauchy-Schwarz), which
        needs no ``|g|`` copy."""
        x, y = vectors
        ids, g, _ = _flat(module, ids, grad_output)
        ids = ids.long()
        gy = _columns_mv(g, y)  # [N, P]
        gn = torch.linalg.vector_norm(g, dim=1, dtype=torch.promote_types(g.dtype, torch.float32))
        gn = gn.double()[:, None]
        xs = x[ids]  # [N, P]
        scale = _scale(module, ids, torch.float64)
        if scale is not None:
            xs = xs * scale[ids, None]
        pad = _pad_mask(module, ids)
        if pad is not None:
            xs = xs.masked_fill(pad[:, None], 0.0)
        value = (gy * xs).sum(0)
        bound = (gn * xs.abs()).sum(0) * torch.linalg.vector_norm(y, dim=0)
        return torch.cat([value, bound])


def _columns_mv(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[N, P]`` float64 ``a @ y`` for a tall ``a`` ``[N, d]`` and a few columns ``y``, as one
    matrix-vector product per column in ``a``'s precision (at least float32): a GEMM this thin
    runs several times slower on CPU."""
    dt = torch.promote_types(a.dtype, torch.float32)
    a, y = a.to(dt), y.to(dt)
    return torch.stack([torch.mv(a, y[:, j]) for j in range(y.shape[1])], 1).double()
