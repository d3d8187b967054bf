"""The loss's units: what each example's gradient is scaled by before autograd sums it.

``u_i = c_i g_i`` with ``c_i = s * r_i / k``: ``s`` the GradScaler's scale, ``r_i`` the reduction
factor of the example's micro-batch (``1/b`` for a mean over ``b`` examples, ``1/n`` for a mean
over its ``n`` valid tokens, 1 for a sum) and ``k`` the micro-batches of the step when each loss
was divided by their number (``accumulation="mean"``). This module also holds the rounding model
of the contract probe (which precision the gradients passed through).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .contract import unit_roundoff
from .layers import ParamState

__all__ = ["LossUnits", "hf_token_counts", "LossForm", "inspect_loss", "check_forms",
           "ScalerWatch"]

_REDUCTIONS = ("mean", "sum", "token_mean")


def hf_token_counts(model: nn.Module) -> Callable[[tuple, dict], Any]:
    """Valid tokens of a Hugging Face call: entries of its ``labels`` argument other than -100,
    after the shift by one position that causal-LM losses apply (the model's ``loss_function`` is
    transformers' ``ForCausalLMLoss``, or its class is a ``*ForCausalLM`` / ``*LMHeadModel``)."""
    try:
        fn = getattr(model, "loss_function", None)
    except Exception:  # noqa: BLE001 - a property that cannot tell the model's loss
        fn = None
    name = type(model).__name__
    # transformers' loss_function falls back to ForCausalLMLoss for classes it cannot place
    # (T5ForConditionalGeneration, whose forward does not call it): encoder-decoders never shift
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    shift = not enc_dec and (getattr(fn, "__name__", "") == "ForCausalLMLoss"
                             or name.endswith("ForCausalLM") or name.endswith("LMHeadModel"))

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
        self.counts: list[Any] = []  # token_mean: each forward's token count, for check_forms
        self.forms: list[LossForm] = []
        self._watching = scaler is None
        if self._watching:
            ScalerWatch.acquire()
        self._scaler_calls = ScalerWatch.calls()

    def reduction(self, args: tuple, kwargs: dict, batch: int) -> float | torch.Tensor:
        """``r_i`` for the examples of a forward that starts now."""
        if self.reduction_kind == "sum":
            return 1.0
        if self.reduction_kind == "mean":
            return 1.0 / batch if batch else 0.0
        n = self.token_counts(args, kwargs)
        self.counts.append(n)
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

    def note_dtype(self, dtype: torch.dtype) -> None:
        """A layer computed in ``dtype`` (a bf16 unsharded parameter under FSDP2's mixed
        precision, a model cast to half): the probe's rounding model follows the lowest."""
        if dtype.is_floating_point and dtype != torch.float64 and (
                self._autocast is None or unit_roundoff(dtype) > unit_roundoff(self._autocast)):
            self._autocast = dtype

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
        self.forms.clear()
        self.counts.clear()
        self._scaler_calls = ScalerWatch.calls()

    def check(self, micro_batches: int) -> None:
        """The step's unit checks: the inspected losses against the declared units, and a
        GradScaler that scaled a loss without being passed."""
        from .contract import ContractError

        if self._watching and ScalerWatch.calls() != self._scaler_calls:
            last = ScalerWatch._last() if ScalerWatch._last is not None else None
            if last is not None and last.is_enabled() and last.get_scale() != 1.0:
                raise ContractError(
                    "a GradScaler scaled a loss during this step but the monitor was built "
                    "without it: pass scaler= to GradStatsMonitor (its changing scale would "
                    "otherwise enter tr(Sigma) and |G|^2 squared)")
        check_forms(self.forms, self.reduction_kind, self.accumulation, micro_batches,
                    self.scaler_enabled(), self.counts)

    def roundoff(self, params: list[ParamState]) -> tuple[list[float], list[float]]:
        """Per parameter: the unit roundoff of the accumulation precision (float32 unless the
        parameter is float64) and of the lowest precision its gradient was stored in."""
        acc, store = [], []
        for p in params:
            dt = p.param.dtype
            wide = dt == torch.float64 and self._autocast is None  # nothing computed narrower
            acc.append(unit_roundoff(torch.float64 if wide else torch.float32))
            low = dt if dt.is_floating_point else torch.float32
            if self._autocast is not None and dt != torch.float64 and \
                    unit_roundoff(self._autocast) > unit_roundoff(low):
                low = self._autocast
            store.append(unit_roundoff(low))
        return acc, store

    def detach(self) -> None:
        if self._watching:
            self._watching = False
            ScalerWatch.release()

# ----------------------------------------------------------------------------- unit checks
@dataclass(frozen=True)
class LossForm:
    """What a loss tensor's graph says about its units: ``reduction`` over the examples
    (``"mean"``, ``"sum"``, ``"token_mean"`` for a mean over more elements than examples, or
    None when the graph does not say), ``factor`` the scalar it was multiplied by afterwards
    (``1/k`` for accumulation), and ``scaled`` whether a GradScaler's scale multiplies it."""

    reduction: str | None
    factor: float
    scaled: bool
    count: float | None = None  # the number of terms a mean reduction divides by


_MEAN_NODES = {"MeanBackward0"}
_SUM_NODES = {"SumBackward0"}


def inspect_loss(loss: torch.Tensor, batch: int | None,
                 scalers: list[torch.amp.GradScaler] = ()) -> LossForm:
    """Reads a scalar loss's autograd graph from the top: scalar multiplies and divides (their
    product is ``factor``; a GradScaler's scale tensor is recognised as such), down to the
    reduction node."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.grad_fn is None:
        raise ValueError("loss must be a scalar tensor that requires grad")
    scale_ptrs = {s._scale.data_ptr() for s in scalers if getattr(s, "_scale", None) is not None}
    node, factor, scaled = loss.grad_fn, 1.0, False
    for _ in range(64):
        name = type(node).__name__
        nxt = [n for n, _ in node.next_functions if n is not None]
        if name in ("MulBackward0", "DivBackward0") and len(nxt) == 1:
            other = getattr(node, "_saved_other", None)
            if not isinstance(other, torch.Tensor) or other.numel() != 1:
                return LossForm(None, factor, scaled)
            if name == "MulBackward0" and other.data_ptr() in scale_ptrs:
                scaled = True
            else:
                v = float(other)
                factor = factor * v if name == "MulBackward0" else factor / v
            node = nxt[0]
            continue
        if name in _SUM_NODES:
            return LossForm("sum", factor, scaled)
        if name in _MEAN_NODES:
            n = math.prod(node._saved_self_sym_sizes)
            return LossForm("mean" if n == batch else "token_mean", factor, scaled, float(n))
        reduction = getattr(node, "_saved_reduction", None)
        if reduction == 2:
            return LossForm("sum", factor, scaled)
        if reduction == 1:  # a loss function's own mean: over its targets, or its elements
            total = getattr(node, "_saved_total_weight", None)
            count = float(total) if isinstance(total, torch.Tensor) else node._saved_self.numel()
            return LossForm("mean" if count == batch else "token_mean", factor, scaled, count)
        return LossForm(None, factor, scaled)
    return LossForm(None, factor, scaled)


def check_forms(forms: list[LossForm], declared: str, accumulation: str, micro_batches: int,
                has_scaler: bool, counts: list[Any] = ()) -> None:
    """Raises ContractError, naming the mismatch, when the inspected losses of a step contradict
    the monitor's declared units (``counts``: under ``token_mean``, the token counts the monitor
    used, one per forward, checked against the divisor of each loss's mean)."""
    from .contract import ContractError

    for k, f in enumerate(forms):
        used = counts[k] if declared == "token_mean" and len(counts) == len(forms) else None
        if isinstance(used, torch.Tensor):
            used = float(used) if used.numel() == 1 else None
        if f.count is not None and used is not None:
            if used != f.count:
                raise ContractError(
                    f"loss_reduction='token_mean': the loss of micro-batch {k} is a mean over "
                    f"{f.count:g} terms but the monitor's token count was {used:g}: pass "
                    "token_counts= returning the loss's own count")
        if declared == "token_mean":  # a token sum over a token count reads as a scaled sum
            f = LossForm(None, 1.0 / micro_batches if accumulation == "mean" else 1.0, f.scaled)
        if f.reduction is not None and f.reduction != declared:
            raise ContractError(
                f"the loss is a {f.reduction} over the batch but the monitor was built with "
                f"loss_reduction={declared!r}: tr(Sigma) and |G|^2 would be off by the batch "
                "size squared; pass loss_reduction=" + repr(f.reduction))
        if f.scaled and not has_scaler:
            raise ContractError("a GradScaler scales this loss but the monitor was built "
                                "without it: pass scaler= to GradStatsMonitor")
        want = 1.0 / micro_batches if accumulation == "mean" else 1.0
        if not math.isclose(f.factor, want, rel_tol=1e-6):
            if accumulation == "mean":
                hint = (f"each of the {micro_batches} micro-batch losses must be divided by "
                        f"{micro_batches}, found a factor {f.factor:.6g}")
            else:
                hint = (f"the losses carry a factor {f.factor:.6g} but accumulation='sum' "
                        "declares none")
            raise ContractError(f"accumulation={accumulation!r}: {hint}; statistics would be "
                                "off by its square")


class ScalerWatch:
    """Notices a GradScaler scaling a loss while a monitor built without ``scaler=`` runs: wraps
    ``torch.amp.GradScaler.scale`` while such monitors exist (and restores it after)."""

    _users = 0
    _calls = 0
    _last: weakref.ref | None = None
    _original: Any = None

    @classmethod
    def acquire(cls) -> None:
        if cls._users == 0:
            original = torch.amp.GradScaler.scale
            cls._original = original

            def scale(self, outputs):
                if self.is_enabled():
                    ScalerWatch._calls += 1
                    ScalerWatch._last = weakref.ref(self)
                return original(self, outputs)

            scale.__doc__ = original.__doc__
            torch.amp.GradScaler.scale = scale
        cls._users += 1

    @classmethod
    def release(cls) -> None:
        cls._users -= 1
        if cls._users == 0 and cls._original is not None:
            torch.amp.GradScaler.scale = cls._original
            cls._original = None

    @classmethod
    def calls(cls) -> int:
        return cls._calls
