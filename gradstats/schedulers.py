"""Learning-rate schedulers (``torch.optim.lr_scheduler`` compatible) and a batch-size controller.

* :class:`WarmupCosine`, :class:`WarmupConstant`: ``lr = base_lr * f(step)``, stepped in the
  chainable (ratio) form ``lr <- lr * f(t)/f(t-1)`` like torch's own chainable schedulers, so they
  compose in ``ChainedScheduler`` and with :class:`BatchSizeRuleLR` / :class:`BatchSizeController`;
  closed form ``base_lr * f(t)`` for ``SequentialLR`` milestones.
* :class:`AdaScaleLR`: progress ``tau`` advanced by the AdaScale gain (closed form, like LambdaLR).
* :class:`BatchSizeRuleLR`: multiplies the lr by ``lr_ratio(rule, B, B0)`` as ``B`` changes.
* :class:`BatchSizeController` + :class:`ControlledBatchSampler`: batch size from ``B_simple``,
  or for Adam from the measured sign-descent curve (:mod:`gradstats.adam`).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .scaling import LR_RULES, adam_b_noise2_from_sums, adam_plateau_batch_size, lr_ratio

__all__ = [
    "AdaScaleLR",
    "BatchSizeController",
    "BatchSizeRuleLR",
    "ControlledBatchSampler",
    "WarmupConstant",
    "WarmupCosine",
    "warmup_cosine_factor",
]


def _int_arg(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or int(v) != v or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def warmup_cosine_factor(
    step: float, warmup_steps: int, total_steps: int | None = None, min_lr_ratio: float = 0.0
) -> float:
    """``f(t) = (t+1)/W`` for ``t < W`` (never 0), then with ``p = min(1, (t-W)/(T-W))``
    ``f = m + (1-m)(1 + cos(pi p))/2`` (cosine to ``m = min_lr_ratio`` at ``t = T``, held after);
    ``total_steps=None`` keeps ``f = 1`` after warm-up. ``t`` may be fractional (AdaScale tau)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    if step < warmup_steps:
        return (step + 1.0) / warmup_steps
    if total_steps is None:
        return 1.0
    span = total_steps - warmup_steps
    p = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def _scale_lrs(optimizer: Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].mul_(factor)
        else:
            g["lr"] = g["lr"] * factor


def _current_lrs(optimizer: Optimizer) -> list:
    return [
        g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
        for g in optimizer.param_groups
    ]


class _FactorLR(LRScheduler):
    """``lr = base_lr * f(last_epoch)`` stepped as ``lr * f(t)/f(t-1)`` (chainable)."""

    def _f(self, t: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list:
        t = self.last_epoch
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        if t == 0:
            return [lr * self._f(0) for lr in lrs]
        prev = self._f(t - 1)
        if prev <= 0.0:  # only after a decay to exactly 0: nothing to take a ratio of
            return self._get_closed_form_lr()
        return [lr * (self._f(t) / prev) for lr in lrs]

    def _get_closed_form_lr(self) -> list:
        return [base * self._f(self.last_epoch) for base in self.base_lrs]


class WarmupCosine(_FactorLR):
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_lr_ratio * base_lr`` at
    ``total_steps``; ``f`` = :func:`warmup_cosine_factor`. One ``step()`` per optimizer step."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps = _int_arg("warmup_steps", warmup_steps, 0)
        self.total_steps = _int_arg("total_steps", total_steps, max(1, self.warmup_steps))
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.min_lr_ratio = float(min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def _f(self, t: int) -> float:
        return warmup_cosine_factor(t, self.warmup_steps, self.total_steps, self.min_lr_ratio)


class WarmupConstant(_FactorLR):
    """Linear warm-up over ``warmup_steps`` (``f = (t+1)/W``), then constant ``base_lr``."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, last_epoch: int = -1) -> None:
        self.warmup_steps = _int_arg("warmup_steps", warmup_steps, 0)
        super().__init__(optimizer, last_epoch)

    def _f(self, t: int) -> float:
        return warmup_cosine_factor(t, self.warmup_steps, None)


class AdaScaleLR(LRScheduler):
    """AdaScale (Johnson et al. 2020): progress ``tau`` advances by the gain ``r_t`` each step,
    ``tau_{t+1} = tau_t + r_t``, and ``lr_t = base_lr * r_t * lr_lambda(tau_t)``
    (``scale_lr_by_gain=False`` drops the factor ``r_t``).

    Call :meth:`set_gain` with this step's gain (e.g. :func:`gradstats.scaling.adascale_gain`)
    before ``optimizer.step()``; it applies at once. ``scheduler.step()`` then advances ``tau``
    by that gain; the gain is kept until set again. Closed form (overwrites the lr, like
    ``LambdaLR``): use it alone or inside ``SequentialLR`` (a milestone restarts ``tau`` at 0),
    not in ``ChainedScheduler``. ``state_dict`` holds ``tau`` and the gain.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Callable[[float], float] | None = None,
        scale_lr_by_gain: bool = True,
        last_epoch: int = -1,
    ) -> None:
        self.lr_lambda = lr_lambda if lr_lambda is not None else (lambda tau: 1.0)
        self.scale_lr_by_gain = bool(scale_lr_by_gain)
        self.tau = 0.0
        self.gain = 1.0
        super().__init__(optimizer, last_epoch)

    def set_gain(self, gain: float) -> None:
        """Set this step's gain ``r > 0`` (finite) and apply it to the optimizer's lr now."""
        r = float(gain)
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"gain must be finite and > 0, got {gain!r}")
        self.gain = r
        for g, lr in zip(self.optimizer.param_groups, self._lrs(), strict=True):
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        self._last_lr = _current_lrs(self.optimizer)

    def step(self, epoch: int | None = None) -> None:
        if epoch is not None:
            raise ValueError(
                "AdaScaleLR.step takes no epoch: its progress is tau, not the step count"
            )
        super().step()

    def _lrs(self) -> list[float]:
        s = self.lr_lambda(self.tau) * (self.gain if self.scale_lr_by_gain else 1.0)
        return [float(base) * s for base in self.base_lrs]

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0:
            self.tau = 0.0
        else:
            self.tau += self.gain
        return self._lrs()

    def state_dict(self) -> dict[str, Any]:
        sd = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambda")}
        fn = self.lr_lambda
        sd["lr_lambda"] = None if isinstance(fn, types.FunctionType) else fn.__dict__.copy()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        fn_state = sd.pop("lr_lambda", None)
        self.__dict__.update(sd)
        if fn_state is not None:
            self.lr_lambda.__dict__.update(fn_state)


class BatchSizeRuleLR(LRScheduler):
    """``lr = base_lr * lr_ratio(rule, B, base_batch_size)`` (see
    :func:`gradstats.scaling.lr_ratio`; ``base_lr`` is the lr tuned at ``base_batch_size``).

    :meth:`set_batch_size` multiplies the current lr by ``ratio_new / ratio_old`` at once, and
    ``step()`` leaves the lr alone, so it composes multiplicatively with chainable schedulers
    (:class:`WarmupCosine`, ``ChainedScheduler``). Rule parameters: ``b_noise`` for
    "sgd-optimal", ``kappa2`` (~ B_simple) for "adam-optimal", plus ``beta_noise`` for
    "adam-surge", ``kappa2`` and ``off_ratio`` for "adam-sign-descent" (the measured curve:
    ``**AdamNoiseResult.rule_params()``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        rule: str,
        base_batch_size: float,
        batch_size: float | None = None,
        *,
        b_noise: float | None = None,
        kappa2: float | None = None,
        beta_noise: float | None = None,
        off_ratio: float | None = None,
        last_epoch: int = -1,
    ) -> None:
        if rule not in LR_RULES:
            raise ValueError(f"rule must be one of {LR_RULES}, got {rule!r}")
        self.rule = rule
        self.base_batch_size = float(base_batch_size)
        self.batch_size = float(base_batch_size if batch_size is None else batch_size)
        self.params = {"b_noise": b_noise, "kappa2": kappa2, "beta_noise": beta_noise,
                       "off_ratio": off_ratio}
        self.ratio = lr_ratio(rule, self.batch_size, self.base_batch_size, **self.params)
        super().__init__(optimizer, last_epoch)

    def set_batch_size(
        self,
        batch_size: float,
        b_noise: float | None = None,
        kappa2: float | None = None,
        beta_noise: float | None = None,
        off_ratio: float | None = None,
    ) -> float:
        """Switch to ``batch_size`` (updating any rule parameter given); rescales the lr now.
        Returns the new ratio."""
        params = dict(self.params)
        for k, v in (("b_noise", b_noise), ("kappa2", kappa2), ("beta_noise", beta_noise),
                     ("off_ratio", off_ratio)):
            if v is not None:
                params[k] = v
        new = lr_ratio(self.rule, batch_size, self.base_batch_size, **params)
        _scale_lrs(self.optimizer, new / self.ratio)
        self.batch_size, self.params, self.ratio = float(batch_size), params, new
        self._last_lr = _current_lrs(self.optimizer)
        return new

    def get_lr(self) -> list:
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        return [lr * self.ratio for lr in lrs] if self.last_epoch == 0 else lrs

    def _get_closed_form_lr(self) -> list:
        return [base * self.ratio for base in self.base_lrs]


_TARGETS = ("b_simple", "adam-plateau", "adam-noise2")


def _real(v: Any) -> float:
    """``float(v)``, nan for what is not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


class BatchSizeController:
    """Batch size from the measured noise scale: ``B = clip(alpha * B_simple, b_min, cap)``
    rounded to a multiple of ``multiple`` (default ``micro_batch_size``), changed only when
    ``|B_new - B| / B > hysteresis``.

    * Call :meth:`update` once per optimizer step. nan, inf and non-positive measurements keep
      the current size.
    * Batch-size warm-up: ``cap = b_min + (b_max - b_min) min(1, n / warmup_steps)`` after the
      ``n``-th update (``cap = b_max`` when ``warmup_steps = 0``).
    * ``accumulation_steps = batch_size / micro_batch_size`` micro-batches per optimizer step.
    * With ``optimizer``, each change multiplies every group's lr by
      ``lr_ratio(lr_rule, B_new, base_batch_size) / lr_ratio(lr_rule, B_old, base_batch_size)``
      (the lr is tuned at ``base_batch_size``, default the initial size ``b_min``); this composes
      with chainable schedulers. "sgd-optimal" / "adam-*" use the latest ``B_simple`` as
      ``b_noise`` / ``kappa2`` unless fixed values are given (or ``kappa2`` is measured).
    * Adam (``target``, :mod:`gradstats.adam`): ``"adam-plateau"`` aims at ``alpha`` times the
      smallest ``B`` whose sign-descent optimal lr is within ``tol`` of its supremum
      (:func:`~gradstats.scaling.adam_plateau_batch_size`: ``B_peak`` at ``tol = 0`` when the
      curve peaks; past it a larger batch buys no larger step), ``"adam-noise2"`` at ``alpha *
      B_noise-2 = alpha pi kappa^2 / (2 (1 + off_ratio))``, sign descent's ``E_min/S_min``.
      Each :meth:`update` then takes the measured ``kappa2`` and ``off_ratio``
      (``**AdamNoiseResult.rule_params()``; fixed ones from the constructor, ``B_simple`` for a
      missing ``kappa2``). ``target="b_simple"`` (default) is the rule above.
    """

    def __init__(
        self,
        b_min: int,
        b_max: int,
        micro_batch_size: int,
        alpha: float = 1.0,
        multiple: int | None = None,
        hysteresis: float = 0.1,
        warmup_steps: int = 0,
        lr_rule: str = "linear",
        optimizer: Optimizer | None = None,
        base_batch_size: float | None = None,
        *,
        b_noise: float | None = None,
        kappa2: float | None = None,
        beta_noise: float | None = None,
        off_ratio: float | None = None,
        target: str = "b_simple",
        tol: float = 0.1,
    ) -> None:
        if target not in _TARGETS:
            raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
        if not 0.0 <= tol < 1.0:
            raise ValueError(f"tol must be in [0, 1), got {tol!r}")
        self.target, self.tol = target, float(tol)
        self.micro_batch_size = _int_arg("micro_batch_size", micro_batch_size, 1)
        self.multiple = _int_arg(
            "multiple", self.micro_batch_size if multiple is None else multiple, 1
        )
        if self.multiple % self.micro_batch_size:
            raise ValueError(
                f"multiple must be a multiple of micro_batch_size={micro_batch_size}, "
                f"got {multiple}"
            )
        if not (b_min > 0 and math.isfinite(b_min)):
            raise ValueError(f"b_min must be > 0, got {b_min!r}")
        if not (b_max >= b_min and math.isfinite(b_max)):
            raise ValueError(f"b_max must be finite and >= b_min={b_min}, got {b_max!r}")
        self.b_min, self.b_max = float(b_min), float(b_max)
        m = self.multiple
        self._lo = m * math.ceil(self.b_min / m)
        if m * math.floor(self.b_max / m) < self._lo:
            raise ValueError(f"no multiple of {m} lies in [b_min, b_max] = [{b_min}, {b_max}]")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be finite and > 0, got {alpha!r}")
        if not hysteresis >= 0:
            raise ValueError(f"hysteresis must be >= 0, got {hysteresis!r}")
        if lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule must be one of {LR_RULES}, got {lr_rule!r}")
        self.alpha, self.hysteresis, self.lr_rule = float(alpha), float(hysteresis), lr_rule
        self.warmup_steps = _int_arg("warmup_steps", warmup_steps, 0)
        self.optimizer = optimizer
        self.fixed = {"b_noise": b_noise, "kappa2": kappa2, "beta_noise": beta_noise,
                      "off_ratio": off_ratio}
        self.batch_size = self._lo
        self.base_batch_size = float(
            self.batch_size if base_batch_size is None else base_batch_size
        )
        if not self.base_batch_size > 0:
            raise ValueError(f"base_batch_size must be > 0, got {base_batch_size!r}")
        self.steps = 0
        self.last_b_simple: float | None = None
        self.last_kappa2: float | None = None
        self.last_off_ratio: float | None = None
        self.lr_ratio = 1.0
        if optimizer is not None:
            if self.base_batch_size != self.batch_size:
                self.lr_ratio = self._ratio(self.batch_size)  # may need a fixed rule parameter
            _scale_lrs(optimizer, self.lr_ratio)

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    def cap(self) -> float:
        """Largest batch size allowed now (the warm-up ramp)."""
        if self.warmup_steps == 0:
            return self.b_max
        return self.b_min + (self.b_max - self.b_min) * min(1.0, self.steps / self.warmup_steps)

    def ratio_for(self, b: float) -> float:
        """The learning-rate factor ``eta(b) / eta(base_batch_size)`` of the coupled rule at batch
        size ``b``, with the latest measurements (what the controller applies to an optimizer
        it owns; a trainer callback applies it itself)."""
        return self._ratio(b)

    def _ratio(self, b: float) -> float:
        p = dict(self.fixed)
        measured = {"b_noise": self.last_b_simple, "off_ratio": self.last_off_ratio,
                    "kappa2": self.last_b_simple if self.last_kappa2 is None
                    else self.last_kappa2}
        for k, v in measured.items():
            if p[k] is None:
                p[k] = v
        try:
            return lr_ratio(self.lr_rule, b, self.base_batch_size, **p)
        except ValueError as e:
            raise ValueError(f"lr_rule {self.lr_rule!r}: {e} (no measurement yet?)") from None

    def update(self, b_simple: float, *, kappa2: float | None = None,
               off_ratio: float | None = None) -> int:
        """Record one step's ``B_simple`` (and, for an Adam ``target``, the measured ``kappa2``
        and ``off_ratio``) and return the batch size for the next step."""
        self.steps += 1
        m = self.multiple
        hi = max(self._lo, m * math.floor(self.cap() / m))
        target = self.batch_size
        x = _real(b_simple)
        if math.isfinite(x) and x > 0:
            self.last_b_simple = x
        goal = self._goal(x, kappa2, off_ratio)
        if goal is not None:
            raw = min(max(self.alpha * goal, self.b_min), self.cap())
            new = min(max(m * math.floor(raw / m + 0.5), self._lo), hi)
            if abs(new - self.batch_size) > self.hysteresis * self.batch_size:
                target = new
        target = min(target, hi)
        if target != self.batch_size:
            if self.optimizer is not None:
                new_ratio = self._ratio(target)
                _scale_lrs(self.optimizer, new_ratio / self.lr_ratio)
                self.lr_ratio = new_ratio
            self.batch_size = int(target)
        return self.batch_size

    def _goal(self, x: float, kappa2: float | None, off_ratio: float | None) -> float | None:
        """The unscaled target batch size of this update, or None (keep the size)."""
        if self.target == "b_simple":
            return x if math.isfinite(x) and x > 0 else None
        k2 = _real(kappa2 if kappa2 is not None else self.fixed["kappa2"]
                   if self.fixed["kappa2"] is not None else x)
        if off_ratio is None and self.fixed["off_ratio"] is None:
            raise ValueError(f"target {self.target!r} needs off_ratio (AdamNoiseResult."
                             "off_ratio.value) in update() or the constructor")
        rho = _real(off_ratio if off_ratio is not None else self.fixed["off_ratio"])
        if not (math.isfinite(k2) and k2 > 0 and math.isfinite(rho) and rho > -1.0):
            return None
        self.last_kappa2, self.last_off_ratio = k2, rho
        if self.target == "adam-noise2":
            return adam_b_noise2_from_sums(k2, 1.0, 1.0 + rho)
        return adam_plateau_batch_size(k2, rho, self.tol)

    _STATE = ("batch_size", "steps", "last_b_simple", "last_kappa2", "last_off_ratio", "lr_ratio")

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the controller; the optimizer's lr is restored by its own ``load_state_dict``."""
        b = int(state_dict["batch_size"])
        if b % self.multiple:
            raise ValueError(f"batch_size {b} in state_dict is not a multiple of {self.multiple}")
        self.batch_size, self.steps = b, int(state_dict["steps"])
        self.last_b_simple, self.lr_ratio = (
            state_dict["last_b_simple"],
            float(state_dict["lr_ratio"]),
        )
        self.last_kappa2 = state_dict.get("last_kappa2")
        self.last_off_ratio = state_dict.get("last_off_ratio")


class ControlledBatchSampler:
    """Batch sampler whose batch size is read from ``controller.batch_size`` when each batch
    starts: ``DataLoader(ds, batch_sampler=ControlledBatchSampler(sampler, ctl))``.

    ``micro_batches=True`` yields each batch as ``accumulation_steps`` lists of
    ``micro_batch_size`` indices (for gradient accumulation). A DataLoader prefetches
    ``num_workers * prefetch_factor`` batches, so a change shows up that many batches late.
    ``len()`` is an estimate at the current size.
    """

    def __init__(
        self,
        sampler: Iterable[int],
        controller: BatchSizeController,
        drop_last: bool = False,
        micro_batches: bool = False,
    ) -> None:
        self.sampler, self.controller = sampler, controller
        self.drop_last, self.micro_batches = bool(drop_last), bool(micro_batches)

    def __iter__(self) -> Iterator[list[int]]:
        it = iter(self.sampler)
        while True:
            size = self.controller.batch_size
            batch = list(islice(it, size))
            if not batch or (self.drop_last and len(batch) < size):
                return
            if self.micro_batches:
                mb = self.controller.micro_batch_size
                for i in range(0, len(batch), mb):
                    yield batch[i : i + mb]
            else:
                yield batch

    def __len__(self) -> int:
        n, b = len(self.sampler), self.controller.batch_size  # type: ignore[arg-type]
        full, rest = divmod(n, b)
        if self.drop_last:
            rest = 0
        if not self.micro_batches:
            return full + (rest > 0)
        mb = self.controller.micro_batch_size
        return full * (b // mb) + -(-rest // mb)
