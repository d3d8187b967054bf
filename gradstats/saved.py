"""Tensors the hooks keep for backward, saved as autograd would save them: under activation
checkpointing's saved-tensor hooks, what the segment discards is not kept alive here."""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["pack_saved", "unpack_saved"]


def pack_saved(saved: tuple) -> tuple[tuple, Callable | None]:
    """Saves the tensors among ``saved`` the way autograd would under the current saved-tensor
    hooks (those of activation checkpointing), so that what checkpointing discards is not kept
    alive here. Returns ``((is_packed, value), ...)`` and the matching unpack hook."""
    hooks = None
    if not torch.compiler.is_compiling():
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    if hooks is None:
        return tuple((False, t) for t in saved), None
    pack, unpack = hooks
    return tuple((True, pack(t)) if isinstance(t, torch.Tensor) else (False, t)
                 for t in saved), unpack


def unpack_saved(packed: tuple, unpack: Callable | None) -> tuple:
    return tuple(unpack(v) if is_packed else v for is_packed, v in packed)
