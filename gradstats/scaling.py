"""Batch-size / learning-rate scaling rules (pure functions, no state).

Notation: ``B`` batch size, ``G`` true gradient, ``H`` Hessian, ``Sigma`` per-example gradient
covariance, ``B_simple = tr(Sigma)/|G|^2``, ``B_noise = tr(H Sigma)/(G^T H G)``.

Sources:
  [M18] McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training".
  [S24] Su Jianlin 2024, mean-field sign-descent analysis of Adam (shared/seeds/001_*).
  [L24] Li et al. 2024, "Surge Phenomenon in Optimal Learning Rate and Batch Size Scaling".
  [MA22] Malladi, Lyu, Panigrahi, Arora 2022, "On the SDEs and Scaling Rules for Adaptive
         Gradient Algorithms".
  [J20] Johnson, Agrawal, Gu, Guestrin 2020 (AdaScale SGD); fairscale ``AdaScale``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = [
    "LR_RULES",
    "AdamSDEScaling",
    "adam_b_noise2",
    "adam_b_noise2_from_peak",
    "adam_b_noise2_from_sums",
    "adam_beta",
    "adam_beta_noise",
    "adam_beta_noise_from_b_noise2",
    "adam_eta_max",
    "adam_optimal_lr",
    "adam_peak_batch_size",
    "adam_peak_from_b_noise2",
    "adam_plateau_batch_size",
    "adam_sde_scaling",
    "adam_sign_descent_lr",
    "adam_surge_lr",
    "adascale_gain",
    "adascale_gain_from_b_simple",
    "b_noise_from_hessian",
    "eta_max_from_hessian",
    "eta_max_from_search",
    "examples_for_batch",
    "linear_scaling",
    "lr_ratio",
    "sgd_optimal_lr",
    "sqrt_scaling",
    "steps_for_batch",
]


# --------------------------------------------------------------------------- argument checks
def _num(name: str, x: float) -> float:
    if isinstance(x, bool | str) or not hasattr(x, "__float__"):
        raise TypeError(f"{name} must be a real number, got {x!r}")
    v = float(x)
    if math.isnan(v):
        raise ValueError(f"{name} must not be nan")
    return v


def _pos(name: str, x: float, allow_inf: bool = False) -> float:
    v = _num(name, x)
    if not v > 0 or (v == math.inf and not allow_inf):
        raise ValueError(f"{name} must be > 0{'' if allow_inf else ' and finite'}, got {x!r}")
    return v


def _nonneg(name: str, x: float, allow_inf: bool = False) -> float:
    v = _num(name, x)
    if not v >= 0 or (v == math.inf and not allow_inf):
        raise ValueError(f"{name} must be >= 0{'' if allow_inf else ' and finite'}, got {x!r}")
    return v


# --------------------------------------------------------------------------- heuristic rules
def linear_scaling(lr: float, batch_size: float, base_batch_size: float) -> float:
    """``lr * B / B0`` (Goyal et al. 2017; the SDE argument for SGD; [M18] for ``B << B_noise``)."""
    return (
        _pos("lr", lr) * _pos("batch_size", batch_size) / _pos("base_batch_size", base_batch_size)
    )


def sqrt_scaling(lr: float, batch_size: float, base_batch_size: float) -> float:
    """``lr * sqrt(B / B0)`` (Krizhevsky 2014: constant update variance; Adam, [MA22], [S24])."""
    b, b0 = _pos("batch_size", batch_size), _pos("base_batch_size", base_batch_size)
    return _pos("lr", lr) * math.sqrt(b / b0)


# --------------------------------------------------------------------------- SGD [M18]
def sgd_optimal_lr(eta_max: float, b_noise: float, batch_size: float) -> float:
    """``eta*(B) = eta_max / (1 + B_noise / B)``: minimiser of the expected second-order loss
    after one SGD step [M18]."""
    return _pos("eta_max", eta_max) / (
        1.0 + _nonneg("b_noise", b_noise) / _pos("batch_size", batch_size)
    )


def steps_for_batch(s_min: float, b_noise: float, batch_size: float) -> float:
    """``S(B) = S_min (1 + B_noise / B)`` steps to reach a target [M18]."""
    return _pos("s_min", s_min) * (
        1.0 + _nonneg("b_noise", b_noise) / _pos("batch_size", batch_size)
    )


def examples_for_batch(e_min: float, b_noise: float, batch_size: float) -> float:
    """``E(B) = E_min (1 + B / B_noise)`` examples to reach a target [M18]."""
    return _pos("e_min", e_min) * (1.0 + _pos("batch_size", batch_size) / _pos("b_noise", b_noise))


def b_noise_from_hessian(tr_h_sigma: float, gHg: float) -> float:
    """``B_noise = tr(H Sigma) / (G^T H G)`` [M18]; needs ``G^T H G > 0``."""
    return _nonneg("tr_h_sigma", tr_h_sigma) / _pos("gHg", gHg)


def eta_max_from_hessian(g2: float, gHg: float) -> float:
    """``eta_max = |G|^2 / (G^T H G)``, the optimal full-batch step size [M18]."""
    return _pos("g2", g2) / _pos("gHg", gHg)


def eta_max_from_search(
    best_lr_small_batch: float, small_batch_size: float, b_simple: float
) -> float:
    """Invert ``eta*(b) = eta_max / (1 + B_noise/b)``: ``eta_max = eta*(b) (1 + B_simple/b)``.

    ``eta*(b)`` is the best lr found by a search at a small batch ``b``; ``B_simple`` stands in
    for ``B_noise`` (exact when ``H`` is a multiple of the identity) [M18, S24]."""
    lr = _pos("best_lr_small_batch", best_lr_small_batch)
    return lr * (1.0 + _nonneg("b_simple", b_simple) / _pos("small_batch_size", small_batch_size))


# --------------------------------------------------------------------------- Adam, mean-field [S24]
# Adam is modelled as sign descent, E[sign(g_B,i)] = erf(g_i/sigma_i sqrt(B/2)) ~ sign(g_i) beta(B)
# with one noise-to-signal ratio kappa^2 standing for every (sigma_i/g_i)^2. Estimating kappa^2
# by B_simple is an approximation [S24]; gradstats.adam measures it (and the curvature sums).
def adam_beta(kappa2: float, batch_size: float) -> float:
    """``beta(B) = (1 + pi kappa^2 / (2B))^(-1/2)`` [S24]: mean-field |E sign(g_B)|, using
    ``erf(x) ~ x / sqrt(x^2 + pi/4)``; ``kappa^2 ~ B_simple`` is an approximation."""
    k2 = _nonneg("kappa2", kappa2)
    return 1.0 / math.sqrt(1.0 + math.pi * k2 / (2.0 * _pos("batch_size", batch_size)))


def adam_optimal_lr(eta_max_adam: float, kappa2: float, batch_size: float) -> float:
    """``eta*(B) = eta_max_adam (1 + pi kappa^2/(2B))^(-1/2)``: sign-descent optimum when the
    Hessian's diagonal dominates [S24]; ~ ``sqrt(B)`` for ``B << pi kappa^2/2``. ``kappa^2`` is
    estimated by ``B_simple`` (an approximation)."""
    return _pos("eta_max_adam", eta_max_adam) * adam_beta(kappa2, batch_size)


def adam_surge_lr(
    eta_max_adam: float, kappa2: float, batch_size: float, beta_noise: float
) -> float:
    """``eta*(B) = eta_max_adam / (0.5 (beta_noise/beta + beta/beta_noise))``, ``beta = adam_beta``.

    Off-diagonal Hessian included [S24; L24 "surge"]: rises, peaks at ``beta = beta_noise``
    (value ``eta_max_adam``), then falls; ``beta_noise^2 = sum_i H_ii / sum_{i!=j}
    sign(g_i g_j) H_ij``. ``kappa^2 ~ B_simple`` is an approximation."""
    bn = _pos("beta_noise", beta_noise)
    beta = adam_beta(kappa2, batch_size)
    return _pos("eta_max_adam", eta_max_adam) / (0.5 * (bn / beta + beta / bn))


def adam_peak_batch_size(kappa2: float, beta_noise: float) -> float:
    """``B_peak = pi kappa^2 beta_noise^2 / (2 (1 - beta_noise^2))``, the batch size where the
    surge-form lr peaks (solves ``beta(B) = beta_noise``) [S24].

    Only ``0 < beta_noise < 1`` has a peak; for ``beta_noise >= 1`` returns ``math.inf``: the
    optimal lr then rises monotonically with ``B`` (beta < 1 always)."""
    k2, bn = _nonneg("kappa2", kappa2), _pos("beta_noise", beta_noise, allow_inf=True)
    if bn >= 1.0:
        return math.inf
    return math.pi * k2 * bn * bn / (2.0 * (1.0 - bn * bn))


def adam_b_noise2(kappa2: float, beta_noise: float) -> float:
    """``B_noise-2 = pi kappa^2 beta_noise^2 / (2 (1 + beta_noise^2))`` [S24]: with the surge
    lr the per-step loss decrease is ``dL_max / (1 + B_noise-2/B)``, so
    ``E_min/S_min = B_noise-2``."""
    k2, bn = _nonneg("kappa2", kappa2), _pos("beta_noise", beta_noise)
    return math.pi * k2 * bn * bn / (2.0 * (1.0 + bn * bn))


def adam_b_noise2_from_peak(b_peak: float, kappa2: float) -> float:
    """``B_noise-2`` from ``1/B_noise-2 - 1/B_peak = 4/(pi kappa^2)`` [S24];
    ``b_peak = inf`` (no peak, ``beta_noise = 1``) gives ``pi kappa^2 / 4``."""
    bp, k2 = _pos("b_peak", b_peak, allow_inf=True), _pos("kappa2", kappa2)
    return 1.0 / (1.0 / bp + 4.0 / (math.pi * k2))


def adam_peak_from_b_noise2(b_noise2: float, kappa2: float) -> float:
    """``B_peak = (1/B_noise-2 - 4/(pi kappa^2))^(-1)`` [S24], e.g. from a fitted ``E_min/S_min``;
    ``math.inf`` when ``B_noise-2 >= pi kappa^2/4`` (``beta_noise >= 1``: no peak)."""
    b2, k2 = _pos("b_noise2", b_noise2), _pos("kappa2", kappa2)
    inv = 1.0 / b2 - 4.0 / (math.pi * k2)
    return math.inf if inv <= 0.0 else 1.0 / inv


def adam_beta_noise_from_b_noise2(b_noise2: float, kappa2: float) -> float:
    """Invert ``adam_b_noise2``: ``beta_noise^2 = 2 B_noise-2 / (pi kappa^2 - 2 B_noise-2)``;
    requires ``B_noise-2 < pi kappa^2 / 2``."""
    b2, k2 = _pos("b_noise2", b_noise2), _pos("kappa2", kappa2)
    if not 2.0 * b2 < math.pi * k2:
        raise ValueError(f"b_noise2 must be < pi*kappa2/2 = {math.pi * k2 / 2:g}, got {b_noise2!r}")
    return math.sqrt(2.0 * b2 / (math.pi * k2 - 2.0 * b2))


# --------------------------------------------------------------------------- Adam, measured sums
# The same mean-field model written in the measured sums (gradstats.adam): l1 = sum_i |g_i|,
# tr_h = sum_i H_ii, s_h_s = s^T H s with s = sign(g), so that sum_{i!=j} sign(g_i g_j) H_ij =
# s_h_s - tr_h. This form stays defined where beta_noise is not (s_h_s <= tr_h).
def _sums(tr_h: float, s_h_s: float) -> tuple[float, float]:
    t, q = _pos("tr_h", tr_h), _num("s_h_s", s_h_s)
    if not (q > 0 and math.isfinite(q)):
        raise ValueError(f"s_h_s must be > 0 and finite (the curvature along sign(g)), got "
                         f"{s_h_s!r}")
    return t, q


def adam_sign_descent_lr(
    l1: float, tr_h: float, s_h_s: float, kappa2: float, batch_size: float
) -> float:
    """``eta*(B) = l1 beta / (tr_h + beta^2 (s_h_s - tr_h))``, ``beta = adam_beta(kappa2, B)``:
    the sign-descent optimum ``sum_i mu_i g_i / (sum_i H_ii + sum_{i!=j} mu_i mu_j H_ij)`` with
    ``mu_i = sign(g_i) beta`` [S24]. Equals :func:`adam_surge_lr` with :func:`adam_eta_max` and
    :func:`adam_beta_noise` when ``s_h_s > tr_h``; otherwise it rises monotonically to
    ``l1 / s_h_s`` as ``B -> inf``."""
    t, q = _sums(tr_h, s_h_s)
    beta = adam_beta(kappa2, batch_size)
    return _pos("l1", l1) * beta / (t + beta * beta * (q - t))


def adam_beta_noise(tr_h: float, s_h_s: float) -> float:
    """``beta_noise = sqrt(tr_h / (s_h_s - tr_h))`` [S24]; defined only for ``tr_h > 0`` and
    ``s_h_s > tr_h`` (a positive sign-weighted off-diagonal sum)."""
    t, q = _sums(tr_h, s_h_s)
    if not q > t:
        raise ValueError(f"s_h_s must exceed tr_h for beta_noise to exist (sum_{{i!=j}} "
                         f"sign(g_i g_j) H_ij > 0), got s_h_s={s_h_s!r}, tr_h={tr_h!r}")
    return math.sqrt(t / (q - t))


def adam_eta_max(l1: float, tr_h: float, s_h_s: float) -> float:
    """``eta_max = l1 / (2 sqrt(tr_h (s_h_s - tr_h)))`` [S24], the peak of the surge curve
    (reached at ``B_peak``); defined where :func:`adam_beta_noise` is."""
    adam_beta_noise(tr_h, s_h_s)
    return _pos("l1", l1) / (2.0 * math.sqrt(tr_h * (s_h_s - tr_h)))


def adam_b_noise2_from_sums(kappa2: float, tr_h: float, s_h_s: float) -> float:
    """``B_noise-2 = pi kappa^2 tr_h / (2 s_h_s)`` [S24]: the per-step loss decrease at the
    optimal lr is ``dL_max / (1 + B_noise-2 / B)`` with ``dL_max = l1^2 / (2 s_h_s)``; equals
    :func:`adam_b_noise2` when ``beta_noise`` exists, and stays defined when it does not."""
    t, q = _sums(tr_h, s_h_s)
    return math.pi * _nonneg("kappa2", kappa2) * t / (2.0 * q)


def adam_plateau_batch_size(kappa2: float, off_ratio: float, tol: float = 0.0) -> float:
    """Smallest ``B`` with ``eta*(B) >= (1 - tol) sup_B eta*(B)`` on the sign-descent curve,
    ``off_ratio = sum_{i!=j} sign(g_i g_j) H_ij / sum_i H_ii`` (``= 1/beta_noise^2`` when
    positive; ``> -1``). With ``f(beta) = beta / (1 + off_ratio beta^2)`` the supremum over
    ``beta`` in ``(0, 1]`` is ``1/(2 sqrt(off_ratio))`` at ``beta_noise`` for ``off_ratio > 1``,
    else ``f(1)``; the smaller root of ``f(beta) = q`` is ``beta = 2q / (1 + sqrt(1 - 4 off_ratio
    q^2))`` and ``B = pi kappa^2 beta^2 / (2 (1 - beta^2))``. ``tol = 0`` gives ``B_peak``
    (:func:`adam_peak_batch_size`), ``math.inf`` when there is no peak."""
    k2, rho, tl = _nonneg("kappa2", kappa2), _num("off_ratio", off_ratio), _nonneg("tol", tol)
    if not rho > -1.0 or math.isinf(rho):
        raise ValueError(f"off_ratio must be finite and > -1 (s^T H s > 0), got {off_ratio!r}")
    if not tl < 1.0:
        raise ValueError(f"tol must be in [0, 1), got {tol!r}")
    if rho <= 1.0 and tl == 0.0:  # the supremum is the limit B -> inf
        return math.inf
    f_sup = 0.5 / math.sqrt(rho) if rho > 1.0 else 1.0 / (1.0 + rho)
    q = (1.0 - tl) * f_sup
    beta = min(1.0, 2.0 * q / (1.0 + math.sqrt(max(0.0, 1.0 - 4.0 * rho * q * q))))
    return math.inf if beta >= 1.0 else math.pi * k2 * beta * beta / (2.0 * (1.0 - beta * beta))


class AdamSDEScaling(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float


def adam_sde_scaling(lr: float, beta1: float, beta2: float, eps: float, k: float) -> AdamSDEScaling:
    """Square-root SDE rule for Adam/RMSProp [MA22] when the batch is multiplied by ``k``:
    ``lr sqrt(k)``, ``1 - (1-beta1) k``, ``1 - (1-beta2) k``, ``eps / sqrt(k)``.

    ``k`` is the batch multiplier (not the noise ratio kappa). Refused when ``k (1-beta) >= 1``
    (the new beta would be <= 0)."""
    kk = _pos("k", k)
    out = []
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        v = _num(name, b)
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b!r}")
        if kk * (1.0 - v) >= 1.0:
            raise ValueError(
                f"{name}: k*(1-{name}) = {kk * (1.0 - v):g} >= 1, scaled {name} would be <= 0"
            )
        out.append(1.0 - (1.0 - v) * kk)
    s = math.sqrt(kk)
    return AdamSDEScaling(_pos("lr", lr) * s, out[0], out[1], _nonneg("eps", eps) / s)


# --------------------------------------------------------------------------- AdaScale [J20]
def adascale_gain(tr_sigma: float, g2: float, batch_size: float, base_batch_size: float) -> float:
    """``r = (tr/B0 + |G|^2) / (tr/B + |G|^2) = (1 + B_simple/B0) / (1 + B_simple/B)`` [J20].

    ``tr_sigma`` = per-example tr(Sigma), ``g2`` = |G|^2 (unbiased estimates may be negative: both
    are clamped at 0 as in fairscale). ``g2 <= 0`` gives ``B/B0``; ``tr = g2 = 0`` gives 1. The
    result is clipped into [1, B/B0] (into [B/B0, 1] when B < B0) against rounding."""
    tr, mu2 = _num("tr_sigma", tr_sigma), _num("g2", g2)
    if math.isinf(tr) or math.isinf(mu2):
        raise ValueError(f"tr_sigma and g2 must be finite, got {tr_sigma!r}, {g2!r}")
    tr, mu2 = max(tr, 0.0), max(mu2, 0.0)
    b, b0 = _pos("batch_size", batch_size), _pos("base_batch_size", base_batch_size)
    lo, hi = sorted((1.0, b / b0))
    if mu2 == 0.0:
        return 1.0 if tr == 0.0 else b / b0
    return min(max((tr / b0 + mu2) / (tr / b + mu2), lo), hi)


def adascale_gain_from_b_simple(
    b_simple: float, batch_size: float, base_batch_size: float
) -> float:
    """``r = (1 + B_simple/B0) / (1 + B_simple/B)`` [J20]; ``b_simple = inf`` gives ``B/B0``.
    Clipped into [1, B/B0] like :func:`adascale_gain`."""
    bs = _nonneg("b_simple", b_simple, allow_inf=True)
    b, b0 = _pos("batch_size", batch_size), _pos("base_batch_size", base_batch_size)
    if math.isinf(bs):
        return b / b0
    lo, hi = sorted((1.0, b / b0))
    return min(max((1.0 + bs / b0) / (1.0 + bs / b), lo), hi)


# --------------------------------------------------------------------------- rule dispatch
#: the learning-rate rules (not to be confused with the layer rules of gradstats.rules)
LR_RULES = ("constant", "linear", "sqrt", "sgd-optimal", "adam-optimal", "adam-surge",
         "adam-sign-descent")


def lr_ratio(
    rule: str,
    batch_size: float,
    base_batch_size: float,
    *,
    b_noise: float | None = None,
    kappa2: float | None = None,
    beta_noise: float | None = None,
    off_ratio: float | None = None,
) -> float:
    """``eta(B) / eta(B0)`` under ``rule`` (one of :data:`LR_RULES`): the factor to apply to an lr
    tuned at ``base_batch_size``. "sgd-optimal" needs ``b_noise``; "adam-optimal" needs
    ``kappa2``; "adam-surge" needs ``kappa2`` and ``beta_noise``; "adam-sign-descent" (the
    measured curve of :func:`adam_sign_descent_lr`, defined with or without a peak) needs
    ``kappa2`` and ``off_ratio = sum_{i!=j} sign(g_i g_j) H_ij / sum_i H_ii``."""
    b, b0 = _pos("batch_size", batch_size), _pos("base_batch_size", base_batch_size)
    if rule == "constant":
        return 1.0
    if rule == "linear":
        return b / b0
    if rule == "sqrt":
        return math.sqrt(b / b0)

    def need(name: str, v: float | None) -> float:
        if v is None:
            raise ValueError(f"rule {rule!r} needs {name}")
        return v

    if rule == "sgd-optimal":
        bn = need("b_noise", b_noise)
        return sgd_optimal_lr(1.0, bn, b) / sgd_optimal_lr(1.0, bn, b0)
    if rule == "adam-optimal":
        k2 = need("kappa2", kappa2)
        return adam_beta(k2, b) / adam_beta(k2, b0)
    if rule == "adam-surge":
        k2, bn = need("kappa2", kappa2), need("beta_noise", beta_noise)
        return adam_surge_lr(1.0, k2, b, bn) / adam_surge_lr(1.0, k2, b0, bn)
    if rule == "adam-sign-descent":
        k2, rho = need("kappa2", kappa2), need("off_ratio", off_ratio)
        if not _num("off_ratio", rho) > -1.0:
            raise ValueError(f"off_ratio must be > -1 (s^T H s > 0), got {off_ratio!r}")
        return adam_sign_descent_lr(1.0, 1.0, 1.0 + rho, k2, b) / adam_sign_descent_lr(
            1.0, 1.0, 1.0 + rho, k2, b0)
    raise ValueError(f"rule must be one of {LR_RULES}, got {rule!r}")
