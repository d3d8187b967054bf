"""GradStatsMonitor: per-layer and whole-model gradient noise during real training.

Units (ARCHITECTURE.md, "The units contract"): autograd propagates ``u_i = c_i g_i`` for example
``i``, with ``c_i`` = loss scale x the reduction factor of its micro-batch (``1/b`` for a mean
over ``b`` examples, ``1/n_tokens`` for a token mean, 1 for a sum) x (``1/k`` when each of k
micro-batch losses was divided by k). ``p.grad = sum_i u_i`` (divided by the world size under
DDP). Each step's statistics are formed in per-example loss units (``g_i = u_i / c_i``), with the
weighted-mean estimator of :func:`~gradstats.estimators.step_estimate` where the ``c_i`` differ.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from torch import nn

from . import contract, ops, traced
from .accumulators import Accumulators, Packing
from .contract import ContractError, ProbeSchedule
from .estimators import NoiseScaleEMA, _estimate
from .hooks import Forward, Hooks
from .layers import StructureWatch, discover, trainable
from .provenance import find_batch, tensor_leaves
from .rules.base import PROBES
from .stats import LayerStats, LayerTable, StepStats
from .units import LossUnits

__all__ = ["GradStatsMonitor", "StepStats", "LayerStats", "ContractError"]


class GradStatsMonitor:
    """Collects per-example squared gradient norms during backward and turns them into the
    gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` at every optimizer step.

    Call :meth:`step` after the backward pass(es) of a step and before clipping, weight decay
    that writes into ``.grad``, or ``optimizer.step()``; zero the gradients after it.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is unwrapped).
        mode: ``"fused"`` (the default: nn.Linear layers run a backward that computes dW and
            the norms in one op, the rest use hooks) or ``"hooks"`` (a forward hook and an
            output-gradient hook on every layer: the layers' own forward and backward run
            unchanged).
        loss_reduction: ``"mean"`` or ``"sum"`` over the examples of a micro-batch, or
            ``"token_mean"``: a mean over the valid tokens of the micro-batch, each example's loss
            being the sum over its tokens (Hugging Face's ``labels=`` loss); the counts come from
            ``token_counts``.
        accumulation: ``"mean"`` when each of the k micro-batch losses of a step is divided by
            k before backward, ``"sum"`` when not.
        scaler: the ``torch.amp.GradScaler`` in use, if any; its scale is divided out.
        unsupported: parameters without a layer rule are covered at the function level
            (``"error"``, the default: a use the function level cannot take raises, naming it);
            ``"fallback"`` runs a torch.func rule on their modules instead; ``"warn"`` and
            ``"ignore"`` leave them out of every statistic.
        beta: EMA factor of the smoothed statistics.
        dataset_size: examples in the data set, for the without-replacement correction.
        batch_dim: the batch dim of the root inputs (1 for sequence-first inputs).
        check_contract: verify ``p.grad = sum_i u_i`` with the probe (see
            :mod:`gradstats.contract`); False keeps only the version check.
        probe_every: after ``probe_warmup`` probed steps, probe every this many measured steps
            (and after any configuration change).
        measure_every: compute statistics every this many steps; in between the hooks do
            nothing and :meth:`step` returns an unmeasured record.
        linear_strategy: the Linear route: ``"auto"`` (cost model), ``"outer"``, ``"gram"``,
            ``"direct"``.
        token_counts: for ``loss_reduction="token_mean"``, ``f(args, kwargs) -> int | Tensor``,
            the valid tokens of a micro-batch from the root call's arguments; by default the
            ``labels`` argument's entries other than -100 (shifted by one position for
            ``*ForCausalLM`` models, as their loss does).
        process_group: for DDP, the group whose ranks share the statistics.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: Literal["hooks", "fused"] = "fused",
        loss_reduction: Literal["mean", "sum", "token_mean"] = "mean",
        accumulation: Literal["mean", "sum"] = "mean",
        scaler: torch.amp.GradScaler | None = None,
        unsupported: Literal["error", "warn", "ignore", "fallback"] = "error",
        beta: float = 0.99,
        dataset_size: int | None = None,
        batch_dim: int = 0,
        check_contract: bool = True,
        probe_every: int = 50,
        probe_warmup: int = 3,
        measure_every: int = 1,
        linear_strategy: Literal["auto", "outer", "gram", "direct"] = "auto",
        token_counts: Callable[[tuple, dict], Any] | None = None,
        process_group: Any = None,
        seed: int = 0,
    ) -> None:
        _choice("mode", mode, ("hooks", "fused"))
        _choice("unsupported", unsupported, ("error", "warn", "ignore", "fallback"))
        _choice("linear_strategy", linear_strategy, ops.STRATEGIES)
        for name, v, lo in (("probe_every", probe_every, 0), ("probe_warmup", probe_warmup, 0),
                            ("measure_every", measure_every, 1), ("batch_dim", batch_dim, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if dataset_size is not None and (not isinstance(dataset_size, int) or dataset_size < 2):
            raise ValueError(f"dataset_size must be an int >= 2, got {dataset_size!r}")
        if isinstance(model, GradStatsMonitor):
            raise TypeError("model must be an nn.Module, got a GradStatsMonitor")
        self._ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.model = model.module if self._ddp else model
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.mode, self.batch_dim, self.dataset_size = mode, batch_dim, dataset_size
        self.check_contract, self.process_group = check_contract, process_group
        self.measure_every = measure_every
        self.units = LossUnits(self.model, loss_reduction, accumulation, scaler, token_counts)
        self.schedule = ProbeSchedule(warmup=probe_warmup, every=probe_every)
        self._unsupported, self._seed, self._strategy = unsupported, seed, linear_strategy
        self.ema = NoiseScaleEMA(beta)
        self._beta = beta
        self._steps = 0        # step() calls
        self._measured = 0     # measured steps (the probe schedule counts these)
        self._fid = 0
        self._views: list | None = None
        self._versions: dict[int, tuple[weakref.ref, int]] = {}
        self._signature: dict[int, tuple[bool, int]] = {}
        self._last_probe: dict[int, list[float]] = {}
        self._build()

    # ----------------------------------------------------------------------------- set-up
    def _build(self) -> None:
        self.coverage = discover(self.model, fallback=self._unsupported == "fallback",
                                 functional=self._unsupported in ("error", "fallback"),
                                 seed=self._seed)
        if self.coverage.uncovered:
            msg = (f"no gradstats rule for {', '.join(self.coverage.uncovered)}: left out of "
                   "every statistic (unsupported='ignore')")
            if self._unsupported == "warn":
                warnings.warn(msg, stacklevel=3)
        if self.batch_dim:
            for layer in self.coverage.layers.values():
                if not layer.rule.batch_dim_movable:
                    raise ValueError(f"batch_dim={self.batch_dim} is not supported for "
                                     f"{layer.name} ({type(layer.module).__name__}), whose "
                                     "batch dim is fixed")
        self._params = self.coverage.params
        self._trainable = trainable(self.model)
        self._structure = StructureWatch(self.model)
        self._layer_ema = {n: NoiseScaleEMA(self._beta) for n in self.coverage.layer_names}
        self._layer_index = np.array([self.coverage.layer_names.index(p.layer)
                                      for p in self._params])
        device = self._params[0].param.device
        self.acc = Accumulators(len(self._params), device)
        self.hooks = Hooks(self.model, self.coverage, self.acc, mode=self.mode,
                           batch_dim=self.batch_dim, strategy=self._strategy,
                           begin_forward=self._begin_forward, note_dtype=self.units.note_dtype)
        self.hooks.units = self.units
        self._sharded = any(type(p.param) is not nn.Parameter and type(p.param) is not
                            torch.Tensor and hasattr(p.param, "device_mesh")
                            for p in self._params)
        self._bn_handles = [m.register_forward_pre_hook(_refuse_training_batchnorm(n))
                            for n, m in self.model.named_modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._prepare_step()

    def _begin_forward(self, args: tuple, kwargs: dict) -> Forward | None:
        B = find_batch(args, kwargs, self.batch_dim)
        if B is None:
            return None
        if self._views is not None:
            if self._views[0] is not None:
                first = self._views[0]
                if first.batch != B:
                    raise ContractError(f"monitor.same_examples(): a forward of {B} examples after "
                                        f"one of {first.batch}; views must hold the same examples")
                return first
            self._views[0] = None
        self._fid += 1
        rows = self.acc.begin_forward(B, self.units.reduction(args, kwargs, B))
        self.units.on_forward()
        fwd = Forward(self._fid, rows, B)
        self._forwards.append(fwd)
        if self._views is not None:
            self._views[0] = fwd
        return fwd

    def detach(self) -> None:
        """Removes every hook and restores the layers' own forward."""
        self.hooks.detach()
        for h in self._bn_handles:
            h.remove()
        self._bn_handles = []
        self.units.detach()

    def __enter__(self) -> GradStatsMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    @contextlib.contextmanager
    def same_examples(self) -> Iterator[None]:
        """Forwards inside this block see the same examples (augmented views, a consistency
        loss): each example's gradient is the sum over its views, so the norms get the cross
        terms between views instead of counting the views as independent examples.

        Example: ``with monitor.same_examples(): z1, z2 = model(x1), model(x2)``, then one
        loss over both and ``backward()``. The views must be separate forwards of equal batch
        size, in the same example order."""
        if self._views is not None:
            raise RuntimeError("monitor.same_examples() blocks do not nest")
        self._views = [None]
        plan, self.hooks.plan = self.hooks.plan, "learning"  # the compiled path has no views
        self.hooks.no_fast, self.hooks.fast = "monitor.same_examples()", False
        try:
            yield
        finally:
            self._views = None
            self.hooks.plan = plan

    def check_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Reads the loss's autograd graph before ``backward()`` and, at :meth:`step`, checks it
        against the declared units: the reduction over the batch (``loss_reduction``), the
        division by the micro-batch count (``accumulation``), and a GradScaler's scale.
        Returns ``loss``: ``monitor.check_loss(loss).backward()``."""
        from .units import ScalerWatch, inspect_loss

        batch = self._forwards[-1].batch if self._forwards else None
        scalers = [s for s in (self.units.scaler, ScalerWatch._last() if ScalerWatch._last
                               else None) if s is not None]
        self.units.forms.append(inspect_loss(loss, batch, scalers))
        return loss

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Backward passes inside this block (penalties, Hessian-vector products) and forwards
        run in it are not counted."""
        self.hooks.paused += 1
        try:
            yield
        finally:
            self.hooks.paused -= 1

    # ----------------------------------------------------------------------------- step
    def _prepare_step(self) -> None:
        """Decides before the next step's forwards whether they are measured and probed."""
        measured = self._steps % self.measure_every == 0
        self.hooks.measuring = measured
        full = measured and self.schedule.due(self._measured)
        self._probing = full and self.check_contract
        self.hooks.probing = self._probing
        # between schedule steps a learned layout takes the fast path (gradstats.traced)
        self.hooks.fast = (measured and not full and self.hooks.plan == "ready"
                           and self.hooks.no_fast is None and self._views is None)
        self._forwards: list[Forward] = []

    def _world_size(self) -> int:
        """Ranks whose gradients the data-parallel wrapper averages (DDP, FSDP2, HSDP)."""
        if ((self._ddp or self._sharded or self.process_group is not None)
                and torch.distributed.is_initialized()):
            return torch.distributed.get_world_size(self.process_group)
        return 1

    def step(self) -> StepStats:
        """Statistics of the step whose backward pass(es) just ran; resets for the next step."""
        try:
            return self._step()
        finally:
            self.hooks.reset()
            n, _, overflow = self.acc.totals()
            self.acc.reset(grow_to=2 * n if overflow else 0)
            self.units.end_step()
            self._steps += 1
            self._prepare_step()

    def _unmeasured(self, why: str, n: int = 0, skipped: bool = False) -> StepStats:
        nan = math.nan
        return StepStats(
            nan, nan, nan, False, why, self.ema.tr_sigma, self.ema.g2, self.ema.b_simple,
            step=self._steps + 1, n=n, measured=False, skipped=skipped, skip_reason=why,
            b_simple_stderr=self.ema.b_simple_stderr, b_simple_interval=self.ema.interval(),
            loss_scale=self.units.scale_value())

    def _step(self) -> StepStats:
        if not self.hooks.measuring:
            return self._unmeasured(f"not a measured step (measure_every={self.measure_every})")
        changed = self._coverage_changed()
        if changed is not None:
            return self._unmeasured(changed, skipped=True)
        self.hooks.flush()
        n_total, _, overflow = self.acc.totals()
        compiled = self._traced_forwards()
        if isinstance(compiled, str):
            return self._unmeasured(compiled, skipped=True)
        seen = [f for f in self._forwards if f.seen]
        if not compiled:
            traced.learn(self.hooks, seen, self._eligible_for_compile())
        if not seen and self._world_size() == 1:
            raise RuntimeError("step() called with no counted backward pass since the last step")
        self.units.check(len(seen))
        if overflow:
            self.schedule.force()
            return self._unmeasured(f"{n_total} examples overflowed the accumulators under "
                                    "torch.compile; they grow for the next step", skipped=True)
        return self._statistics(n_total, seen)

    def _eligible_for_compile(self) -> str | None:
        """Why the monitor's configuration cannot take the compiled path (None: it can)."""
        if self.units.scaler is not None:
            return "a GradScaler"
        if self.units.reduction_kind not in ("sum", "mean"):
            return f"loss_reduction={self.units.reduction_kind!r}"
        if self._ddp or self._sharded or self.process_group is not None:
            return "data-parallel or sharded training"
        return None

    def prepare_compile(self, *args: Any, **kwargs: Any) -> None:
        """Runs the model once eagerly on example inputs, forward and backward, so that the
        monitor learns the layout its compiled path needs (:mod:`gradstats.traced`) before the
        first compiled call: then ``torch.compile(model, fullgraph=True)`` traces with no graph
        break from the first step. ``.grad`` is left as it was and no statistics are recorded.
        Without it, the first compiled step runs the eager path (graph breaks) and the next ones
        recompile into the traced path once. Raises ValueError, naming the reason, for a model
        or configuration the compiled path does not cover."""
        if self.hooks.plan == "ready":
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        measuring = self.hooks.measuring
        try:
            for p in params:
                p.grad = None
            self.hooks.measuring = True
            with torch.enable_grad():
                out = self.model(*args, **kwargs)
            leaves = [t for t in tensor_leaves(out) if t.requires_grad and t.is_floating_point()]
            if not leaves:
                raise ValueError("prepare_compile: the model's output has no tensor that needs a "
                                 "gradient")
            sum(t.float().sum() for t in leaves).backward()
            self.hooks.flush()
            why = traced.learn(self.hooks, [f for f in self._forwards if f.seen],
                               self._eligible_for_compile())
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            self.hooks.measuring = measuring
            self.hooks.reset()
            self.acc.reset()
            self.units.end_step()
            self._forwards = []
        if why is not None:
            raise ValueError(f"prepare_compile: the compiled path does not cover this model "
                             f"({why}); torch.compile without fullgraph=True still works, with "
                             "graph breaks around the monitor's hooks")

    def _traced_forwards(self) -> bool | str:
        """Turns this step's compiled forwards (:mod:`gradstats.traced`) into forward records;
        False when there were none, a reason when their counts do not add up."""
        sizes, f, hits = self.acc.traced()
        if not sizes:
            return False
        fast = bool(self.acc.fast_sizes)
        if fast and self.hooks.spoiled is not None:
            return self.hooks.spoiled
        if self._forwards:
            return ("this step mixed eager and compiled forwards of the model; the monitor "
                    "measures steps whose forwards are all one or the other")
        if f > len(sizes):
            return (f"{f} compiled forwards in one step; the monitor keeps the sizes of at most "
                    f"{len(self.acc.dev_sizes)}")
        names = list(self.coverage.layers)
        off = [f"{names[i]} ({h})" for i, h in enumerate(hits) if h != f]
        if off:
            where = "on the fast path (now off)" if fast else "under torch.compile"
            if fast:
                self.hooks.no_fast = "a fast-path step's backward counts did not add up"
            return (f"{where} each of the step's {f} forwards must reach every covered layer's "
                    f"backward once, but these layers' backwards ran another number of times: "
                    f"{', '.join(off[:5])}. Run forwards whose backward never runs under "
                    "torch.no_grad(); backward passes that are not training steps do not belong "
                    "in a training step")
        start = 0
        for b in sizes:
            self._fid += 1
            fwd = Forward(self._fid, torch.arange(start, start + b, device=self.acc.device), b)
            fwd.seen = True
            self._forwards.append(fwd)
            start += b
        return True

    def _coverage_changed(self) -> str | None:
        """When the trainable parameters changed since the monitor was built (a layer unfrozen,
        a head replaced, a module added), re-attaches to the model as it is now and says so:
        this step's statistics would leave the new parameters out."""
        if not self._structure.maybe_changed():
            return None
        now = trainable(self.model)
        if now == self._trainable:
            self._structure = StructureWatch(self.model)
            return None
        added = [n for n, p in self.model.named_parameters() if id(p) in now - self._trainable]
        removed = len(self._trainable - now)
        state = self.state_dict()
        self.hooks.detach()
        for h in self._bn_handles:
            h.remove()
        self._build()
        self._restore_emas(state)
        self.schedule.force()
        why = ("the trainable parameters changed ("
               + (f"now trainable: {', '.join(added)}" if added else "")
               + (f"{'; ' if added else ''}{removed} no longer trainable" if removed else "")
               + "): this step is skipped; the monitor re-attached to the model as it is now")
        warnings.warn(why, stacklevel=4)
        return why

    def _statistics(self, n_total: int, seen: list[Forward]) -> StepStats:
        """``n_total`` columns were reserved by this step's forwards; the examples are those of
        the forwards a backward pass reached (a forward without backward counts nothing)."""
        P = self._params
        S = len(P)
        device = self.acc.device
        scale, unscaled_known = self.units.scale()
        sizes = tuple(f.batch for f in seen)
        self.schedule.note((sizes, scale))
        # example weights c_i (up to the world size): scale * reduction * 1/k
        k = len(seen) if self.units.accumulation == "mean" else 1
        r = self.acc.r
        if len(seen) < len(self._forwards):
            r = r.clone()
            for f in self._forwards:
                if not f.seen:
                    r[f.rows] = 0.0
        grads = [p.param.grad for p in P]
        anomaly = self._version_anomaly(grads)
        world = self._world_size()
        # the common step (one process, dense gradients, no probe): one op, one transfer
        fast = world == 1 and not self._probing and all(
            g is None or (type(g) is torch.Tensor and not g.is_sparse) for g in grads)
        red = ops.step_reduce(self.acc.E, r, n_total, scale / k,
                              [g if g is None or not g.requires_grad else g.detach()
                               for g in grads] if fast else [])
        if fast:
            flat = red.cpu().numpy()
            sums, C, Q = flat[:S], flat[2 * S], flat[2 * S + 1]
            grad_side = np.zeros((S, 1 + 2 * PROBES))
            grad_side[:, 0] = flat[S:2 * S]
            hook_probe = np.zeros((S, 2 * PROBES))
            per_example = torch.from_numpy(flat[2 * S + 2:].copy())
            n, anomalies, finite = sum(sizes), float(anomaly), bool(np.isfinite(flat).all())
        else:
            side = contract.grad_summaries(
                [None if g is None else g.detach() for g in grads], [p.probe_rows for p in P],
                [p.probe_xy()[0] for p in P], [p.probe_xy()[1] for p in P], self._probing,
                device)
            f64 = dict(dtype=torch.float64, device=device)
            # summed over ranks: the hooks' side; the same on every rank: the .grad side;
            # local: the per-example norms. One all-reduce, one transfer.
            packing = Packing(reduced=("sums", "hook_probe", "counts")
                              + (("grad_side",) if self._sharded else ()),
                              sums=red[:S], hook_probe=self.acc.P,
                              counts=torch.cat([torch.tensor([float(sum(sizes))], **f64),
                                                red[2 * S:2 * S + 2],
                                                torch.tensor([float(anomaly)], **f64)]),
                              grad_side=side, per_example=red[2 * S + 2:])
            if world > 1:
                torch.distributed.all_reduce(packing.reduced_view(), group=self.process_group)
            host = packing.to_host()
            per_example = torch.from_numpy(host["per_example"].copy())
            sums, hook_probe, grad_side = host["sums"], host["hook_probe"], host["grad_side"]
            n, C, Q, anomalies = host["counts"]
            n, finite = int(round(n)), packing.finite()
        if len(seen) < len(self._forwards):
            per_example = torch.cat([per_example[f.rows.cpu()] for f in seen])

        if not finite:
            bad = [p.qualname for i, p in enumerate(P)
                   if not (np.isfinite(hook_probe[i]).all() and np.isfinite(grad_side[i]).all()
                           and np.isfinite(sums[i]))]
            if self.units.scaler_enabled():
                self._measured += 1
                return self._unmeasured(f"non-finite gradients in {', '.join(bad)} (the "
                                        "GradScaler skips this step)", n, skipped=True)
            raise ContractError(f"non-finite gradient values in {', '.join(bad) or 'the model'}")
        if anomalies > 0 and not self._probing:
            self.schedule.force()
            self._remember_versions(grads)
            return self._unmeasured(
                "a covered .grad changed after backward in a way the counted backward passes do "
                "not explain (see gradstats.contract); the next step runs the full probe to "
                "name the cause", n, skipped=True)

        unscaled = unscaled_known
        if self._probing:
            unscaled = self._verify(hook_probe, grad_side, world, scale, unscaled_known)
        self._remember_versions(grads, learn=True)
        self._measured += 1

        # sum_i c_i g_i = F p.grad with the DDP average folded into c_i = c_loc / world
        F = scale if unscaled else 1.0
        C, Q = C / world, Q / world ** 2
        if n == 0 or C <= 0:
            return self._unmeasured("no examples this step", n)
        w2 = Q / (C * C)
        mean_sq = grad_side[:, 0] * (F / C) ** 2
        L = len(self.coverage.layer_names)
        layer_sum = np.bincount(self._layer_index, weights=sums, minlength=L)
        layer_mean = np.bincount(self._layer_index, weights=mean_sq, minlength=L)
        uniform = abs(w2 * n - 1.0) < 1e-12
        if self.dataset_size is not None and n > self.dataset_size:
            raise ValueError(f"dataset_size must be >= n (the batch is drawn without replacement "
                             f"from dataset_size examples), got dataset_size={self.dataset_size}, "
                             f"n={n}")
        layers = {}
        for i, name in enumerate(self.coverage.layer_names):
            est = self._estimate(layer_sum[i], layer_mean[i], n, None if uniform else w2)
            ema = self._layer_ema[name]
            ema.update(est)
            layers[name] = (est, (ema.tr_sigma, ema.g2, ema.b_simple))
        total = self._estimate(layer_sum.sum(), layer_mean.sum(), n, None if uniform else w2)
        self.ema.update(total)
        return StepStats(
            total.tr_sigma, total.g2, total.b_simple, total.defined, total.reason,
            self.ema.tr_sigma, self.ema.g2, self.ema.b_simple,
            step=self._steps + 1, n=n, verified=self._probing,
            per_example_sq_norms=per_example,
            b_simple_stderr=self.ema.b_simple_stderr, b_simple_interval=self.ema.interval(),
            loss_scale=scale, layers=LayerTable(layers))

    def _estimate(self, sum_sq: float, mean_sq: float, n: int, w2: float | None):
        # Rounding can push |gbar|^2 a hair above sum_i |g_i|^2 / n when every example agrees.
        # the monitor's own sums: finite (checked), >= 0 and within Cauchy-Schwarz (the cap)
        cap = sum_sq * (w2 if w2 is not None else 1.0 / n)
        return _estimate(float(sum_sq), float(min(mean_sq, cap) if n > 1 else mean_sq), n,
                         self.dataset_size, w2)

    # ----------------------------------------------------------------------------- contract
    def _version_anomaly(self, grads: list[torch.Tensor | None]) -> bool:
        """Whether some ``.grad``'s (identity, version) differs from what the learned pattern
        of this configuration predicts (see :mod:`gradstats.contract`)."""
        if len(self._forwards) != getattr(self, "_sig_config", None):
            return False  # a new micro-batch count: nothing learned yet (the probe will run)
        for p, g in zip(self._params, grads):
            if g is None:
                continue
            known = self._signature.get(p.slot)
            if known is not None and known != self._signature_of(p.slot, g):
                return True
        return False

    def _signature_of(self, slot: int, g: torch.Tensor) -> tuple[bool, int]:
        prev = self._versions.get(slot)
        same = prev is not None and prev[0]() is g
        return same, g._version - (prev[1] if same else 0)

    def _remember_versions(self, grads, learn: bool = False) -> None:
        config = len(self._forwards)  # backward passes per step set the version increments
        if learn and config != getattr(self, "_sig_config", None):
            self._signature.clear()
            self._sig_config = config
        for p, g in zip(self._params, grads):
            if g is None:
                self._versions.pop(p.slot, None)
                continue
            if learn:
                self._signature[p.slot] = self._signature_of(p.slot, g)
            self._versions[p.slot] = (weakref.ref(g), g._version)

    def _verify(self, hook_probe, grad_side, world: int, scale: float,
                unscaled_known: bool) -> bool:
        """Checks the probes of every parameter; returns whether ``.grad`` was already unscaled
        by the GradScaler."""
        eps_acc, eps_store = self.units.roundoff(self._params)

        def bad(unscaled: bool) -> list[int]:
            return contract.mismatches(hook_probe, grad_side, world * (scale if unscaled else 1.0),
                                       eps_acc, eps_store)

        found = bad(unscaled_known)
        unscaled = unscaled_known
        if found and scale != 1.0:
            other = bad(not unscaled_known)
            if len(other) < len(found):
                found, unscaled = other, not unscaled_known
        if found:
            f = world * (scale if unscaled else 1.0)
            names = [self._params[i].qualname for i in found]
            got = [[grad_side[i][1 + j] * f for j in range(PROBES)] for i in found]
            want = [[hook_probe[i][j] for j in range(PROBES)] for i in found]
            tol = [[contract.tolerance(hook_probe[i], grad_side[i], j, f, eps_acc[i], eps_store[i])
                    for j in range(PROBES)] for i in found]
            prev = [None if (q := self._last_probe.get(self._params[i].slot)) is None
                    else [v * f for v in q] for i in found]
            params = [[v * f for v in self._params[i].probe_of(self._params[i].param.detach())]
                      for i in found]
            raise ContractError(contract.diagnose(names, got, want, tol, prev, params))
        for p, gv in zip(self._params, grad_side):
            self._last_probe[p.slot] = list(gv[1:1 + PROBES])
        return unscaled

    # ----------------------------------------------------------------------------- state
    @property
    def layer_names(self) -> list[str]:
        """Names of the layers the statistics are reported for."""
        return list(self._layer_ema)

    @property
    def parameter_names(self) -> list[str]:
        """Qualified names of the parameters every statistic covers."""
        return [p.qualname for p in self._params]

    def state_dict(self) -> dict:
        """Smoothed statistics and the step count, to resume a run."""
        return {"steps": self._steps, "measured": self._measured, "ema": self.ema.state_dict(),
                "layers": {n: e.state_dict() for n, e in self._layer_ema.items()}}

    def _restore_emas(self, state: dict) -> None:
        """Smoothed statistics of the layers that still exist (after a coverage change)."""
        self.ema.load_state_dict(state["ema"])
        for n, e in self._layer_ema.items():
            if n in state["layers"]:
                e.load_state_dict(state["layers"][n])

    def load_state_dict(self, state: dict) -> None:
        missing = set(self._layer_ema) - set(state["layers"])
        if missing:
            raise ValueError(f"state has no statistics for layers {sorted(missing)}")
        self._steps = int(state["steps"])
        self._measured = int(state.get("measured", state["steps"]))
        self.ema.load_state_dict(state["ema"])
        for n, e in self._layer_ema.items():
            e.load_state_dict(state["layers"][n])
        self._prepare_step()


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
