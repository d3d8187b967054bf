"""Which parameters the monitor covers, and how: one slot per parameter, grouped into layers.

A module with a layer rule (:mod:`gradstats.rules`) covers the parameters its rule claims. Every
other trainable parameter (HF ``Conv1D``, the many RMSNorm classes, root-owned tokens, LayerScale
gammas) is covered at the function level (:mod:`gradstats.provenance`) and filed under the
module that owns it. Statistics are reported per layer: a covered module, or the owner of
function-level parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .rules.base import Rule
from .rules.fallback import FallbackRule
from .rules.registry import rule_for

__all__ = ["ParamState", "LayerState", "Coverage", "discover"]


@dataclass(eq=False)
class ParamState:
    """A covered parameter: its accumulator slot, the layer its statistics are filed under (its
    first owner when it is shared), and its probe directions."""

    slot: int
    qualname: str
    param: nn.Parameter
    layer: str
    rule: Rule | None  # None: covered at the function level
    local: str
    vectors: tuple[torch.Tensor, ...]
    uses: int = 1  # layers that use it (more than one: shared, cross terms)

    @property
    def probe_rows(self) -> int:
        """Rows of the ``[rows, cols]`` view of ``.grad`` the probe directions act on."""
        return self.param.shape[0] if len(self.vectors) == 2 else self.param.numel()

    def probe_of(self, t: torch.Tensor) -> list[float]:
        """The probe projections ``<V_j, t>`` of a tensor shaped like the parameter."""
        from .rules.base import probe_full

        if hasattr(t, "full_tensor"):  # a DTensor shard (FSDP2): every rank gathers it here
            t = t.full_tensor()
        f = self.rule.probe_grad if self.rule is not None else (lambda _, g, v: probe_full(g, v))
        return f(self.local, t, self.vectors).tolist()

    def probe_xy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe as ``x [rows, P]``, ``y [cols, P]`` (full directions: ``y`` all ones)."""
        if len(self.vectors) == 2:
            return self.vectors
        x = self.vectors[0]
        return x, torch.ones(1, x.shape[1], dtype=torch.float64, device=x.device)


@dataclass(eq=False)
class LayerState:
    """A covered module and the parameters its rule (or the function level) accounts for."""

    name: str
    module: nn.Module
    rule: Rule | None
    params: dict[str, ParamState] = field(default_factory=dict)
    fused: bool = False

    @property
    def slots(self) -> dict[str, int]:
        return {k: p.slot for k, p in self.params.items()}

    @property
    def shared(self) -> bool:
        return any(p.uses > 1 for p in self.params.values())


@dataclass
class Coverage:
    layers: dict[str, LayerState]            # module-rule layers, by module name
    params: list[ParamState]                 # every covered parameter, in slot order
    functional: dict[int, ParamState]        # id(param) -> state, for function-level params
    layer_names: list[str]                   # statistics groups, in model order
    uncovered: list[str]                     # trainable parameters left out (policy "ignore")

    def fingerprint(self) -> frozenset[int]:
        return frozenset(id(p.param) for p in self.params)


def trainable(model: nn.Module) -> frozenset[int]:
    """Identities of the model's parameters that need gradients now."""
    return frozenset(id(p) for p in model.parameters() if p.requires_grad)


class StructureWatch:
    """Counts registrations of modules and parameters anywhere (torch's global registration
    hooks), so that a monitor can tell cheaply whether a model may have changed since it was
    built: a new epoch, or a parameter's ``requires_grad`` flipped."""

    epoch = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        from torch.nn.modules import module as M

        def bump(*_):
            cls.epoch += 1

        M.register_module_module_registration_hook(bump)
        M.register_module_parameter_registration_hook(bump)
        cls._installed = True

    def __init__(self, model: nn.Module):
        self.install()
        self.epoch_at = StructureWatch.epoch
        self.params = [(p, p.requires_grad) for p in model.parameters()]

    def maybe_changed(self) -> bool:
        return (StructureWatch.epoch != self.epoch_at
                or any(p.requires_grad != flag for p, flag in self.params))


def discover(model: nn.Module, *, fallback: bool, functional: bool, seed: int) -> Coverage:
    """Covers every trainable parameter: module rules first (in module order), then (with
    ``functional``) the function level for the rest, or with ``fallback`` the torch.func rule
    per module; parameters neither covers are listed in ``uncovered``."""
    gen = torch.Generator().manual_seed(seed)
    claimed: set[int] = set()
    entities: list[tuple[str, nn.Module, Rule, dict[str, nn.Parameter]]] = []
    owner_of: dict[int, tuple[str, str]] = {}  # id(param) -> (first owning module, local name)
    for name, module in model.named_modules():
        for k, p in module.named_parameters(recurse=False):
            owner_of.setdefault(id(p), (name, k))
        if id(module) in claimed:
            continue
        rule = rule_for(module)
        if rule is None and fallback and any(p.requires_grad for p in
                                             module.parameters(recurse=False)):
            rule = FallbackRule()
        if rule is None:
            continue
        rule.check(module, name or "<root>")
        if rule.claims_children:
            claimed.update(id(m) for m in module.modules())
        own = {k: p for k, p in rule.params(module).items() if p.requires_grad}
        if own:
            entities.append((name, module, rule, own))

    uses: dict[int, int] = {}
    for _, _, _, own in entities:
        for p in own.values():
            uses[id(p)] = uses.get(id(p), 0) + 1
    params: list[ParamState] = []
    by_id: dict[int, ParamState] = {}
    layers: dict[str, LayerState] = {}
    names: list[str] = []
    for name, module, rule, own in entities:
        layer = layers[name] = LayerState(name, module, rule)
        for k, p in own.items():
            st = by_id.get(id(p))
            if st is None:
                st = by_id[id(p)] = ParamState(
                    len(params), f"{name}.{k}" if name else k, p, name, rule, k,
                    rule.probe_vectors(k, p, gen), uses[id(p)])
                params.append(st)
                if name not in names:
                    names.append(name)
            layer.params[k] = st
    function_level: dict[int, ParamState] = {}
    uncovered: list[str] = []
    default = Rule()
    for qual, p in model.named_parameters():
        if not p.requires_grad or id(p) in by_id:
            continue
        mod, local = owner_of[id(p)]
        if not functional:
            uncovered.append(f"{qual} ({type(model.get_submodule(mod)).__name__})")
            continue
        st = ParamState(len(params), qual, p, mod, None, local,
                        default.probe_vectors(local, p, gen), 1)
        params.append(st)
        by_id[id(p)] = function_level[id(p)] = st
        if mod not in names:
            names.append(mod)
    if not params:
        raise ValueError("the model has no trainable parameters"
                         + (f" in supported layers (left out: {', '.join(uncovered)})"
                            if uncovered else ""))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    names.sort(key=lambda n: order.get(n, len(order)))
    return Coverage(layers, params, function_level, names, uncovered)
