"""The Hessian-weighted noise scale, measured online.

McCandlish et al. (2018) give the step size that minimises the expected second-order loss
after one SGD step at batch size ``B``::

    eta*(B) = eta_max / (1 + B_noise / B),
    eta_max = |G|^2 / (G^T H G),   B_noise = tr(H Sigma) / (G^T H G),

with ``G`` the true gradient, ``H`` the Hessian and ``Sigma`` the covariance of one example's
gradient (per-example loss units). :class:`CurvatureEstimator` measures the three quantities
from a batch, so ``eta*(B)`` follows from measurements alone
(:func:`gradstats.scaling.sgd_optimal_lr`).

Estimators (one batch split into independent halves ``A``, ``B`` of ``b_A``, ``b_B``
examples, or two independent batches; ``g_A``, ``g_B`` the halves' mean gradients,
``E g_A = E g_B = G``, ``Cov g_A = Sigma / b_A``)::

    d = g_A - g_B                     E[d^T H d] = tr(H Sigma) (1/b_A + 1/b_B)
    tr(H Sigma)  ~  d^T H d / (1/b_A + 1/b_B)
    G^T H G      ~  g_A^T H g_B       (independent halves: no noise term)
    |G|^2        ~  g_A . g_B

all unbiased when ``H`` does not depend on the examples (a quadratic, or any model whose
curvature is measured on an independent ``hessian_batch``). The naive
``gbar^T H gbar`` (``gbar`` the whole batch's mean gradient) overestimates ``G^T H G`` by
``tr(H Sigma) / (b_A + b_B)``; it is reported as ``gHg_naive`` for comparison.

Which ``H``: by default the Hessian of the whole batch's mean loss. Where the per-example
Hessians vary with the examples and are correlated with the per-example gradients, using the
same examples for ``H`` and for ``g_A``, ``g_B`` adds an ``O(1/b)`` term (a third-moment
covariance, not the ``tr(H Sigma)/b`` term above); pass ``hessian_batch=`` (independent
examples, one more forward) to remove it.

Hessian-vector products come from :mod:`gradstats.hvp` (double backward, or central finite
differences where autograd cannot differentiate the backward pass). Side effects: none on the
model: ``.grad`` is never written, parameters are restored bit-exact, buffers changed by the
extra forwards (BatchNorm running statistics) are restored, and with ``monitor=`` every extra
forward and backward runs inside ``monitor.paused()``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .estimators import NoiseScaleEMA, StepEstimate
from .hvp import (_METHODS, _batch_size, _check_eps, _choice, _double_unsupported, _fill,
                  _hvp_finite, _hvp_from_grads, _params_list, _slice, finite_difference_eps,
                  hvp)
from .scaling import sgd_optimal_lr

__all__ = ["hvp", "finite_difference_eps", "CurvatureEstimator", "CurvatureResult"]


@dataclass(frozen=True)
class CurvatureResult:
    """One :meth:`CurvatureEstimator.update`, in per-example loss units.

    ``tr_h_sigma``, ``gHg`` and ``g2`` are this call's unbiased estimates of ``tr(H Sigma)``,
    ``G^T H G`` and ``|G|^2`` (each may be negative from noise; ``tr(H Sigma)`` and
    ``G^T H G`` also where ``H`` is indefinite). ``b_noise = tr_h_sigma / gHg`` and
    ``eta_max = g2 / gHg`` are defined (``defined``) when ``gHg > 0``, else nan.
    The ``*_ema`` values are bias-corrected EMAs over calls (ratio of the EMAs for
    ``b_noise_ema`` and ``eta_max_ema``), with delta-method standard errors.
    """

    call: int
    """1-based: the number of :meth:`CurvatureEstimator.update` calls so far, this one included."""
    b_a: int
    b_b: int
    method: str
    tr_h_sigma: float
    gHg: float
    g2: float
    gHg_naive: float
    """``gbar^T H gbar`` of the whole batch: biased up by ``tr(H Sigma)/(b_a + b_b)``."""
    b_noise: float
    eta_max: float
    defined: bool
    reason: str | None
    tr_h_sigma_ema: float
    gHg_ema: float
    g2_ema: float
    b_noise_ema: float
    b_noise_stderr: float
    eta_max_ema: float
    eta_max_stderr: float


class CurvatureEstimator:
    """Online ``tr(H Sigma)``, ``G^T H G``, ``|G|^2``, hence ``B_noise`` and ``eta_max``
    (McCandlish et al. 2018), from two independent half-batch gradients (module docstring).

    Typical use, every ``n`` steps::

        est = CurvatureEstimator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                                 every=50, monitor=monitor)
        for step, batch in enumerate(loader):
            ...  # the training step
            est.maybe_update(step, batch)
        lr = est.optimal_lr(batch_size)   # eta_max / (1 + B_noise / B), from the EMAs

    Args:
        model: the model; its trainable parameters (or ``params``) define ``H`` and ``G``.
        loss_fn: ``loss_fn(model, batch) -> scalar``: the **mean** loss over the batch's
            examples (``reduction="sum"``: the sum; it is divided by the batch size).
        params: the parameters to measure over (default: all with ``requires_grad``).
        every: :meth:`maybe_update` measures when ``step % every == 0``.
        beta: EMA factor over calls (0: no smoothing).
        method: how Hessian-vector products are formed (see :func:`hvp`); ``"auto"`` tries
            double backward and, once it fails, uses finite differences from then on.
        eps: finite-difference step (default :func:`finite_difference_eps`).
        monitor: a :class:`gradstats.GradStatsMonitor`; the estimator's forwards and
            backwards run inside ``monitor.paused()`` so they are not counted.
        reduction: ``"mean"`` or ``"sum"``, what ``loss_fn`` returns.

    Cost per call: double backward: two forwards and two first-order backward passes with
    ``create_graph=True`` (three with ``hessian_batch``) plus two double-backward passes;
    finite differences: two forward/backward passes on the halves plus four on the whole
    batch (or ``hessian_batch``).
    """

    _STATE_VERSION = 1

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        *,
        params: Iterable[torch.Tensor] | None = None,
        every: int = 1,
        beta: float = 0.9,
        method: Literal["auto", "double", "finite"] = "auto",
        eps: float | None = None,
        monitor: Any = None,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(model, batch), got "
                             f"{type(loss_fn).__name__}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if monitor is not None and not callable(getattr(monitor, "paused", None)):
            raise ValueError(f"monitor must have a paused() context manager (a "
                             f"GradStatsMonitor), got {type(monitor).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError("model has no parameters with requires_grad")
        self.params = _params_list(params)
        self.every = int(every)
        self.method = _choice("method", method, _METHODS)
        self.eps = _check_eps(eps)
        self.monitor = monitor
        self.reduction = _choice("reduction", reduction, ("mean", "sum"))
        self.ema_noise = NoiseScaleEMA(beta)  # (tr(H Sigma), G^T H G): ratio = B_noise
        self.ema_lr = NoiseScaleEMA(beta)     # (|G|^2, G^T H G): ratio = eta_max
        self.calls = 0
        self.last: CurvatureResult | None = None
        self.fallback_reason: str | None = None
        """Why ``method="auto"`` switched to finite differences (the autograd error)."""
        self._use_finite = method == "finite"

    # ------------------------------------------------------------------------- reading
    @property
    def method_used(self) -> str:
        """``"double"`` or ``"finite"``: what the next call will use."""
        return "finite" if self._use_finite else "double"

    @property
    def b_noise(self) -> float:
        """Smoothed ``B_noise`` (ratio of the EMAs); nan before any call or when the
        ``G^T H G`` EMA is <= 0."""
        return self.ema_noise.b_simple

    @property
    def eta_max(self) -> float:
        """Smoothed ``eta_max = |G|^2 / (G^T H G)`` (ratio of the EMAs)."""
        return self.ema_lr.b_simple

    def optimal_lr(self, batch_size: float) -> float:
        """``eta*(B) = eta_max / (1 + B_noise / B)`` from the smoothed values
        (:func:`gradstats.scaling.sgd_optimal_lr`; its ValueError when they are not usable,
        e.g. ``eta_max <= 0`` or ``B_noise < 0``)."""
        return sgd_optimal_lr(self.eta_max, self.b_noise, batch_size)

    # ------------------------------------------------------------------------- updating
    def maybe_update(self, step: int, batch: Any, batch_b: Any = None, *,
                     hessian_batch: Any = None) -> CurvatureResult | None:
        """:meth:`update` when ``step % every == 0``, else None."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        if step % self.every:
            return None
        return self.update(batch, batch_b, hessian_batch=hessian_batch)

    def update(self, batch: Any, batch_b: Any = None, *,
               hessian_batch: Any = None) -> CurvatureResult:
        """Measure on ``batch`` (split into halves of ``n // 2`` and ``n - n // 2`` examples
        along dim 0, which assumes its examples are independent, e.g. a shuffled loader),
        or on the two independent batches ``batch`` and ``batch_b``. ``hessian_batch``
        (optional, independent examples) is where ``H`` is taken; default: ``batch`` (and
        ``batch_b``). A batch is a tensor or a (nested) tuple, list or dict of tensors,
        batch dim first; other leaves are passed to both halves unchanged.

        Non-finite losses or gradients give a result with nan values and
        ``reason="non-finite"``; the EMAs are then left alone.
        """
        if batch_b is None:
            n = _batch_size(batch, "batch")
            if n < 2:
                raise ValueError(f"batch has {n} example(s); at least 2 are needed to split it "
                                 "into two independent halves")
            b_a = n // 2
            b_b = n - b_a
            part_a, part_b = _slice(batch, slice(0, b_a)), _slice(batch, slice(b_a, n))
        else:
            part_a, part_b = batch, batch_b
            b_a, b_b = _batch_size(batch, "batch"), _batch_size(batch_b, "batch_b")
            for name, size in (("batch", b_a), ("batch_b", b_b)):
                if size < 1:
                    raise ValueError(f"{name} has no examples")
        b_h = None
        if hessian_batch is not None:
            b_h = _batch_size(hessian_batch, "hessian_batch")
            if b_h < 1:
                raise ValueError("hessian_batch has no examples")

        pause = self.monitor.paused() if self.monitor is not None else contextlib.nullcontext()
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            with pause, torch.enable_grad():
                vals, method = self._measure(part_a, part_b, b_a, b_b, hessian_batch, b_h)
        finally:
            with torch.no_grad():
                for buf, saved in buffers:
                    if buf.shape != saved.shape or not torch.equal(buf, saved):
                        buf.data = saved
        self.calls += 1
        return self._result(vals, method, b_a, b_b)

    def _loss(self, batch: Any, size: int) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        loss = loss.reshape(())
        return loss / size if self.reduction == "sum" else loss

    def _grads(self, loss: torch.Tensor, create_graph: bool):
        if not loss.requires_grad:
            return [None] * len(self.params)
        return list(torch.autograd.grad(loss, self.params, create_graph=create_graph,
                                        allow_unused=True))

    def _measure(self, part_a, part_b, b_a, b_b, hbatch, b_h):
        n = b_a + b_b
        w_a, w_b = b_a / n, b_b / n
        if not self._use_finite:
            try:
                return self._measure_double(part_a, part_b, w_a, w_b, hbatch, b_h, b_a, b_b), \
                    "double"
            except RuntimeError as err:
                if self.method == "double" or not _double_unsupported(err):
                    raise
                self._use_finite = True
                self.fallback_reason = str(err)
        return self._measure_finite(part_a, part_b, w_a, w_b, hbatch, b_h, b_a, b_b), "finite"

    def _measure_double(self, part_a, part_b, w_a, w_b, hbatch, b_h, b_a, b_b):
        own = hbatch is None
        ga = self._grads(self._loss(part_a, b_a), create_graph=own)
        gb = self._grads(self._loss(part_b, b_b), create_graph=own)
        if own:
            gh = [None if x is None and y is None else
                  (w_a * x if y is None else w_b * y if x is None else w_a * x + w_b * y)
                  for x, y in zip(ga, gb)]
        else:
            gh = self._grads(self._loss(hbatch, b_h), create_graph=True)
        ga, gb = _fill(ga, self.params), _fill(gb, self.params)
        h_ga = _hvp_from_grads(gh, self.params, ga, retain_graph=True)
        h_gb = _hvp_from_grads(gh, self.params, gb, retain_graph=False)
        return _dots(ga, gb, h_ga, h_gb)

    def _measure_finite(self, part_a, part_b, w_a, w_b, hbatch, b_h, b_a, b_b):
        ga = _fill(self._grads(self._loss(part_a, b_a), False), self.params)
        gb = _fill(self._grads(self._loss(part_b, b_b), False), self.params)
        if hbatch is None:
            def closure():
                return w_a * self._loss(part_a, b_a) + w_b * self._loss(part_b, b_b)
        else:
            def closure():
                return self._loss(hbatch, b_h)
        h_ga = _hvp_finite(closure, self.params, ga, self.eps)
        h_gb = _hvp_finite(closure, self.params, gb, self.eps)
        return _dots(ga, gb, h_ga, h_gb)

    def _result(self, vals: dict[str, float], method: str, b_a: int, b_b: int) -> CurvatureResult:
        n = b_a + b_b
        w_a, w_b = b_a / n, b_b / n
        tr = vals["dHd"] / (1.0 / b_a + 1.0 / b_b)
        ghg = vals["aHb"]
        g2 = vals["ab"]
        naive = w_a * w_a * vals["aHa"] + 2.0 * w_a * w_b * vals["aHb"] + w_b * w_b * vals["bHb"]
        finite = all(math.isfinite(x) for x in (tr, ghg, g2, naive))
        if not finite:
            reason = "non-finite"
        elif not ghg > 0.0:
            reason = "G^T H G estimate <= 0"
        else:
            reason = None
        defined = reason is None
        if finite:
            self.ema_noise.update(StepEstimate(n=n, tr_sigma=tr, g2=ghg, b_simple=math.nan,
                                               defined=defined, reason=reason))
            self.ema_lr.update(StepEstimate(n=n, tr_sigma=g2, g2=ghg, b_simple=math.nan,
                                            defined=defined, reason=reason))
        nan = math.nan
        res = CurvatureResult(
            call=self.calls, b_a=b_a, b_b=b_b, method=method,
            tr_h_sigma=tr if finite else nan, gHg=ghg if finite else nan,
            g2=g2 if finite else nan, gHg_naive=naive if finite else nan,
            b_noise=tr / ghg if defined else nan, eta_max=g2 / ghg if defined else nan,
            defined=defined, reason=reason,
            tr_h_sigma_ema=self.ema_noise.tr_sigma, gHg_ema=self.ema_noise.g2,
            g2_ema=self.ema_lr.tr_sigma,
            b_noise_ema=self.ema_noise.b_simple, b_noise_stderr=self.ema_noise.b_simple_stderr,
            eta_max_ema=self.ema_lr.b_simple, eta_max_stderr=self.ema_lr.b_simple_stderr,
        )
        self.last = res
        return res

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The EMAs, the call count and whether ``"auto"`` fell back to finite differences."""
        return {"version": self._STATE_VERSION, "calls": self.calls,
                "use_finite": self._use_finite, "fallback_reason": self.fallback_reason,
                "ema_noise": self.ema_noise.state_dict(), "ema_lr": self.ema_lr.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("version", "calls", "use_finite", "ema_noise", "ema_lr")
                   if k not in state]
        if missing:
            raise ValueError(f"state is missing keys {missing}")
        if state["version"] != self._STATE_VERSION:
            raise ValueError(f"state has unsupported version {state['version']!r}")
        self.ema_noise.load_state_dict(state["ema_noise"])
        self.ema_lr.load_state_dict(state["ema_lr"])
        self.calls = int(state["calls"])
        self._use_finite = bool(state["use_finite"]) or self.method == "finite"
        self.fallback_reason = state.get("fallback_reason")
        self.last = None

    def __repr__(self) -> str:
        return (f"CurvatureEstimator(every={self.every}, method={self.method!r} "
                f"[{self.method_used}], calls={self.calls}, b_noise={self.b_noise:.6g}, "
                f"eta_max={self.eta_max:.6g})")


def _dots(ga, gb, h_ga, h_gb) -> dict[str, float]:
    """The float64 inner products the estimates are built from (one host sync)."""

    def dot(xs, ys):
        return sum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double())
                   for x, y in zip(xs, ys))

    d = [a.double() - b.double() for a, b in zip(ga, gb)]
    hd = [a.double() - b.double() for a, b in zip(h_ga, h_gb)]
    vals = torch.stack([
        dot(d, hd),                                   # d^T H d
        0.5 * (dot(ga, h_gb) + dot(gb, h_ga)),        # g_A^T H g_B (symmetrised)
        dot(ga, gb),                                  # g_A . g_B
        dot(ga, h_ga),                                # g_A^T H g_A
        dot(gb, h_gb),                                # g_B^T H g_B
    ]).tolist()
    return dict(zip(("dHd", "aHb", "ab", "aHa", "bHb"), vals))
