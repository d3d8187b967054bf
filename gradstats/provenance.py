"""Which tensors carry the batch, decided from where they came from, never from their sizes.

The root module's inputs carry the batch (the first tensor dims that agree among them, found in
positional and keyword arguments and nested dicts, lists, tuples and dataclasses). During a
counted forward a :class:`torch.overrides.TorchFunctionMode` follows the batch-free tensors: the
outputs of factory functions (``torch.arange(T)``, ``zeros``, ``full``, ...), the model's buffers
and parameters, and everything computed from those alone. A layer whose input is batch-free
(nanoGPT's ``wpe(torch.arange(T))``, a Linear on learned queries) is told so, whatever the
sizes: ``T == B`` included.
"""
from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["find_batch", "tensor_leaves", "BatchFreeMode"]

_FACTORIES = {
    torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor,
    torch.as_tensor, torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn,
    torch.randint, torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
    torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
    torch.Tensor.new_empty, torch.Tensor.new_tensor, torch.tril_indices, torch.triu_indices,
}


def tensor_leaves(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in ``obj``: itself, or inside mappings, lists, tuples and dataclasses."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 8:
        return
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensor_leaves(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensor_leaves(v, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensor_leaves(getattr(obj, f.name), depth + 1)


def find_batch(args: tuple, kwargs: dict, batch_dim: int = 0) -> int | None:
    """The batch size of a root call: the most common size of dim ``batch_dim`` among the tensor
    inputs (positional, keyword, nested) that have it; the first such input breaks ties."""
    sizes: dict[int, int] = {}
    for t in tensor_leaves((args, kwargs)):
        if t.dim() > batch_dim:
            b = t.shape[batch_dim]
            sizes[b] = sizes.get(b, 0) + 1
    if not sizes:
        return None
    top = max(sizes.values())
    return next(b for b, c in sizes.items() if c == top)


class BatchFreeMode(TorchFunctionMode):
    """Follows the batch-free tensors of one forward (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._static = weakref.WeakValueDictionary()
        for t in [*model.parameters(), *model.buffers()]:
            self._static[id(t)] = t
        self._free: dict[int, weakref.ref] = {}

    def refresh(self, model: nn.Module) -> None:
        self._static = weakref.WeakValueDictionary(
            {id(t): t for t in [*model.parameters(), *model.buffers()]})

    def clear(self) -> None:
        self._free.clear()

    def is_batch_free(self, t: torch.Tensor) -> bool:
        """Whether ``t`` was computed from factory outputs, buffers and parameters alone."""
        i = id(t)
        if self._static.get(i) is t:
            return True
        ref = self._free.get(i)
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return out
        if func in _FACTORIES:
            self._mark(out)
            return out
        free, seen = True, False
        for t in tensor_leaves((args, kwargs)):
            seen = True
            if not self.is_batch_free(t):
                free = False
                break
        if free and seen:
            self._mark(out)
        elif not free:
            self._free.pop(id(out), None)  # an in-place op mixed the batch in
        return out

    def _mark(self, t: torch.Tensor) -> None:
        self._free[id(t)] = weakref.ref(t)
