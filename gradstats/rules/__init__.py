"""Per-layer rules, registered by module type (as Opacus registers its grad samplers).

A rule knows, for one kind of layer, how to get each example's squared gradient norm for each of
the layer's parameters from what the layer saw in forward (its input) and backward (the gradient
of its output), and how to evaluate a cheap random projection of the summed gradient (the probe
the monitor uses to check the units contract).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .base import Rule

_RULES: dict[type[nn.Module], Rule] = {}


def register_rule(*module_types: type[nn.Module]) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: ``@register_rule(nn.Linear)`` makes the rule handle that module type
    (and its subclasses, unless a subclass has a rule of its own)."""

    def wrap(cls: type[Rule]) -> type[Rule]:
        for t in module_types:
            _RULES[t] = cls()
        return cls

    return wrap


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s type, looked up along its method resolution order."""
    for t in type(module).__mro__:
        if t in _RULES:
            return _RULES[t]
    return None


from . import attention, linear  # noqa: E402,F401  (registers the built-in rules)
from . import conv, embedding, norm  # noqa: E402,F401

__all__ = ["Rule", "register_rule", "rule_for"]
