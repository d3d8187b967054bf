"""Layer rules, registered by module type (as Opacus registers its grad samplers).

A rule knows, for one kind of layer, how to get each example's squared gradient norm for each of
the layer's parameters from what the layer saw in forward (its input) and backward (the gradient
of its output), and how to evaluate a cheap random projection of the summed gradient (the probe
the monitor uses to check the units contract). The registry is in :mod:`.registry`, the
interface and shared helpers in :mod:`.base`.
"""
from .base import Factor, Rule, Sink
from .registry import register_rule, registered_types, rule_for

from . import attention, conv, embedding, linear, norm  # noqa: E402,F401  (the built-in rules)

__all__ = ["Rule", "Sink", "Factor", "register_rule", "rule_for", "registered_types"]
