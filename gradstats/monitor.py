"""GradStatsMonitor: per-layer and whole-model gradient noise during real training.

Units (DESIGN.md, "The units contract"): autograd propagates ``u_i = c g_i`` for example ``i``,
with ``c`` = loss scale x (1/b for a mean loss over a micro-batch of b) x (1/k when each of k
micro-batch losses was divided by k). ``p.grad = sum_i u_i``. Each step's statistics are formed
in per-example loss units (``g_i = u_i / c``), so they do not move when ``c`` does.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
from torch import nn

from . import _ops
from .estimators import NoiseScaleEMA, StepEstimate, step_estimate
from .rules import Rule, rule_for
from .rules.base import PROBES, cross_term

__all__ = ["GradStatsMonitor", "StepStats", "LayerStats", "ContractError"]


class ContractError(RuntimeError):
    """The gradients do not satisfy what the statistics assume (named in the message)."""


@dataclass(frozen=True)
class LayerStats:
    """One layer's (or the whole model's) statistics for a step, in per-example loss units."""

    tr_sigma: float
    g2: float
    b_simple: float
    defined: bool
    reason: str | None
    tr_sigma_ema: float
    g2_ema: float
    b_simple_ema: float


@dataclass(frozen=True)
class StepStats:
    """What :meth:`GradStatsMonitor.step` returns.

    ``per_example_sq_norms`` is ``[N]`` (this process's examples, in micro-batch order), each
    example's squared gradient norm over the covered parameters, in per-example loss units.
    ``tr_sigma``, ``g2``, ``b_simple`` are this step's unbiased estimates; the ``*_ema`` values
    are the smoothed ones (separate bias-corrected EMAs, ratio of the EMAs) and
    ``b_simple_stderr`` / ``b_simple_interval`` their uncertainty (delta method).
    """

    step: int
    n: int
    skipped: bool
    skip_reason: str | None
    per_example_sq_norms: torch.Tensor | None
    tr_sigma: float
    g2: float
    b_simple: float
    defined: bool
    reason: str | None
    tr_sigma_ema: float
    g2_ema: float
    b_simple_ema: float
    b_simple_stderr: float
    b_simple_interval: tuple[float, float]
    loss_scale: float
    layers: dict[str, LayerStats] = field(default_factory=dict)


class _Param:
    """A covered parameter: its probe directions and the layer its statistics are filed under
    (the first of its owners when it is shared)."""

    def __init__(self, qualname: str, param: nn.Parameter, layer: str, rule: Rule,
                 local: str, gen: torch.Generator):
        self.qualname, self.param, self.layer, self.rule, self.local = (
            qualname, param, layer, rule, local)
        self.vectors = rule.probe_vectors(local, param, gen)
        self.uses = 1
        if len(self.vectors) == 2:  # rank-1 directions over [shape[0], rest]
            self.rows, (self.x, self.y) = param.shape[0], self.vectors
        else:  # full directions [numel, PROBES]
            self.rows, self.x = param.numel(), self.vectors[0]
            self.y = torch.ones(1, self.x.shape[1], dtype=torch.float64, device=self.x.device)

    def summary(self, grad: torch.Tensor) -> torch.Tensor:
        """float64 ``[1 + PROBES]``: ``|grad|^2`` and the probe projections, in one pass."""
        if grad.is_sparse:
            g = grad.coalesce().to_dense()
            return torch.cat([g.double().square().sum().reshape(1),
                              self.rule.probe_grad(self.local, g, self.vectors)])
        return _ops.grad_summary(grad.reshape(self.rows, -1), self.x, self.y)


class _Layer:
    """A covered module: its rule and the parameters it contributes to."""

    def __init__(self, name: str, module: nn.Module, rule: Rule, params: dict[str, _Param]):
        self.name, self.module, self.rule, self.params = name, module, rule, params
        self.handles: list[Any] = []
        self.calls: dict[int, int] = {}  # forward id -> calls so far in that forward


def _is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


class GradStatsMonitor:
    """Collects per-example squared gradient norms during backward and turns them into the
    gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` at every optimizer step.

    Call :meth:`step` after the backward pass(es) of a step and before clipping, weight decay
    that writes into ``.grad``, or ``optimizer.step()``; zero the gradients after it.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is unwrapped).
        mode: ``"hooks"`` (forward hook + output-gradient hook, any supported layer) or
            ``"fused"`` (supported layers run a backward that computes dW and the norms in one
            op; the rest use hooks).
        loss_reduction: ``"mean"`` or ``"sum"`` over the examples of a micro-batch.
        accumulation: ``"mean"`` when each of the k micro-batch losses of a step is divided by
            k before backward, ``"sum"`` when not.
        scaler: the ``torch.amp.GradScaler`` in use, if any; its scale is divided out.
        unsupported: what to do with parameters of modules without a rule: ``"error"``,
            ``"warn"`` or ``"ignore"`` (both then leave them out of every statistic).
        beta: EMA factor of the smoothed statistics.
        dataset_size: examples in the data set, for the without-replacement correction.
        check_contract: compare a random projection of ``.grad`` with the same projection of
            what the hooks saw; raise ``ContractError`` on mismatch.
        process_group: for DDP, the group whose ranks share the statistics.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: Literal["hooks", "fused"] = "hooks",
        loss_reduction: Literal["mean", "sum"] = "mean",
        accumulation: Literal["mean", "sum"] = "mean",
        scaler: torch.amp.GradScaler | None = None,
        unsupported: Literal["error", "warn", "ignore", "fallback"] = "error",
        beta: float = 0.99,
        dataset_size: int | None = None,
        batch_dim: int = 0,
        check_contract: bool = True,
        process_group: Any = None,
        seed: int = 0,
    ) -> None:
        _choice("mode", mode, ("hooks", "fused"))
        _choice("loss_reduction", loss_reduction, ("mean", "sum"))
        _choice("accumulation", accumulation, ("mean", "sum"))
        _choice("unsupported", unsupported, ("error", "warn", "ignore", "fallback"))
        if dataset_size is not None and (not isinstance(dataset_size, int) or dataset_size < 2):
            raise ValueError(f"dataset_size must be an int >= 2, got {dataset_size!r}")
        if not isinstance(batch_dim, int) or batch_dim < 0:
            raise ValueError(f"batch_dim must be a non-negative int, got {batch_dim!r}")
        self._ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.model = model.module if self._ddp else model
        self.mode, self.loss_reduction, self.accumulation = mode, loss_reduction, accumulation
        self.scaler, self.dataset_size, self.batch_dim = scaler, dataset_size, batch_dim
        self.check_contract, self.process_group = check_contract, process_group
        self.ema = NoiseScaleEMA(beta)
        self._steps = 0
        self._paused = 0
        self._forward_id = 0
        self._batch: int | None = None
        self._scale_seen: torch.Tensor | None = None
        self._last_probe_grad: dict[int, list[float]] = {}
        self._params: dict[int, _Param] = {}
        self._layers = self._discover(unsupported, seed)
        self._layer_ema = {n: NoiseScaleEMA(beta)
                           for n in dict.fromkeys(p.layer for p in self._params.values())}
        self._by_module = {id(layer.module): layer for layer in self._layers.values()}
        self._reset()
        self._attach()

    # ----------------------------------------------------------------------------- set-up
    def _discover(self, unsupported: str, seed: int) -> dict[str, _Layer]:
        from .rules.fallback import FallbackRule

        gen = torch.Generator().manual_seed(seed)
        # Entities: modules with a rule (and what it claims) or with parameters of their own.
        entities: list[tuple[str, nn.Module, Rule | None, dict[str, nn.Parameter]]] = []
        claimed: set[int] = set()
        for name, module in self.model.named_modules():
            if id(module) in claimed:
                continue
            rule = rule_for(module)
            if rule is None and unsupported == "fallback" and any(
                    p.requires_grad for p in module.parameters(recurse=False)):
                rule = FallbackRule()
            if rule is not None:
                rule.check(module, name or "<root>")
                if rule.claims_children:
                    claimed.update(id(m) for m in module.modules())
            own = rule.params(module) if rule is not None else dict(
                module.named_parameters(recurse=False))
            own = {k: p for k, p in own.items() if p.requires_grad}
            if not own:
                continue
            if rule is not None and self.batch_dim != 0 and not rule.batch_dim_movable:
                raise ValueError(f"batch_dim={self.batch_dim} is not supported for {name} "
                                 f"({type(module).__name__}), whose batch dim is fixed")
            entities.append((name, module, rule, own))
        owners: dict[int, list[str]] = {}
        for name, _, _, own in entities:
            for p in own.values():
                owners.setdefault(id(p), []).append(name)
        uncovered = [(n, m) for n, m, r, _ in entities if r is None]
        if uncovered:
            names = ", ".join(f"{n or '<root>'} ({type(m).__name__})" for n, m in uncovered)
            msg = (f"no gradstats rule for {names}; their parameters would be left out of every "
                   "statistic. Pass unsupported='fallback' (torch.func per module), or 'ignore' "
                   "(or 'warn') to measure the covered parameters only")
            if unsupported == "error":
                raise ValueError(msg)
            if unsupported == "warn":
                warnings.warn(msg, stacklevel=3)
        covered = {n for n, _, r, _ in entities if r is not None}
        layers: dict[str, _Layer] = {}
        for name, module, rule, own in entities:
            if rule is None:
                continue
            mine: dict[str, _Param] = {}
            for k, p in own.items():
                if not all(n in covered for n in owners[id(p)]):
                    continue  # shared with a module that has no rule: left out
                if id(p) not in self._params:
                    self._params[id(p)] = _Param(f"{name}.{k}" if name else k, p, name, rule, k,
                                                 gen)
                mine[k] = self._params[id(p)]
                self._params[id(p)].uses = len(owners[id(p)])
            if mine:
                layers[name] = _Layer(name, module, rule, mine)
        if not layers:
            raise ValueError("the model has no trainable parameters in supported layers")
        return layers

    def _attach(self) -> None:
        self._root_handle = self.model.register_forward_pre_hook(self._on_root_forward)
        self._bn_handles = [
            m.register_forward_pre_hook(_refuse_training_batchnorm(n))
            for n, m in self.model.named_modules() if _is_batchnorm(m)
        ]
        for layer in self._layers.values():
            if layer.rule.replaces_forward or (self.mode == "fused" and layer.rule.supports_fused
                                               and self.batch_dim == 0):
                layer.module.forward = layer.rule.fused_forward(layer.module, self._begin_fused)
            else:
                layer.handles.append(layer.module.register_forward_hook(
                    self._on_forward, with_kwargs=getattr(layer.rule, "wants_kwargs", False)))

    def detach(self) -> None:
        """Removes every hook and restores the layers' own forward."""
        for layer in self._layers.values():
            for h in layer.handles:
                h.remove()
            layer.handles.clear()
            if "forward" in vars(layer.module):
                del layer.module.forward
        for h in [self._root_handle, *self._bn_handles]:
            h.remove()
        self._bn_handles = []

    def __enter__(self) -> GradStatsMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Backward passes inside this block (penalties, Hessian-vector products) and forwards
        run in it are not counted."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # ----------------------------------------------------------------------------- hooks
    def _reset(self) -> None:
        self._norms: dict[int, dict[int, torch.Tensor]] = {}  # forward id -> param id -> [b]
        self._probes: dict[int, torch.Tensor] = {}  # param id -> [2 PROBES]
        self._factors: dict[tuple[int, int], list[Any]] = {}  # (param id, forward id) -> uses
        self._seen: set[tuple[str, int, Any]] = set()
        self._scale_seen = None
        for layer in self._layers.values():
            layer.calls.clear()

    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        if not self._paused:
            self._forward_id += 1
            first = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), None)
            self._batch = (first.shape[self.batch_dim]
                           if first is not None and first.dim() > self.batch_dim else None)

    def _broadcast(self, layer: _Layer, inputs: Any, output: torch.Tensor):
        """For a shared (batch-free) input such as position ids: the input and output expanded
        to the batch, or None when the input has the batch already."""
        ids, B = inputs[0], self._batch
        if (not layer.rule.broadcast_inputs or B is None or self.batch_dim != 0
                or not isinstance(ids, torch.Tensor) or ids.dim() == 0 or ids.shape[0] == B):
            return None
        if getattr(layer.module, "scale_grad_by_freq", False):
            raise ContractError(f"{layer.name}: scale_grad_by_freq with ids shared by the whole "
                                "batch is not supported")
        if ids.shape[0] == 1 and ids.dim() > 1:
            return (ids.expand(B, *ids.shape[1:]),), output.expand(B, *output.shape[1:])
        return (ids.unsqueeze(0).expand(B, *ids.shape),), output.unsqueeze(0).expand(
            B, *output.shape)

    def _counted_forward(self, layer: _Layer, requires_grad: bool) -> int | None:
        """The call's index within this forward, or None when the call is not counted."""
        if self._paused or not torch.is_grad_enabled() or not requires_grad:
            return None
        if torch._C._current_graph_task_id() != -1:
            return None  # recomputation under activation checkpointing, inside backward
        call = layer.calls.get(self._forward_id, 0)
        layer.calls[self._forward_id] = call + 1
        return call

    def _on_forward(self, module: nn.Module, *hook_args: Any) -> None:
        layer = self._by_module[id(module)]
        output = hook_args[-1]
        inputs = hook_args[0] if len(hook_args) == 2 else hook_args[:2]
        if not isinstance(output, torch.Tensor):
            return
        call = self._counted_forward(layer, output.requires_grad)
        if call is None:
            return
        expanded = self._broadcast(layer, inputs, output)
        if expanded is not None:
            inputs, output = expanded
        saved = layer.rule.capture(module, inputs, output)
        if self.batch_dim:
            saved = _batch_first(saved, self.batch_dim)
        cell = [saved]
        fid = self._forward_id

        def on_grad(grad: torch.Tensor) -> None:
            if self._paused:
                return
            if cell[0] is None:
                raise ContractError(
                    f"backward reached the output of {layer.name} twice for one forward; wrap "
                    "backward passes that are not training steps in monitor.paused()")
            saved, cell[0] = cell[0], None  # release the activation at once
            grad = grad.detach()
            if self.batch_dim:
                grad = grad.movedim(self.batch_dim, 0)
            self._collect(layer, fid, (call, None), saved, grad, None)

        output.register_hook(on_grad)
        return output if expanded is not None else None

    def _begin_fused(self, module: nn.Module, requires_grad: bool):
        """Called by a fused forward: the callback its backward reports to, or None."""
        layer = self._by_module[id(module)]
        call = self._counted_forward(layer, requires_grad)
        if call is None:
            return None
        fid = self._forward_id

        def on_backward(saved: torch.Tensor, grad: torch.Tensor, norms: dict[str, torch.Tensor],
                        probes: Any = None, sub: Any = None) -> None:
            if not self._paused:
                self._collect(layer, fid, (call, sub), saved, grad, norms, probes)

        return on_backward

    def _collect(self, layer: _Layer, fid: int, part: Any, saved: Any, grad: torch.Tensor,
                 norms: dict[str, torch.Tensor] | None, probes: Any = None) -> None:
        """Files one use's per-example norms and probe values (``probes``: a dict, or a function
        of the probe vectors) under forward ``fid``, adding cross terms for shared params."""
        key = (layer.name, fid, part)
        if key in self._seen:
            raise ContractError(
                f"backward reached the output of {layer.name} twice for one forward; wrap "
                "backward passes that are not training steps in monitor.paused()")
        self._seen.add(key)
        vectors = ({k: p.vectors for k, p in layer.params.items()} if self.check_contract
                   else None)
        self._paused += 1  # a rule may run the module again (the torch.func fallback)
        try:
            if norms is None:
                norms, probes = layer.rule.collect(layer.module, saved, grad, vectors)
            elif vectors is None:
                probes = {}
            elif callable(probes):
                probes = probes(vectors)
            elif probes is None:
                probes = layer.rule.probe(layer.module, saved, grad, vectors)
            shared = [k for k, p in layer.params.items()
                      if k in norms and (p.uses > 1 or layer.calls.get(fid, 1) > 1)]
            try:
                factors = layer.rule.factors(layer.module, saved, grad) if shared else {}
            except NotImplementedError:
                raise ContractError(
                    f"{', '.join(layer.params[k].qualname for k in shared)} is used more than "
                    f"once per forward, and the {type(layer.rule).__name__} has no cross terms "
                    "for it") from None
        finally:
            self._paused -= 1
        acc = self._norms.setdefault(fid, {})
        for k, v in norms.items():
            pid = id(layer.params[k].param)
            v = v.detach().double()
            if k in shared:
                uses = self._factors.setdefault((pid, fid), [])
                for prev in uses:
                    v = v + 2.0 * cross_term(prev, factors[k]).to(v.device)
                uses.append(factors[k])
            acc[pid] = acc[pid] + v if pid in acc else v
        for k, v in probes.items():
            pid = id(layer.params[k].param)
            self._probes[pid] = self._probes[pid] + v if pid in self._probes else v
        if self.scaler is not None and self._scale_seen is None and self.scaler.is_enabled():
            self._scale_seen = self.scaler._scale.detach().clone()

    # ----------------------------------------------------------------------------- step
    def _world_size(self) -> int:
        if (self._ddp or self.process_group is not None) and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(self.process_group)
        return 1

    def step(self) -> StepStats:
        """Statistics of the step whose backward pass(es) just ran; resets for the next step."""
        try:
            return self._step()
        finally:
            self._reset()

    def _step(self) -> StepStats:
        fids = sorted(self._norms)
        if not fids:
            raise RuntimeError("step() called with no counted backward pass since the last step")
        sizes: dict[int, int] = {}
        for fid in fids:
            for pid, v in self._norms[fid].items():
                if sizes.setdefault(fid, v.shape[0]) != v.shape[0]:
                    raise ContractError(
                        f"layers disagree on the batch size of one forward: "
                        f"{self._params[pid].qualname} has {v.shape[0]} examples, others "
                        f"{sizes[fid]}")
        micro = [sizes[f] for f in fids]
        if self.loss_reduction == "mean" and len(set(micro)) > 1:
            raise ContractError(
                f"micro-batches of unequal size {micro} under a mean loss: each carries a "
                "different 1/b, so the summed gradient is not a mean over examples; use equal "
                "micro-batches or loss_reduction='sum'")
        n_local = sum(micro)
        params = list(self._params.values())
        device = params[0].param.device

        # Device-side values, packed so that one transfer (and one all-reduce) carries them.
        f64 = dict(dtype=torch.float64, device=device)
        pids = [id(P.param) for P in params]
        sums = torch.zeros(len(pids), **f64)
        per_fid = []
        for f in fids:
            d = self._norms[f]
            rows = torch.stack([d[pid].to(device) if pid in d else torch.zeros(sizes[f], **f64)
                                for pid in pids])  # [params, examples]
            sums += rows.sum(1)
            per_fid.append(rows.sum(0))
        per_example = torch.cat(per_fid)
        no_probe = torch.zeros(2 * PROBES, **f64)
        probes = torch.stack([self._probes.get(pid, no_probe).to(device) for pid in pids])
        grad_side = []
        for P in params:
            g = P.param.grad
            if g is None:
                grad_side.append(torch.zeros(1 + PROBES, **f64))
            else:
                grad_side.append(P.summary(g.detach()).to(device))
        scale = (self._scale_seen.double().reshape(1).to(device) if self._scale_seen is not None
                 else torch.ones(1, **f64))
        counts = torch.tensor([n_local, n_local**2], **f64)
        hook_t = torch.cat([torch.cat([sums[:, None], probes], 1).flatten(), counts])
        world = self._world_size()
        if world > 1:
            torch.distributed.all_reduce(hook_t, group=self.process_group)
        host = torch.cat([hook_t, *grad_side, scale]).cpu().tolist()
        per_example = per_example.cpu()
        keys = params

        nk, hw, gw = len(keys), 1 + 2 * PROBES, 1 + PROBES
        hook_vals = [host[hw * i: hw * (i + 1)] for i in range(nk)]
        n, n_sq = int(round(host[hw * nk])), host[hw * nk + 1]
        off = hw * nk + 2
        grad_vals = [host[off + gw * i: off + gw * (i + 1)] for i in range(nk)]
        s = host[-1]
        if world > 1 and self.loss_reduction == "mean" and abs(n_sq * world - n * n) > 0.5:
            raise ContractError("ranks saw different numbers of examples under a mean loss")

        self._steps += 1
        finite = all(math.isfinite(v) for v in host) and bool(torch.isfinite(per_example).all())
        if not finite:
            bad = [P.qualname for P, hv, gv in zip(keys, hook_vals, grad_vals)
                   if not all(math.isfinite(v) for v in (*hv, *gv))]
            if self.scaler is not None and self.scaler.is_enabled():
                return self._skipped(n, s, f"non-finite gradients in {', '.join(bad)} "
                                           "(the GradScaler skips this step)")
            raise ContractError(f"non-finite gradient values in {', '.join(bad) or 'the model'}")

        unscaled = False
        if self.check_contract:
            unscaled = self._verify(keys, hook_vals, grad_vals, world, s)
        elif self.scaler is not None and self.scaler.is_enabled():
            unscaled = _scaler_unscaled(self.scaler)

        # c: what autograd's u_i carry on top of the per-example loss gradient g_i.
        c = s
        if self.loss_reduction == "mean":
            c /= micro[0]
        if self.accumulation == "mean":
            c /= len(fids)
        grad_to_sum = world * (s if unscaled else 1.0)  # sum_i u_i = grad_to_sum * p.grad
        per_layer: dict[str, list[float]] = {}
        for P, hv, gv in zip(keys, hook_vals, grad_vals):
            acc = per_layer.setdefault(P.layer, [0.0, 0.0])
            acc[0] += hv[0] / (c * c)
            acc[1] += gv[0] * (grad_to_sum / (n * c)) ** 2
        layer_stats = {}
        for name, (sum_sq, mean_sq) in per_layer.items():
            est = self._estimate(sum_sq, mean_sq, n)
            self._layer_ema[name].update(est)
            layer_stats[name] = _layer_stats(est, self._layer_ema[name])
        total = self._estimate(sum(v[0] for v in per_layer.values()),
                               sum(v[1] for v in per_layer.values()), n)
        self.ema.update(total)
        return StepStats(
            step=self._steps, n=n, skipped=False, skip_reason=None,
            per_example_sq_norms=per_example / (c * c),
            tr_sigma=total.tr_sigma, g2=total.g2, b_simple=total.b_simple,
            defined=total.defined, reason=total.reason,
            tr_sigma_ema=self.ema.tr_sigma, g2_ema=self.ema.g2, b_simple_ema=self.ema.b_simple,
            b_simple_stderr=self.ema.b_simple_stderr, b_simple_interval=self.ema.interval(),
            loss_scale=s, layers=layer_stats)

    def _estimate(self, sum_sq: float, mean_sq: float, n: int) -> StepEstimate:
        # Rounding can push n|gbar|^2 a hair above sum |g_i|^2 when every example agrees.
        return step_estimate(sum_sq, min(mean_sq, sum_sq / n) if n > 1 else mean_sq, n,
                             self.dataset_size)

    def _skipped(self, n: int, s: float, why: str) -> StepStats:
        nan = math.nan
        return StepStats(
            step=self._steps, n=n, skipped=True, skip_reason=why, per_example_sq_norms=None,
            tr_sigma=nan, g2=nan, b_simple=nan, defined=False, reason=why,
            tr_sigma_ema=self.ema.tr_sigma, g2_ema=self.ema.g2, b_simple_ema=self.ema.b_simple,
            b_simple_stderr=self.ema.b_simple_stderr, b_simple_interval=self.ema.interval(),
            loss_scale=s, layers={})

    def _verify(self, keys, hook_vals, grad_vals, world: int, s: float) -> bool:
        """Checks the projections ``<V_j, p.grad>`` against the hooks' ``<V_j, sum_i u_i>`` for
        every parameter; returns whether ``.grad`` was already unscaled by the GradScaler."""

        def mismatches(unscaled: bool) -> list[int]:
            f = world * (s if unscaled else 1.0)
            out = []
            for i, (P, hv, gv) in enumerate(zip(keys, hook_vals, grad_vals)):
                rtol = max(2000 * torch.finfo(P.param.dtype).eps, 1e-10)
                if any(abs(gv[1 + j] * f - hv[1 + j]) > rtol * hv[1 + PROBES + j] + 1e-300
                       for j in range(PROBES)):
                    out.append(i)
            return out

        bad = mismatches(False)
        unscaled = False
        if bad and s != 1.0:
            bad_u = mismatches(True)
            if len(bad_u) < len(bad):
                bad, unscaled = bad_u, True
        if bad:
            raise ContractError(self._diagnose(keys, hook_vals, grad_vals, bad,
                                               world * (s if unscaled else 1.0)))
        for P, gv in zip(keys, grad_vals):
            self._last_probe_grad[id(P.param)] = gv[1:]
        return unscaled

    def _diagnose(self, keys, hook_vals, grad_vals, bad, f: float) -> str:
        """Names the likeliest cause of a probe mismatch; each test uses every direction."""
        where = ", ".join(keys[i].qualname for i in bad)
        got = [[grad_vals[i][1 + j] * f for j in range(PROBES)] for i in bad]
        want = [hook_vals[i][1:1 + PROBES] for i in bad]
        tol = [[1e-3 * hook_vals[i][1 + PROBES + j] + 1e-300 for j in range(PROBES)]
               for i in bad]

        def same(xs: list[float]) -> bool:
            return all(math.isfinite(x) and abs(x - xs[0]) <= 1e-3 * abs(xs[0]) for x in xs)

        prev = [self._last_probe_grad.get(id(keys[i].param)) for i in bad]
        if all(p is not None and all(abs(g[j] - w[j] - p[j] * f) <= t[j] for j in range(PROBES))
               for g, w, p, t in zip(got, want, prev, tol)):
            return (f".grad of {where} was not zeroed since the last step: it still holds the "
                    "previous gradient (call optimizer.zero_grad() after monitor.step())")
        ratios = [g[j] / w[j] for g, w in zip(got, want) for j in range(PROBES) if w[j] != 0]
        if ratios and same(ratios) and 0 <= ratios[0] < 1:
            return (f".grad of {where} was scaled by {ratios[0]:.4g} before step() (gradient "
                    "clipping?): call monitor.step() before clipping")
        lams = []
        for i, g, w in zip(bad, got, want):
            P = keys[i]
            pv = P.rule.probe_grad(P.local, P.param.detach(), P.vectors).tolist()
            lams += [(g[j] - w[j]) / (pv[j] * f) if pv[j] else math.nan for j in range(PROBES)]
        if lams and same(lams) and lams[0] > 0:
            return (f".grad of {where} had weight decay or an L2 term (~{lams[0]:.3g} x param) "
                    "added before step(): call monitor.step() before it is added")
        return (f".grad of {where} holds contributions the hooks never saw (a loss term that "
                "bypasses the layer's output, a call outside the model's forward, a "
                "parametrization, or a second backward): per-example norms would not match "
                ".grad")

    # ----------------------------------------------------------------------------- state
    @property
    def layer_names(self) -> list[str]:
        """Names of the layers the statistics are reported for."""
        return list(self._layer_ema)

    @property
    def parameter_names(self) -> list[str]:
        """Qualified names of the parameters every statistic covers."""
        return [p.qualname for p in self._params.values()]

    def state_dict(self) -> dict:
        """Smoothed statistics and the step count, to resume a run."""
        return {"steps": self._steps, "ema": self.ema.state_dict(),
                "layers": {n: e.state_dict() for n, e in self._layer_ema.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self._layer_ema) - set(state["layers"])
        if missing:
            raise ValueError(f"state has no statistics for layers {sorted(missing)}")
        self._steps = int(state["steps"])
        self.ema.load_state_dict(state["ema"])
        for n, e in self._layer_ema.items():
            e.load_state_dict(state["layers"][n])


def _layer_stats(est: StepEstimate, ema: NoiseScaleEMA) -> LayerStats:
    return LayerStats(est.tr_sigma, est.g2, est.b_simple, est.defined, est.reason,
                      ema.tr_sigma, ema.g2, ema.b_simple)


def _batch_first(saved: Any, dim: int) -> Any:
    if isinstance(saved, torch.Tensor):
        return saved.movedim(dim, 0)
    if isinstance(saved, tuple):
        return tuple(_batch_first(x, dim) for x in saved)
    return saved


def _scaler_unscaled(scaler: torch.amp.GradScaler) -> bool:
    from torch.amp.grad_scaler import OptState

    return any(st.get("stage") == OptState.UNSCALED
               for st in scaler._per_optimizer_states.values())


def _refuse_training_batchnorm(name: str):
    def hook(module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            raise ContractError(
                f"{name} ({type(module).__name__}) is in training mode: batch statistics mix "
                "the examples, so per-example gradients are not defined; use eval mode, "
                "GroupNorm/LayerNorm, or detach the monitor")
    return hook


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
