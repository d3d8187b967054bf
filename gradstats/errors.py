"""The errors gradstats raises for its own reasons (they name the cause in the message)."""
from __future__ import annotations

__all__ = ["ContractError"]


class ContractError(RuntimeError):
    """The gradients do not satisfy what the statistics assume (named in the message)."""
