"""The layer-rule registry: module type -> :class:`~gradstats.rules.base.Rule` (as Opacus
registers its grad samplers). Learning-rate rules are something else: see
:mod:`gradstats.scaling`."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .base import Rule

_LAYER_RULES: dict[type[nn.Module], Rule] = {}

__all__ = ["register_rule", "rule_for", "registered_types"]


def register_rule(*module_types: type[nn.Module]) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: ``@register_rule(nn.Linear)`` makes the rule handle that module type, and
    its subclasses that keep its ``forward`` (a subclass with its own forward computes something
    else, such as timm's channels-first ``LayerNorm2d``, and is covered at the function level)."""

    def wrap(cls: type[Rule]) -> type[Rule]:
        for t in module_types:
            _LAYER_RULES[t] = cls()
        return cls

    return wrap


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for ``module``: the first registered type along its method resolution order,
    provided no class between them overrides ``forward``."""
    forward = type(module).forward
    for t in type(module).__mro__:
        rule = _LAYER_RULES.get(t)
        if rule is not None:
            return rule if forward is t.forward else None
    return None


def registered_types() -> tuple[type[nn.Module], ...]:
    """The module types that have a layer rule."""
    return tuple(_LAYER_RULES)
