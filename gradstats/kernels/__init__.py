"""GPU kernels written in Triton: the fused Linear weight gradient with per-example norms.

- :func:`fused_linear`: ``dW``, ``db``, ``|dW_i|^2``, ``|db_i|^2`` (and optionally the
  per-coordinate ``sum_i dW_i^2``) in one pass over A and G (:mod:`.fused_linear`);
- :func:`gram_norms`: the norms by the Gram identity for short T, no T x T in memory
  (:mod:`.gram`); :mod:`.cost` chooses between them;
- :func:`linear_fused_collect`: drop-in for ``gradstats.ops.linear_fused_collect`` that sends
  CUDA float16/bfloat16/float32 inputs to the custom op
  ``torch.ops.gradstats.triton_linear_fused_collect`` (:mod:`.op`) and everything else to the
  C++/CUDA op.

CUDA tensors run compiled kernels; CPU tensors run the same kernels under Triton's interpreter
(slow; for tests), with no environment variable to set (:mod:`._launch`). Without Triton this
package still imports: :func:`available` is False, :func:`unavailable_reason` says why, the
router falls back to the C++ op, and the kernels raise ImportError naming what to install.
``GRADSTATS_TRITON=0`` turns the routing off.
"""
from __future__ import annotations

import os

import torch

from . import cost
from ._launch import import_error
from .fused_linear import Config, FusedLinearResult, bias_grads, fused_linear
from .gram import gram_norms
from .op import linear_fused_collect, triton_linear_fused_collect, use_triton

__all__ = ["available", "unavailable_reason", "enabled", "fused_linear", "gram_norms",
           "bias_grads", "linear_fused_collect", "triton_linear_fused_collect", "use_triton",
           "Config", "FusedLinearResult", "cost"]


def enabled() -> bool:
    """Triton is importable and ``GRADSTATS_TRITON`` is not ``0``."""
    return import_error() is None and os.environ.get("GRADSTATS_TRITON", "1") != "0"


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the fused Triton path would not run on ``device`` (default: the current CUDA
    device), or None when it would."""
    if import_error() is not None:
        return "triton is not importable (" + import_error() + ")"
    if not enabled():
        return "GRADSTATS_TRITON=0"
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cpu":
        return None  # Triton's interpreter
    if not torch.cuda.is_available():
        return "no CUDA device (CPU tensors run under Triton's interpreter only)"
    if torch.cuda.get_device_capability(dev) < (8, 0):
        return "the GPU is older than sm_80 (Triton's bfloat16 dot needs it)"
    return None


def available(device: torch.device | str | None = None) -> bool:
    """Whether the fused Triton path runs on ``device`` (default: the current CUDA device);
    for a CPU device, whether the interpreter can run the kernels."""
    return unavailable_reason(device) is None
