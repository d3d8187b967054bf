"""Unbiased per-step estimators of the gradient noise and their smoothing over steps.

Everything here is plain host-side float64 arithmetic on a few numbers per step; nothing
depends on torch or on the compiled extension.

Per step (see "The units contract" in DESIGN.md)
------------------------------------------------
The monitor hands over, in per-example loss units,

* ``sum_sq_norms = sum_i |g_i|^2`` over the ``n`` examples of the step, and
* ``mean_grad_sq = |gbar|^2`` with ``gbar = (1/n) sum_i g_i``,

and :func:`step_estimate` returns

* ``tr_sigma = (sum_sq_norms - n |gbar|^2) / (n - 1)``, the trace of the usual unbiased
  (divisor ``n - 1``) sample covariance of the ``g_i``;
* ``g2 = |gbar|^2 - tr_sigma * (1/n - 1/M)``, where the ``1/M`` term is used only when a
  ``dataset_size`` ``M`` is given (otherwise ``1/M = 0``);
* ``b_simple = tr_sigma / g2``, the simple noise scale of McCandlish et al. (2018), defined
  only when ``n > 1`` and ``g2 > 0``.

What is estimated, and under which sampling assumption:

* **Without ``dataset_size``** the ``n`` examples are taken to be i.i.d. draws from the data
  distribution (or, equivalently, drawn *with* replacement from a finite data set). Then
  ``E[tr_sigma] = tr(Sigma)`` with ``Sigma`` the covariance of a single example's gradient,
  and ``E[g2] = |G|^2`` with ``G = E[g_i]``, because ``E|gbar|^2 = |G|^2 + tr(Sigma)/n``.
  Both are exactly unbiased; the naive ``|gbar|^2`` overestimates ``|G|^2`` by
  ``tr(Sigma)/n``.
* **With ``dataset_size = M``** the ``n`` examples are assumed to be a simple random sample
  drawn *without* replacement from a fixed population of ``M`` examples (one batch of a
  shuffled epoch, ``n <= M``), and ``G`` is the population mean ``(1/M) sum_j g_j``.
  Then ``tr_sigma`` is exactly unbiased for ``S = tr[(1/(M-1)) sum_j (g_j - G)(g_j - G)^T]``,
  the trace of the population covariance **with divisor M - 1** (the divisor-``M``
  covariance of the population is ``S (M-1)/M``). Since ``Cov(gbar) = (1/n - 1/M) S`` under
  sampling without replacement, ``E|gbar|^2 = |G|^2 + S (1/n - 1/M)``, so
  ``g2 = |gbar|^2 - tr_sigma (1/n - 1/M)`` is exactly unbiased for ``|G|^2``. With ``n = M``
  the batch is the whole data set and ``g2 = |gbar|^2`` exactly. Ignoring the correction
  underestimates ``|G|^2`` by ``S/M`` on average.

``g2`` is an unbiased estimate of a non-negative quantity and is therefore negative on some
steps when the gradient is small compared with the noise; it is reported as is (the EMA
needs it unclamped) and ``b_simple`` is then marked undefined.

Over steps (McCandlish et al. 2018, App. A)
-------------------------------------------
:class:`NoiseScaleEMA` keeps separate bias-corrected exponential moving averages of
``tr_sigma`` and ``g2`` (negative ``g2`` values enter unclamped) and reports the ratio of the
two averages, not an average of per-step ratios. Its uncertainty comes from the delta method;
see :class:`NoiseScaleEMA`.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

__all__ = ["StepEstimate", "step_estimate", "NoiseScaleEMA", "CAUCHY_SCHWARZ_RTOL"]

#: Relative slack allowed in the Cauchy-Schwarz check ``n |gbar|^2 <= sum_i |g_i|^2``.
#: In exact arithmetic the inequality always holds; rounding (float32/bfloat16 gradients)
#: can break it by a little when all examples have nearly the same gradient. A larger
#: violation means the two inputs are in different units (for example ``|sum_i g_i|^2``
#: or ``|p.grad|^2`` passed where ``|mean_i g_i|^2`` was expected).
CAUCHY_SCHWARZ_RTOL = 0.05

_REASON_N1 = "n == 1"
_REASON_G2 = "|G|^2 estimate <= 0"


@dataclass(frozen=True)
class StepEstimate:
    """Unbiased noise statistics of one optimizer step, in per-example loss units."""

    n: int
    """Number of examples in the step."""
    tr_sigma: float
    """Unbiased estimate of tr(Sigma) (nan when ``n == 1``). May be slightly negative from
    rounding when all examples have nearly the same gradient."""
    g2: float
    """Unbiased estimate of |G|^2 (may be negative; nan when ``n == 1``)."""
    b_simple: float
    """``tr_sigma / g2``; nan when undefined."""
    defined: bool
    """False when ``n == 1`` or ``g2 <= 0`` (``b_simple`` undefined)."""
    reason: str | None
    """Why ``b_simple`` is undefined: ``"n == 1"``, ``"|G|^2 estimate <= 0"``, or None."""


def _as_count(value: Any, name: str) -> int:
    """An integer (int, numpy or 0-d torch integer); bools and floats are refused."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")


def _as_finite(value: Any, name: str) -> float:
    """A finite real (float, numpy or 0-d torch scalar); bools and strings are refused."""
    x = None
    if not isinstance(value, (bool, str, bytes)) and hasattr(value, "__float__"):
        try:
            x = float(value)
        except (TypeError, ValueError, RuntimeError):
            x = None
    if x is None:
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    return x


def step_estimate(
    sum_sq_norms: float,
    mean_grad_sq: float,
    n: int,
    dataset_size: int | None = None,
    weights_sq: float | None = None,
) -> StepEstimate:
    """Unbiased ``tr(Sigma)``, ``|G|^2`` and ``B_simple`` for one step.

    Args:
        sum_sq_norms: ``sum_i |g_i|^2`` over the step's ``n`` per-example gradients.
        mean_grad_sq: ``|gbar|^2``, the squared norm of the *mean* of the same ``n``
            gradients (same units as ``sum_sq_norms``), or of their weighted mean
            ``sum_i w_i g_i`` (``sum_i w_i = 1``) when ``weights_sq`` is given.
        n: number of examples, ``n >= 1``.
        dataset_size: ``M``, the number of examples the batch was drawn from *without
            replacement*; applies the finite-population correction (see the module
            docstring for exactly what is then estimated). ``None`` (default) assumes
            i.i.d. examples. Requires ``n <= M``.
        weights_sq: ``sum_i w_i^2`` for a weighted mean (micro-batches of unequal size under a
            mean loss, ranks of unequal size, token-mean losses); ``None`` means ``1/n``.
            Since ``E|sum_i w_i g_i|^2 = |G|^2 + tr(Sigma) sum_i w_i^2`` and
            ``E[sum_i |g_i|^2 / n] = |G|^2 + tr(Sigma)``, the estimates are
            ``tr = (sum_sq/n - mean_grad_sq) / (1 - sum w^2)`` and
            ``|G|^2 = mean_grad_sq - tr (sum w^2 - 1/M)``: the usual ones for equal weights.

    Raises:
        ValueError: naming the argument, when ``n < 1``, ``dataset_size < n``, a sum is not
            finite, ``mean_grad_sq < 0``, ``sum_sq_norms < 0``, or
            ``n * mean_grad_sq > sum_sq_norms`` by more than rounding
            (:data:`CAUCHY_SCHWARZ_RTOL`), which means mismatched units.
    """
    n = _as_count(n, "n")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sum_sq = _as_finite(sum_sq_norms, "sum_sq_norms")
    mgs = _as_finite(mean_grad_sq, "mean_grad_sq")
    if mgs < 0.0:
        raise ValueError(f"mean_grad_sq must be >= 0 (a squared norm), got {mgs!r}")
    if sum_sq < 0.0:
        raise ValueError(f"sum_sq_norms must be >= 0 (a sum of squared norms), got {sum_sq!r}")
    w2 = 1.0 / n if weights_sq is None else _as_finite(weights_sq, "weights_sq")
    if not (1.0 / n) * (1 - 1e-12) <= w2 <= 1.0 + 1e-12:
        raise ValueError(f"weights_sq must lie in [1/n, 1] for weights summing to 1, got {w2!r}")
    if mgs * (1.0 - CAUCHY_SCHWARZ_RTOL) > sum_sq * w2:
        raise ValueError(
            f"sum_sq_norms ({sum_sq!r}) * sum w^2 ({w2!r}) < mean_grad_sq ({mgs!r}) beyond "
            "rounding: by Cauchy-Schwarz |sum_i w_i g_i|^2 <= sum_i w_i^2 sum_i |g_i|^2, so the "
            "two are in different units (mean_grad_sq must be |mean of the n gradients|^2, not "
            "|their sum|^2)"
        )
    m = None
    if dataset_size is not None:
        m = _as_count(dataset_size, "dataset_size")
        if m < n:
            raise ValueError(
                f"dataset_size must be >= n (the batch is drawn without replacement from "
                f"dataset_size examples), got dataset_size={m}, n={n}"
            )
    return _estimate(sum_sq, mgs, n, m, None if weights_sq is None else w2)


def _estimate(sum_sq: float, mgs: float, n: int, m: int | None, weights_sq: float | None
              ) -> StepEstimate:
    """:func:`step_estimate` on arguments already checked (the monitor's own sums)."""
    w2 = 1.0 / n if weights_sq is None else weights_sq
    if n == 1 or w2 >= 1.0:
        nan = math.nan
        return StepEstimate(n=n, tr_sigma=nan, g2=nan, b_simple=nan, defined=False,
                            reason=_REASON_N1 if n == 1 else "one example carries all the weight")

    if weights_sq is None:
        tr = (sum_sq - n * mgs) / (n - 1)
        # 1/n - 1/M, formed from integers so that n == M gives exactly 0.
        shrink = 1.0 / n if m is None else (m - n) / (n * m)
    else:
        tr = (sum_sq / n - mgs) / (1.0 - w2)
        shrink = w2 - (0.0 if m is None else 1.0 / m)
    g2 = mgs - tr * shrink
    if g2 > 0.0:
        return StepEstimate(n=n, tr_sigma=tr, g2=g2, b_simple=tr / g2, defined=True,
                            reason=None)
    return StepEstimate(n=n, tr_sigma=tr, g2=g2, b_simple=math.nan, defined=False,
                        reason=_REASON_G2)


class NoiseScaleEMA:
    """Bias-corrected EMAs of ``tr(Sigma)`` and ``|G|^2`` and their ratio, with an error bar.

    After ``t`` accepted steps with per-step estimates ``x_1..x_t`` the smoothed value is the
    weighted mean ``sum_k w_k x_k`` with normalised weights
    ``w_k = (1 - beta) beta^(t-k) / (1 - beta^t)`` (the Adam-style bias correction), kept
    separately for ``tr`` and ``g2``; ``b_simple`` is the ratio of the two means
    (McCandlish et al. 2018, App. A). Steps with ``n == 1`` carry no variance information
    and are skipped; negative ``g2`` values are averaged unclamped (clamping would bias the
    average upward).

    Uncertainty (``b_simple_stderr``, :meth:`interval`): the delta method for a ratio of two
    means, ``Var(T/G) ~ [Var(T) - 2 R Cov(T, G) + R^2 Var(G)] / G^2`` with ``R = T/G``. The
    variances and covariance of the two weighted means are
    ``Var(T) = s_TT / n_eff`` etc., where ``s`` is the per-step covariance of (tr, g2)
    estimated from the same exponentially weighted window (weighted second moments about the
    weighted means, with the unbiased "reliability weights" correction ``1 / (1 - sum w^2)``),
    and ``n_eff = 1 / sum w^2 = (sum w)^2 / sum w^2`` is the effective sample size of the
    normalised weights (the sum of squared weights is tracked exactly, bias correction
    included). Together: ``Var(T) = C_TT / (n_eff - 1)`` with ``C_TT`` the weighted central
    second moment. This assumes the per-step estimates are independent with a common mean
    and covariance over the window: true for i.i.d. batches at fixed parameters, approximate
    while the parameters (and so ``tr(Sigma)`` and ``|G|^2``) drift. It is a first-order
    (normal) approximation; it is good when the relative error of the smoothed ``|G|^2`` is
    small and meaningless when the smoothed ``|G|^2`` is close to zero.

    The interval (:meth:`interval`) is taken on the log scale, where a ratio of two noisy
    means is closer to normal and a noise scale is read (it is positive and spans decades):
    by the delta method ``se(log B) = stderr / B``, and the interval is
    ``(B exp(-z se_log), B exp(+z se_log))`` with ``z`` the normal quantile; both ends are
    positive and the interval is wider above ``B`` than below. It is ``(nan, nan)``, with
    :meth:`interval_reason` saying why, when ``B`` is undefined (no step yet, or the smoothed
    ``|G|^2 <= 0``), when there is no spread to estimate the error from (fewer than two steps,
    ``beta = 0``), and when the smoothed ``|G|^2`` is not resolved from zero: its own lower
    confidence end ``g2 - z se(g2) <= 0``. Then ``B`` could be arbitrarily large at that
    confidence and no finite upper end is honest; read it as "noise dominates the gradient".

    ``beta = 0`` means no smoothing: the values of the last accepted step, and no error bar
    (``b_simple_stderr`` is nan). The stderr is also nan until two steps have been accepted.

    The moments are updated with West's weighted incremental algorithm (no large-minus-large
    cancellation). :meth:`state_dict` holds the exact floats, so a run continued after
    :meth:`load_state_dict` is bit-identical to an uninterrupted one.
    """

    _STATE_VERSION = 1
    _FLOAT_KEYS = ("w_sum", "w2_sum", "mean_tr", "mean_g2", "m2_tr", "m2_g2", "c_tr_g2")

    def __init__(self, beta: float = 0.99) -> None:
        self._beta = self._check_beta(beta)
        self._reset()

    @staticmethod
    def _check_beta(beta: Any) -> float:
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            raise ValueError(f"beta must be a real number, got {beta!r}")
        b = float(beta)
        if not (0.0 <= b < 1.0):
            raise ValueError(f"beta must satisfy 0 <= beta < 1, got {b!r}")
        return b

    def _reset(self) -> None:
        self._steps = 0
        self._skipped = 0
        self._w_sum = 0.0    # sum of unnormalised weights = 1 - beta^t
        self._w2_sum = 0.0   # sum of squared unnormalised weights
        self._mean_tr = 0.0  # weighted means (= bias-corrected EMAs)
        self._mean_g2 = 0.0
        self._m2_tr = 0.0    # unnormalised weighted central second moments
        self._m2_g2 = 0.0
        self._c_tr_g2 = 0.0

    # ----------------------------------------------------------------------------- update
    def update(self, est: StepEstimate) -> None:
        """Add one step's estimate. Steps with ``n == 1`` (nan estimates) are skipped."""
        tr, g2 = float(est.tr_sigma), float(est.g2)
        if est.n == 1 or (math.isnan(tr) and math.isnan(g2)):
            self._skipped += 1
            return
        if not (math.isfinite(tr) and math.isfinite(g2)):
            raise ValueError(
                f"est must hold finite tr_sigma and g2 when n > 1, got tr_sigma={tr!r}, "
                f"g2={g2!r}, n={est.n}"
            )
        beta = self._beta
        a = 1.0 - beta
        w_sum = beta * self._w_sum + a
        self._w2_sum = beta * beta * self._w2_sum + a * a
        self._w_sum = w_sum
        f = a / w_sum
        d_tr = tr - self._mean_tr
        d_g2 = g2 - self._mean_g2
        if f == 1.0:  # first step, or beta == 0: the value itself, without rounding
            self._mean_tr, self._mean_g2 = tr, g2
        else:
            self._mean_tr += f * d_tr
            self._mean_g2 += f * d_g2
        # West (1979): M2' = beta*M2 + a * (x - mean_old) * (y - mean_new)
        e_tr = tr - self._mean_tr
        e_g2 = g2 - self._mean_g2
        self._m2_tr = beta * self._m2_tr + a * d_tr * e_tr
        self._m2_g2 = beta * self._m2_g2 + a * d_g2 * e_g2
        self._c_tr_g2 = beta * self._c_tr_g2 + a * d_tr * e_g2
        self._steps += 1

    # ------------------------------------------------------------------------- read-outs
    @property
    def beta(self) -> float:
        return self._beta

    @property
    def steps(self) -> int:
        """Number of steps that entered the averages."""
        return self._steps

    @property
    def skipped(self) -> int:
        """Number of steps skipped (``n == 1``)."""
        return self._skipped

    @property
    def tr_sigma(self) -> float:
        """Bias-corrected EMA of the per-step ``tr(Sigma)`` estimates (nan before any step)."""
        return self._mean_tr if self._steps else math.nan

    @property
    def g2(self) -> float:
        """Bias-corrected EMA of the per-step ``|G|^2`` estimates (nan before any step)."""
        return self._mean_g2 if self._steps else math.nan

    @property
    def n_eff(self) -> float:
        """Effective number of steps in the window, ``(sum w)^2 / sum w^2`` (0 before any)."""
        if not self._steps:
            return 0.0
        return self._w_sum * self._w_sum / self._w2_sum

    @property
    def b_simple(self) -> float:
        """Ratio of the two EMAs; nan before any step or when the ``|G|^2`` EMA is <= 0."""
        if not self._steps or not self._mean_g2 > 0.0:
            return math.nan
        return self._mean_tr / self._mean_g2

    def _moments(self) -> tuple[float, float, float] | None:
        """(Var, Var, Cov) of the smoothed (tr, g2), or None when not estimable."""
        if self._steps < 2 or self._beta == 0.0:
            return None
        n_eff = self.n_eff
        if not n_eff > 1.0:
            return None
        k = 1.0 / (self._w_sum * (n_eff - 1.0))
        return self._m2_tr * k, self._m2_g2 * k, self._c_tr_g2 * k

    @property
    def b_simple_stderr(self) -> float:
        """Delta-method standard error of :attr:`b_simple` (nan when undefined)."""
        r = self.b_simple
        mom = self._moments()
        if math.isnan(r) or mom is None:
            return math.nan
        v_tr, v_g2, c = mom
        var = (v_tr - 2.0 * r * c + r * r * v_g2) / (self._mean_g2 * self._mean_g2)
        return math.sqrt(max(var, 0.0))

    @staticmethod
    def _z(confidence: Any) -> float:
        if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real):
            raise ValueError(f"confidence must be a real number, got {confidence!r}")
        if not (0.0 < float(confidence) < 1.0):
            raise ValueError(f"confidence must satisfy 0 < confidence < 1, got {confidence!r}")
        return NormalDist().inv_cdf(0.5 + 0.5 * float(confidence))

    def _interval(self, confidence: Any) -> tuple[float, float, str | None]:
        z = self._z(confidence)
        nan = math.nan
        if not self._steps:
            return nan, nan, "no step yet"
        if not self._mean_g2 > 0.0:
            return nan, nan, "smoothed |G|^2 <= 0: B_simple undefined"
        mom = self._moments()
        if mom is None:
            return nan, nan, ("beta = 0: no spread to estimate the error from" if
                              self._beta == 0.0 else "fewer than two steps: no spread yet")
        if self._mean_g2 - z * math.sqrt(max(mom[1], 0.0)) <= 0.0:
            return nan, nan, (f"smoothed |G|^2 not resolved from 0 at {float(confidence):g} "
                              "confidence (noise dominates the gradient)")
        b, se = self.b_simple, self.b_simple_stderr
        if not b > 0.0:
            return nan, nan, ("smoothed tr(Sigma) <= 0 (the gradient is the same for every "
                              "example, up to rounding): no log-scale interval")
        se_log = se / b
        return b * math.exp(-z * se_log), b * math.exp(z * se_log), None

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Two-sided interval on the log scale, ``(B exp(-z se/B), B exp(z se/B))``;
        ``(nan, nan)`` when :meth:`interval_reason` is not None (see the class docstring)."""
        lo, hi, _ = self._interval(confidence)
        return lo, hi

    def interval_reason(self, confidence: float = 0.95) -> str | None:
        """Why :meth:`interval` is ``(nan, nan)`` at ``confidence``, or None when it is not."""
        return self._interval(confidence)[2]

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Plain dict of Python scalars (picklable, JSON-able); restores bit-identically."""
        d: dict[str, Any] = {
            "version": self._STATE_VERSION,
            "beta": self._beta,
            "steps": self._steps,
            "skipped": self._skipped,
        }
        for key in self._FLOAT_KEYS:
            d[key] = getattr(self, "_" + key)
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore from :meth:`state_dict` (including ``beta``)."""
        missing = [k for k in ("version", "beta", "steps", "skipped", *self._FLOAT_KEYS)
                   if k not in d]
        if missing:
            raise ValueError(f"d is missing keys {missing}")
        if d["version"] != self._STATE_VERSION:
            raise ValueError(f"d has unsupported version {d['version']!r}")
        beta = self._check_beta(d["beta"])
        steps = _as_count(d["steps"], "d['steps']")
        skipped = _as_count(d["skipped"], "d['skipped']")
        if steps < 0 or skipped < 0:
            raise ValueError("d['steps'] and d['skipped'] must be >= 0")
        vals = {k: _as_finite(d[k], f"d[{k!r}]") for k in self._FLOAT_KEYS}
        self._beta = beta
        self._steps = steps
        self._skipped = skipped
        for key, v in vals.items():
            setattr(self, "_" + key, v)

    def __repr__(self) -> str:
        return (f"NoiseScaleEMA(beta={self._beta}, steps={self._steps}, "
                f"tr_sigma={self.tr_sigma:.6g}, g2={self.g2:.6g}, b_simple={self.b_simple:.6g}"
                f" +/- {self.b_simple_stderr:.6g})")
