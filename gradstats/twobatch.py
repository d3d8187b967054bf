"""The two-batch noise scale: small-batch against big-batch gradient norms, no per-example kernels.

McCandlish et al. (2018, App. A) estimate ``tr(Sigma)`` and ``|G|^2`` from the squared norms of
gradients averaged over batches of two sizes. Data parallelism hands both over for free: each
rank's local gradient is a small batch, the all-reduced one the big batch; with gradient
accumulation in one process each micro-batch is a small batch and the step's gradient the big one.

Derivation
----------
Examples are i.i.d.; ``g_i`` is an example's gradient (per-example loss units) with mean ``G`` and
covariance ``Sigma``. A *unit* ``u`` (a rank, or a micro-batch) holds a normalised gradient
``g_u = sum_{i in u} w_i g_i`` with ``sum w_i = 1``: ``E g_u = G``, ``Cov g_u = v_u Sigma`` with
``v_u = sum w_i^2`` (``1/b_u`` for a mean over ``b_u`` examples), so

    E|g_u|^2 = |G|^2 + v_u tr(Sigma).                                         (1)

Units hold disjoint examples, so they are independent, and the step's gradient is their weighted
mean ``G_big = sum_u W_u g_u`` (``sum W_u = 1``):

    E|G_big|^2 = |G|^2 + V tr(Sigma),      V = sum_u W_u^2 v_u.                (2)

With ``S = (1/U) sum_u |g_u|^2`` over the ``U`` units and ``vbar = (1/U) sum_u v_u``, (1) gives
``E S = |G|^2 + vbar tr(Sigma)``; subtracting (2),

    tr(Sigma) ~ (S - |G_big|^2) / (vbar - V),     |G|^2 ~ S - tr vbar  (= |G_big|^2 - tr V),

both exactly unbiased (linear in ``S`` and ``|G_big|^2`` with known coefficients), defined when
``vbar > V`` (two or more units). ``B_simple`` is their ratio, smoothed as separate EMAs
(:class:`~gradstats.estimators.NoiseScaleEMA`), as the monitor does.

*DDP.* Rank ``r`` takes the mean over its ``b_r`` examples (``v_r = 1/b_r``) and DDP averages the
``R`` ranks (``W_r = 1/R``): ``E|g_r|^2 = |G|^2 + tr/b_r`` and, for ``G_big = (1/R) sum_r g_r``,
``E|G_big|^2 = |G|^2 + tr (1/R^2) sum_r 1/b_r``, so

    tr = (mean_r |g_r|^2 - |G_big|^2) / ((1/R)(1 - 1/R) sum_r 1/b_r),
    |G|^2 = mean_r |g_r|^2 - tr mean_r(1/b_r)

(equal ``b_r = b``: McCandlish's formulas with ``B_small = b``, ``B_big = R b``). An empty rank
contributes a zero gradient but DDP still divides by the world size ``R_w``, so
``G_big = (R_w / R) p.grad`` with ``R`` the non-empty ranks, which alone are units.

*Loss units.* What autograd adds to ``.grad`` for micro-batch ``j`` is ``s_j g_j`` with
``s_j = 1`` (mean loss) or ``b_j`` (sum loss), times ``1/k`` when each of the ``k`` losses of the
step is divided by ``k``. A unit's ``g_u`` is its raw gradient over ``sum s_j``, ``W_u`` is
proportional to its ``sum s_j``, and a DDP rank that accumulated micro-batches under ``no_sync``
is one unit with ``v_r = sum_j (s_j / sum s)^2 / b_j``.

*Variance.* For Gaussian gradients and ``U`` equal units the estimate of ``tr`` is ``b`` times the
trace of the units' sample covariance: ``Var = 2 tr(Sigma^2) / (U - 1)``, against
``2 tr(Sigma^2) / (N - 1)`` for the per-example estimator over the same ``N`` examples
(:class:`~gradstats.GradStatsMonitor`): two ranks give one degree of freedom per step, so the
two-batch estimate needs the EMA, and many more steps, to say as much.

Where the numbers are read, and what they cost
----------------------------------------------
* **DDP**: a communication hook (``register_comm_hook``) adds ``|bucket|^2`` of each bucket's
  local gradient before the all-reduce (then calls the default or a given hook); one extra read of
  the gradient per step, nothing stored.
* **One process** (gradient accumulation) and **FSDP2**: a hook on each parameter's incoming
  gradient (``Tensor.register_hook``: autograd has summed the parameter's uses, not yet added the
  sum to ``.grad``) adds its squared norm: one read of each gradient while it is hot, no copy.
  Post-accumulate-grad hooks would see ``.grad`` with the earlier micro-batches in it and need a
  snapshot (a second copy of the gradients) to take the difference. Under ``fully_shard`` the
  hooks go on the *unsharded* parameters, which a forward pre-hook finds in place (FSDP2's own
  pre-hook runs first and unshards); the local gradient is exact there, whatever FSDP2's
  dtype-dependent pre-division of its reduce-scatter input.
* At :meth:`TwoBatchEstimator.step`: ``|p.grad|^2`` (the local shard's under FSDP2) and one
  all-reduce of 9 float64 values (72 bytes) for the per-rank sums; every rank then computes the
  same numbers from the same reduced values.

Call :meth:`TwoBatchEstimator.count` after each backward pass (micro-batch) with its number of
examples, and :meth:`TwoBatchEstimator.step` after the last one, before clipping, weight decay
into ``.grad`` or ``optimizer.step()``; zero the gradients after it.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn

from .estimators import NoiseScaleEMA, StepEstimate
from .stats import LayerStats

__all__ = ["TwoBatchEstimator", "TwoBatchStats", "two_batch_estimate"]

_FEW_UNITS = "fewer than two non-empty units (ranks or micro-batches) this step"
_NO_SPREAD = "the units' weights leave no spread between small and big batches"
_G2_REASON = "|G|^2 estimate <= 0"
# Packed per-rank sums of one step (one all-reduce): see TwoBatchEstimator._local_sums.
# The first three are device values, the rest host values.
_SUM_SQ, _BIG, _EMPTY_BAD, _SUM_V, _UNITS, _SUM_S, _SUM_S2V, _N, _ERRORS = range(9)


@dataclass(frozen=True)
class TwoBatchStats(LayerStats):
    """One step of the two-batch estimator, in per-example loss units: this step's unbiased
    estimates and the smoothed ones (the :class:`~gradstats.stats.LayerStats` fields; the
    error bar is :class:`~gradstats.estimators.NoiseScaleEMA`'s), and what they came from."""

    b_simple_stderr: float = math.nan
    b_simple_interval: tuple[float, float] = (math.nan, math.nan)
    step: int = 0
    n: int = 0
    """Examples in the step, all ranks."""
    units: int = 0
    """Non-empty units: ranks under DDP, (rank, micro-batch) pairs in one process or FSDP2."""
    small_sq: float = math.nan
    """``S = mean_u |g_u|^2``."""
    big_sq: float = math.nan
    """``|G_big|^2``, the step's gradient in per-example loss units."""
    b_small: float = math.nan
    """``1 / vbar``: the small batch size (the harmonic mean of unequal ones)."""
    b_big: float = math.nan
    """``1 / V``: the size of a mean batch as noisy as ``G_big``."""


def two_batch_estimate(small_sq: float, small_var: float, big_sq: float, big_var: float,
                       n: int, units: int) -> StepEstimate:
    """``tr = (S - |G_big|^2) / (vbar - V)`` and ``|G|^2 = S - tr vbar`` (module docstring).

    Args:
        small_sq: ``S``, the mean over the units of ``|g_u|^2``.
        small_var: ``vbar``, the mean over the units of ``v_u = sum_i w_i^2`` (``1/b_u``).
        big_sq: ``|G_big|^2`` for ``G_big = sum_u W_u g_u``.
        big_var: ``V = sum_u W_u^2 v_u``.
        n: examples in the step (reported; the EMA skips ``n == 1``).
        units: ``U``; fewer than two leave the estimate undefined (nan).
    """
    vals = {"small_sq": small_sq, "small_var": small_var, "big_sq": big_sq, "big_var": big_var}
    for name, x in vals.items():
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x < 0:
            raise ValueError(f"{name} must be a finite real >= 0, got {x!r}")
    for name, x in (("n", n), ("units", units)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
            raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    nan = math.nan
    why = _FEW_UNITS if units < 2 else _NO_SPREAD if not small_var > big_var else None
    if why is not None:
        return StepEstimate(n=int(n), tr_sigma=nan, g2=nan, b_simple=nan, defined=False,
                            reason=why)
    tr = (small_sq - big_sq) / (small_var - big_var)
    g2 = small_sq - tr * small_var
    if g2 > 0.0:
        return StepEstimate(n=int(n), tr_sigma=tr, g2=g2, b_simple=tr / g2, defined=True,
                            reason=None)
    return StepEstimate(n=int(n), tr_sigma=tr, g2=g2, b_simple=nan, defined=False,
                        reason=_G2_REASON)


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """``|t|^2`` as a 0-d float64 tensor on ``t``'s device (reduced in float32 or float64)."""
    if t.is_sparse:
        t = t.coalesce().values()
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(t, dtype=acc).double().square()


def _kind(model: nn.Module) -> Literal["local", "ddp", "fsdp2"]:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    if not dist.is_available():
        return "local"
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    mods = list(model.modules())
    if any(isinstance(m, FullyShardedDataParallel) for m in mods):
        raise TypeError("model is wrapped in FullyShardedDataParallel (FSDP1), which the "
                        "two-batch estimator does not support: shard it with "
                        "torch.distributed.fsdp.fully_shard (FSDP2), or use DDP")
    if any(isinstance(m, FSDPModule) for m in mods):
        return "fsdp2"
    return "local"


class TwoBatchEstimator:
    """``tr(Sigma)``, ``|G|^2`` and ``B_simple`` from small-batch against big-batch gradient
    norms: per-rank against all-reduced gradients under DDP or FSDP2, per-micro-batch against the
    step's gradient in one process (see the module docstring for the estimator and its cost).

    Args:
        model: a ``DistributedDataParallel`` model, a model sharded with ``fully_shard`` (FSDP2,
            1-D mesh), or a plain model trained with gradient accumulation in one process.
        loss_reduction: ``"mean"`` or ``"sum"`` over the examples of a micro-batch.
        accumulation: ``"mean"`` when each of the step's k micro-batch losses is divided by k
            before backward, ``"sum"`` when not.
        beta: EMA factor of the smoothed statistics.
        process_group: DDP: the group of the gradient all-reduce (default: the DDP model's).
        comm_hook: DDP: the communication hook to run after taking the local norms (default
            ``allreduce_hook``, which is what DDP does without one); ``comm_state`` its state
            (default: the process group).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_reduction: Literal["mean", "sum"] = "mean",
        accumulation: Literal["mean", "sum"] = "mean",
        beta: float = 0.99,
        process_group: Any = None,
        comm_hook: Callable[[Any, Any], torch.futures.Future] | None = None,
        comm_state: Any = None,
    ) -> None:
        for name, v in (("loss_reduction", loss_reduction), ("accumulation", accumulation)):
            if v not in ("mean", "sum"):
                raise ValueError(f"{name} must be 'mean' or 'sum', got {v!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.kind = _kind(model)
        self.model = model.module if self.kind == "ddp" else model
        self.loss_reduction, self.accumulation = loss_reduction, accumulation
        self.ema = NoiseScaleEMA(beta)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no parameter with requires_grad=True")
        self._device = params[0].device
        self._group: Any = None
        self._world = 1
        self._handles: list[Any] = []
        self._hooked: dict[int, weakref.ref] = {}
        self._covered: set[tuple[int, str]] = set()
        self._attached = True
        self._paused = 0
        self._steps = 0
        if self.kind == "ddp":
            self._attach_ddp(model, process_group, comm_hook, comm_state)
        elif self.kind == "fsdp2":
            self._attach_fsdp2(params)
        else:
            self._attach_local()
        self._reset()

    # ----------------------------------------------------------------------------- set-up
    def _attach_ddp(self, ddp: nn.Module, group: Any, hook: Callable | None, state: Any) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self._group = group if group is not None else ddp.process_group
        self._world = dist.get_world_size(self._group)
        inner = hook if hook is not None else default_hooks.allreduce_hook
        inner_state = state if state is not None else self._group

        # No annotations: DDP compares them with dist.GradBucket, and here they are strings.
        def comm_hook(_, bucket):  # type: ignore[no-untyped-def]
            if self._attached and not self._paused:
                self._cur += _sq_norm(bucket.buffer())  # local gradient, before averaging
                self._fired = True
            return inner(inner_state, bucket)

        try:
            ddp.register_comm_hook(None, comm_hook)
        except RuntimeError as e:
            raise RuntimeError(
                f"could not register the two-batch communication hook on the DDP model ({e}): "
                "DDP takes one hook, registered before the first backward; pass an existing "
                "hook as comm_hook= (and its state as comm_state=) so that it runs inside ours"
            ) from e

    def _attach_fsdp2(self, params: list[nn.Parameter]) -> None:
        from torch.distributed.tensor import DTensor

        plain = [n for n, p in self.model.named_parameters()
                 if p.requires_grad and not isinstance(p, DTensor)]
        if plain:
            raise ValueError(f"parameters {plain} are not sharded by fully_shard (ignored "
                             "parameters?): their .grad is not reduced, so the big-batch "
                             "gradient would be wrong; shard them or freeze them")
        mesh = params[0].device_mesh
        if mesh.ndim != 1:
            raise ValueError(f"fully_shard on a {mesh.ndim}-D mesh (HSDP) is not supported yet: "
                             "the estimator reads the gradient of a 1-D data-parallel mesh")
        self._group = mesh.get_group()
        self._world = dist.get_world_size(self._group)
        if mesh.device_type != "cpu":
            self._device = torch.device(mesh.device_type, torch.get_device_module(
                mesh.device_type).current_device())
        for m in self.model.modules():
            if any(True for _ in m.parameters(recurse=False)):
                self._handles.append(m.register_forward_pre_hook(self._on_forward))

    def _on_forward(self, module: nn.Module, _: Any) -> None:
        """FSDP2 has unsharded the module's parameters: hook the ones not hooked yet."""
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                self._hook(p)
                self._covered.add((id(module), name))

    def _attach_local(self) -> None:
        for p in self.model.parameters():
            if p.requires_grad:
                self._hook(p)

    def _hook(self, p: torch.Tensor) -> None:
        ref = self._hooked.get(id(p))
        if ref is not None and ref() is p:
            return
        self._hooked[id(p)] = weakref.ref(p)
        self._handles.append(p.register_hook(self._on_grad))

    def _on_grad(self, grad: torch.Tensor) -> None:
        if self._attached and not self._paused:
            self._cur += _sq_norm(grad).to(self._cur.device)
            self._fired = True

    def _reset(self) -> None:
        self._cur = torch.zeros((), dtype=torch.float64, device=self._device)
        self._fired = False
        self._units: list[tuple[int, torch.Tensor | None, bool]] = []
        self._errors: list[str] = []

    # ----------------------------------------------------------------------------- API
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Backward passes inside are not counted (penalties, Hessian-vector products)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def count(self, batch_size: int) -> None:
        """Closes a micro-batch: call after each backward pass with its number of examples."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
                or batch_size < 0:
            raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
        self._check_attached()
        b = int(batch_size)
        if self.kind == "ddp":
            self._units.append((b, None, self._fired))
        else:
            if b > 0 and not self._fired:
                self._fail(f"count({b}) with no backward pass reaching the parameters since the "
                           "last count(): call count() after each micro-batch's backward")
            self._units.append((b, self._cur, self._fired))
            self._cur = torch.zeros((), dtype=torch.float64, device=self._device)
        self._fired = False

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this TwoBatchEstimator was detached: build a new one (and "
                               "load_state_dict() to keep the smoothed statistics)")

    def _fail(self, message: str) -> None:
        """In one process raise now; across ranks defer to the step's all-reduce, so that every
        rank raises together instead of the others waiting in a collective."""
        if self._world == 1:
            raise RuntimeError(message)
        self._errors.append(message)

    def step(self, batch_size: int | None = None) -> TwoBatchStats:
        """This step's statistics (``batch_size``: count one last micro-batch first); resets."""
        self._check_attached()
        try:
            if batch_size is not None:
                self.count(batch_size)
            return self._step()
        finally:
            self._reset()
            self._steps += 1

    def _step(self) -> TwoBatchStats:
        packed = self._local_sums()
        if self._world > 1:
            dist.all_reduce(packed, group=self._group)
        h = packed.cpu().tolist()
        if h[_ERRORS] > 0:
            raise RuntimeError("; ".join(self._errors) if self._errors else
                               f"{int(h[_ERRORS])} error(s) on other ranks this step (their "
                               "messages say which)")
        if not all(math.isfinite(x) for x in h):
            raise ValueError("non-finite gradient norms this step (overflow or nan gradients)")
        if h[_EMPTY_BAD] > 0:
            raise ValueError("a micro-batch or rank counted with batch_size=0 put a nonzero "
                             "gradient into .grad: an empty batch must contribute zero (use "
                             "loss = model(x).sum() * 0 or a sum over its examples)")
        units, n = int(round(h[_UNITS])), int(round(h[_N]))
        sum_s = h[_SUM_S]
        if units == 0 or sum_s <= 0:
            est = StepEstimate(n=n, tr_sigma=math.nan, g2=math.nan, b_simple=math.nan,
                               defined=False, reason=_FEW_UNITS)
            small_sq = small_var = big_sq = big_var = math.nan
        else:
            # G_big = F p.grad / sum_u s_u: F undoes DDP's and FSDP's division by the world size
            f = self._world / sum_s
            small_sq, small_var = h[_SUM_SQ] / units, h[_SUM_V] / units
            big_sq, big_var = h[_BIG] * f * f, h[_SUM_S2V] / (sum_s * sum_s)
            est = two_batch_estimate(small_sq, small_var, big_sq, big_var, n, units)
        self.ema.update(est)
        ema = self.ema
        return TwoBatchStats(
            tr_sigma=est.tr_sigma, g2=est.g2, b_simple=est.b_simple, defined=est.defined,
            reason=est.reason, tr_sigma_ema=ema.tr_sigma, g2_ema=ema.g2, b_simple_ema=ema.b_simple,
            b_simple_stderr=ema.b_simple_stderr, b_simple_interval=ema.interval(),
            step=self._steps + 1, n=n, units=units, small_sq=small_sq, big_sq=big_sq,
            b_small=1.0 / small_var if small_var > 0 else math.nan,
            b_big=1.0 / big_var if big_var > 0 else math.nan)

    # ----------------------------------------------------------------------------- the sums
    def _scales(self) -> list[float]:
        """``s_j`` of this rank's micro-batches: what autograd scaled ``g_j`` by."""
        k = len(self._units)
        acc = 1.0 / k if self.accumulation == "mean" else 1.0
        return [(1.0 if self.loss_reduction == "mean" else float(b)) * acc
                for b, _, _ in self._units]

    def _local_sums(self) -> torch.Tensor:
        """This rank's [sum_u |g_u|^2, its part of |p.grad|^2, |gradient of empty units|^2,
        sum_u v_u, U, sum_u s_u, sum_u s_u^2 v_u, examples, errors]."""
        if self._fired:
            self._fail("a backward pass ran after the last count(): call count(batch_size) "
                       "after each backward pass, then step()")
        if not self._units:
            self._fail("step() with no count(batch_size) since the last step: call count() "
                       "after each backward pass (or step(batch_size) after a single one)")
        self._check_coverage()
        sizes, s = [b for b, _, _ in self._units], self._scales()
        zero = torch.zeros((), dtype=torch.float64, device=self._device)
        sum_sq, empty_bad = zero, zero
        sum_v = units = sum_s = sum_s2v = 0.0
        if self.kind == "ddp":
            synced = [fired for _, _, fired in self._units]
            if synced and not synced[-1]:
                self._fail("DDP did not synchronise gradients in the step's last backward pass "
                           "(all of them ran under no_sync()?): run the last one outside "
                           "no_sync()")
            if any(synced[:-1]):
                self._fail("DDP synchronised gradients in a backward pass before the step's "
                           "last: the later buckets then mix in other ranks' gradients; run all "
                           "micro-batches but the last under ddp_model.no_sync()")
            tot = sum(sj for sj, b in zip(s, sizes) if b > 0)
            if tot > 0:  # one unit: this rank's accumulated gradient, over sum_j s_j
                v = sum((sj / tot) ** 2 / b for sj, b in zip(s, sizes) if b > 0)
                sum_sq = self._cur / (tot * tot)
                sum_v, units, sum_s, sum_s2v = v, 1.0, tot, tot * tot * v
            else:
                empty_bad = self._cur
        else:
            raws = [raw for _, raw, _ in self._units]
            if raws:
                raw = torch.stack(raws)
                coef = [1.0 / (sj * sj) if b > 0 else 0.0 for sj, b in zip(s, sizes)]
                sum_sq = raw @ torch.tensor(coef, dtype=torch.float64, device=self._device)
                empty = [0.0 if b > 0 else 1.0 for b in sizes]
                empty_bad = raw @ torch.tensor(empty, dtype=torch.float64, device=self._device)
            for sj, b in zip(s, sizes):
                if b > 0:
                    sum_v += 1 / b
                    units += 1
                    sum_s += sj
                    sum_s2v += sj * sj / b
        dev = torch.stack([sum_sq, self._grad_sq(), empty_bad])
        host = torch.tensor([sum_v, units, sum_s, sum_s2v, float(sum(sizes)),
                             float(len(self._errors))], dtype=torch.float64)
        return torch.cat([dev, host.to(self._device)])

    def _grad_sq(self) -> torch.Tensor:
        """This rank's part of ``|p.grad|^2``: all of it (one process), ``1/world`` of the
        replicated DDP gradient, the local shard's under FSDP2."""
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if self.kind == "fsdp2":
            grads = [g.to_local() for g in grads]
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self._device)
        total = torch.nn.utils.get_total_norm(grads).double().square().to(self._device)
        return total / self._world if self.kind == "ddp" else total

    def _check_coverage(self) -> None:
        if self.kind == "local":
            new = [n for n, p in self.model.named_parameters()
                   if p.requires_grad and (id(p) not in self._hooked
                                           or self._hooked[id(p)]() is not p)]
            if new:
                self._attach_local()
                self._fail(f"parameters {new} became trainable after the estimator was built: "
                           "this step's small-batch norms leave them out (hooked from now on)")
        elif self.kind == "fsdp2":
            missed = [f"{mn}.{n}" if mn else n for mn, m in self.model.named_modules()
                      for n, p in m.named_parameters(recurse=False)
                      if p.requires_grad and p.grad is not None and (id(m), n) not in self._covered]
            if missed:
                self._fail(f"parameters {missed} got gradients but were never seen unsharded in "
                           "their module's forward (used outside it?): their local gradients "
                           "are not counted")

    # ----------------------------------------------------------------------------- lifecycle
    def detach(self) -> None:
        """Removes the hooks (a DDP communication hook cannot be removed: it passes through)."""
        self._attached = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()

    def __enter__(self) -> TwoBatchEstimator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def state_dict(self) -> dict:
        """The smoothed statistics and the step count (plain Python values)."""
        return {"version": 1, "steps": self._steps, "ema": self.ema.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        """Restores :meth:`state_dict` (bit-identical continuation)."""
        if not isinstance(d, dict) or d.get("version") != 1 or "ema" not in d or "steps" not in d:
            raise ValueError("d must be a TwoBatchEstimator.state_dict() (version 1)")
        self.ema.load_state_dict(d["ema"])
        self._steps = int(d["steps"])
