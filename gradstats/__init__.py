"""gradstats: per-example gradient norms and the gradient noise scale for PyTorch.

Fused kernels give each example's squared gradient norm without forming per-example gradients;
the monitor turns them into tr(Sigma), |G|^2 and B_simple = tr(Sigma)/|G|^2 during training.

``import gradstats`` is cheap: torch and the compiled library load when a name below is first
used (so ``gradstats --version`` does not import torch).
"""
from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_EXPORTS = {
    "build_info": "._loader",
    "linear_norms": ".ops", "linear_fused": ".ops", "linear_strategy": ".ops",
    "GradStatsMonitor": ".monitor", "ContractError": ".contract",
    "StepStats": ".stats", "LayerStats": ".stats",
    "NoiseScaleEMA": ".estimators", "StepEstimate": ".estimators",
    "step_estimate": ".estimators",
    "Rule": ".rules", "Sink": ".rules", "register_rule": ".rules",
    "CurvatureEstimator": ".curvature", "CurvatureResult": ".curvature", "hvp": ".curvature",
    "AdamNoiseEstimator": ".adam", "AdamNoiseResult": ".adam",
    "TwoBatchEstimator": ".twobatch", "TwoBatchStats": ".twobatch",
}
_SUBMODULES = {"ops", "reference", "scaling", "schedulers", "critical", "curvature",
               "estimators", "monitor", "contract", "rules", "stats", "units", "provenance",
               "adam", "moments", "kernels", "logs", "integrations", "twobatch", "hvp"}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gradstats' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBMODULES])
