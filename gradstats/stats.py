"""What :meth:`GradStatsMonitor.step` returns."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .estimators import StepEstimate

__all__ = ["LayerStats", "StepStats", "LayerTable"]


@dataclass(frozen=True)
class LayerStats:
    """One layer's (or the whole model's) statistics for a step, in per-example loss units:
    this step's unbiased estimates and the smoothed ones (separate bias-corrected EMAs of
    ``tr(Sigma)`` and ``|G|^2``, and their ratio)."""

    tr_sigma: float
    g2: float
    b_simple: float
    defined: bool
    reason: str | None
    tr_sigma_ema: float
    g2_ema: float
    b_simple_ema: float

    @classmethod
    def of(cls, est: StepEstimate, ema: tuple[float, float, float]) -> LayerStats:
        """This step's estimate beside the EMA values ``(tr_sigma, g2, b_simple)`` after it."""
        return cls(est.tr_sigma, est.g2, est.b_simple, est.defined, est.reason, *ema)


class LayerTable(Mapping):
    """``stats.layers``: layer name -> :class:`LayerStats`; a missing name's error lists the
    valid ones."""

    def __init__(self, items: dict[str, LayerStats | tuple]):
        self._items = items

    def __getitem__(self, name: str) -> LayerStats:
        try:
            item = self._items[name]
        except KeyError:
            raise KeyError(f"no layer {name!r}; the layers are {list(self._items)} (module "
                           "names as in model.named_modules())") from None
        if isinstance(item, tuple):  # built on first access: (estimate, EMA values then)
            item = self._items[name] = LayerStats.of(*item)
        return item

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"LayerTable({list(self._items)})"


@dataclass(frozen=True)
class StepStats(LayerStats):
    """The whole model's statistics for the step (the :class:`LayerStats` fields), and:

    ``per_example_sq_norms`` ``[N]``: this process's examples in micro-batch order, each
    example's squared gradient norm over the covered parameters, in per-example loss units
    (None when the step was not measured). ``b_simple_stderr`` / ``b_simple_interval``: the
    uncertainty of the smoothed ``B_simple`` (see :class:`NoiseScaleEMA`). ``measured``: the
    statistics were computed this step (False between ``measure_every`` steps, or when the step
    was skipped, with ``skip_reason``). ``verified``: the full contract probe ran and passed on
    this step (otherwise only the always-on version check did).
    """

    step: int = 0
    n: int = 0
    measured: bool = True
    skipped: bool = False
    skip_reason: str | None = None
    verified: bool = False
    per_example_sq_norms: torch.Tensor | None = None
    b_simple_stderr: float = math.nan
    b_simple_interval: tuple[float, float] = (math.nan, math.nan)
    loss_scale: float = 1.0
    layers: Mapping[str, LayerStats] = field(default_factory=lambda: LayerTable({}))
