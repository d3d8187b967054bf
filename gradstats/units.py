"""The loss's units: what each example's gradient is scaled by before autograd sums it.

``u_i = c_i g_i`` with ``c_i = s * r_i / k``: ``s`` the GradScaler's scale, ``r_i`` the reduction
factor of the example's micro-batch (``1/b`` for a mean over ``b`` examples, ``1/n`` for a mean
over its ``n`` valid tokens, 1 for a sum) and ``k`` the micro-batches of the step when each loss
was divided by their number (``accumulation="mean"``). This module also holds the rounding model
of the contract probe (which precision the gradients passed through).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .contract import unit_roundoff
from .layers import ParamState

__all__ = ["LossUnits", "hf_token_counts"]

_REDUCTIONS = ("mean", "sum", "token_mean")


def hf_token_counts(model: nn.Module) -> Callable[[tuple, dict], Any]:
    """Valid tokens of a Hugging Face call: entries of its ``labels`` argument other than -100,
    after the shift by one position that ``*ForCausalLM`` losses apply."""
    shift = type(model).__name__.endswith("ForCausalLM")

    def count(args: tuple, kwargs: dict) -> torch.Tensor:
        labels = kwargs.get("labels")
        if labels is None:
            raise ValueError("loss_reduction='token_mean' needs the token counts: pass "
                             "labels= to the model, or token_counts= to the monitor")
        if shift:
            labels = labels[..., 1:]
        return (labels != -100).sum()

    return count


class LossUnits:
    def __init__(self, model: nn.Module, reduction: str, accumulation: str,
                 scaler: torch.amp.GradScaler | None,
                 token_counts: Callable[[tuple, dict], Any] | None):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if accumulation not in ("mean", "sum"):
            raise ValueError(f"accumulation must be one of ('mean', 'sum'), got {accumulation!r}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if token_counts is not None and not callable(token_counts):
            raise TypeError("token_counts must be a callable f(args, kwargs) -> token count")
        self.reduction_kind, self.accumulation, self.scaler = reduction, accumulation, scaler
        self.token_counts = token_counts or (hf_token_counts(model) if reduction == "token_mean"
                                             else None)
        self._scale: torch.Tensor | None = None
        self._autocast: torch.dtype | None = None

    def reduction(self, args: tuple, kwargs: dict, batch: int) -> float | torch.Tensor:
        """``r_i`` for the examples of a forward that starts now."""
        if self.reduction_kind == "sum":
            return 1.0
        if self.reduction_kind == "mean":
            return 1.0 / batch if batch else 0.0
        n = self.token_counts(args, kwargs)
        if isinstance(n, torch.Tensor):
            n = n.to(torch.float64)
            return torch.where(n > 0, 1.0 / n.clamp_min(1), torch.zeros_like(n))
        return 1.0 / n if n else 0.0

    def on_forward(self) -> None:
        """Notes the loss scale and the autocast precision of the step's first forward."""
        if self._scale is None and self.scaler_enabled():
            self._scale = self.scaler._scale.detach().clone() if self.scaler._scale is not None \
                else None
        for device in ("cuda", "cpu"):
            if torch.is_autocast_enabled(device):
                dt = torch.get_autocast_dtype(device)
                if self._autocast is None or unit_roundoff(dt) > unit_roundoff(self._autocast):
                    self._autocast = dt

    def scaler_enabled(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def scale(self) -> tuple[float, bool]:
        """``(s, unscaled)``: the loss scale of this step's backward passes, and whether
        ``scaler.unscale_`` already divided it out of ``.grad``."""
        if not self.scaler_enabled():
            return 1.0, False
        s = self._scale if self._scale is not None else self.scaler._scale
        from torch.amp.grad_scaler import OptState

        unscaled = any(st.get("stage") == OptState.UNSCALED
                       for st in self.scaler._per_optimizer_states.values())
        return (float(s) if s is not None else 1.0), unscaled

    def scale_value(self) -> float:
        return self.scale()[0] if self.scaler_enabled() else 1.0

    def end_step(self) -> None:
        self._scale = None
        self._autocast = None

    def roundoff(self, params: list[ParamState]) -> tuple[list[float], list[float]]:
        """Per parameter: the unit roundoff of the accumulation precision (float32 unless the
        parameter is float64) and of the lowest precision its gradient was stored in."""
        acc, store = [], []
        for p in params:
            dt = p.param.dtype
            acc.append(unit_roundoff(torch.float64 if dt == torch.float64 else torch.float32))
            low = dt if dt.is_floating_point else torch.float32
            if self._autocast is not None and dt != torch.float64 and \
                    unit_roundoff(self._autocast) > unit_roundoff(low):
                low = self._autocast
            store.append(unit_roundoff(low))
        return acc, store

    def detach(self) -> None:
        """Nothing to undo yet (kept for the scaler watch of :meth:`__init__`)."""
