"""gradstats: per-example gradient norms and the gradient noise scale for PyTorch.

Fused kernels give each example's squared gradient norm without forming per-example gradients;
the monitor turns them into tr(Sigma), |G|^2 and B_simple = tr(Sigma)/|G|^2 during training.
"""
from ._version import __version__
from ._loader import load_library as _load_library

_C = _load_library()

from ._ops import linear_fused, linear_norms, linear_strategy  # noqa: E402
from .curvature import CurvatureEstimator, CurvatureResult, hvp  # noqa: E402
from .estimators import NoiseScaleEMA, StepEstimate, step_estimate  # noqa: E402
from .monitor import ContractError, GradStatsMonitor, LayerStats, StepStats  # noqa: E402
from .rules import Rule, register_rule  # noqa: E402


def build_info() -> dict:
    """The gradstats version, the torch it was built against, and whether (and for which GPU
    architectures) CUDA kernels were compiled."""
    return dict(_C.build_info())


__all__ = [
    "__version__",
    "build_info",
    "linear_norms",
    "linear_fused",
    "linear_strategy",
    "GradStatsMonitor",
    "StepStats",
    "LayerStats",
    "ContractError",
    "NoiseScaleEMA",
    "StepEstimate",
    "step_estimate",
    "Rule",
    "register_rule",
    "CurvatureEstimator",
    "CurvatureResult",
    "hvp",
]
