"""Adam as sign descent, measured: kappa^2, the sign-descent curvature, beta_noise, the surge.

Model [S24, L24] (:mod:`gradstats.scaling`): an Adam step is ``-eta sign(g_B)`` with, per
coordinate, ``g_B,i ~ N(g_i, sigma_i^2 / B)``, so that (``erf(x) ~ x / sqrt(x^2 + pi/4)``)

    mu_i = E[sign(g_B,i)] = sign(g_i) beta_i,   beta_i = (1 + pi r_i / (2B))^(-1/2),
    r_i = (sigma_i / g_i)^2,

and the optimal step is ``eta*(B) = sum_i mu_i g_i / (sum_i H_ii + sum_{i!=j} mu_i mu_j H_ij)``.
The mean-field step replaces every ``r_i`` by one ``kappa^2``.

**Which mean kappa^2 is.** Here ``kappa^2`` is the *sign-matched* mean at the training batch
size ``B``: the value for which the mean-field descent term equals the per-coordinate one,

    sum_i |g_i| beta(kappa^2, B) = sum_i |g_i| beta_i(B) = A
    =>  kappa^2 = (2B/pi) ((l1 / A)^2 - 1),     l1 = sum_i |g_i|,
        A = sum_i g_i^2 / sqrt(g_i^2 + pi sigma_i^2 / (2B)).

It is a ``|g|``-weighted generalised mean of the ``r_i`` (the ``beta``-mean): ``sum_i
sigma_i^2/|g_i| / sum_i |g_i|`` (``|g|``-weighted arithmetic) for ``B >> pi r_i``, and
``(sum_i |g_i| / sum_i g_i^2/sigma_i)^2`` for ``B << pi r_i``. Reasons: the descent term is the
only part of ``eta*`` that depends on the noise alone, it is what makes Adam's lr grow like
``sqrt(B)``, and with it the diagonal-Hessian optimum ``sum_i mu_i g_i / sum_i H_ii`` is exact at
``B``. ``B_simple = sum sigma^2 / sum g^2`` (``g^2``-weighted) is a different mean; it is
reported beside it. The mismatch at other batch sizes is reported too
(:attr:`AdamNoiseResult.alignment_table`: mean-field against the per-coordinate sums, with
``beta_i`` and with the exact Gaussian ``erf(|g_i|/sigma_i sqrt(B/2))``).

**Population quantities.** ``sign(g)`` and ``l1`` are properties of the population gradient.
They are estimated from a held-out batch of ``n`` examples (or over steps by
:class:`gradstats.moments.GradientSignEMA`). Per coordinate the mean ``m`` has variance
``s^2 = sigma^2 (1/n - 1/M)``; ``|m|`` overestimates ``|g|`` by ``s b(|g|/s)``,
``b(x) = 2 phi(x) - 2x Phi(-x)`` (``0.80 s`` at ``g = 0``), so ``|g|`` is estimated by
``|m| - s b(|m|/s)`` (:func:`gradstats.moments.abs_mean_debiased`: bias ``<= 0.47 s`` at
``g = 0``, ``<= 0.1 s`` for ``|g| > s/2``, exponentially small for ``|g| >> s``;
``sqrt(m^2 - s^2)``, the other obvious choice, is biased by ``-s^2/(2|g|)`` even at high
signal). Smooth functions ``f`` of ``g`` (the ``A`` terms) get the second-order correction
``f(m) - s^2 f''(m) / 2``.
``P(sign(m) != sign(g)) = Phi(-|m|/s)``; their sum is reported.

**Curvature** (:class:`AdamNoiseEstimator`), from Hessian-vector products
(:func:`gradstats.curvature.hvp`): the batch is split into ``K`` groups of independent
examples; on group ``j`` (Hessian ``H_j`` of its mean loss, ``E H_j = H``) a Rademacher probe
``z_j`` gives ``t_j = z_j^T H_j z_j`` (``E t_j = tr H``, Hutchinson) and ``q_j = s^T H_j s``;
``sum_{i!=j} sign(g_i g_j) H_ij = s^T H s - tr H``. Then

    beta_noise = sqrt(tr H / (s^T H s - tr H))          (tr H > 0, s^T H s > tr H)
    eta_max    = l1 / (2 sqrt(tr H (s^T H s - tr H)))
    B_peak     = pi kappa^2 beta_noise^2 / (2 (1 - beta_noise^2))    (beta_noise < 1)
    B_noise-2  = pi kappa^2 tr H / (2 s^T H s)           (= E_min / S_min of sign descent)

Every value's standard error is the delete-one-group jackknife over the ``K`` groups (``K - 1``
degrees of freedom), which carries the sampling of the examples, of the probes and their
correlations between the gradient and the curvature sides. ``B_peak`` is a ratio whose
denominator ``s^T H s - 2 tr H`` is often barely resolved: its error is carried by
``1 / B_peak`` (smooth, ``<= 0`` for "no peak") and :meth:`AdamNoiseResult.b_peak_interval`.
``s`` is held fixed: the curvature values are those of the sign vector used.

[S24] shared/seeds/001 (Su 2024, mean-field sign descent). [L24] Li et al. 2024, "Surge
Phenomenon in Optimal Learning Rate and Batch Size Scaling".
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from . import scaling as sc
from .curvature import _batch_size, _params_list, _slice, hvp
from .moments import (
    _SQRT2,
    CoordinateNoise,
    abs_mean_debiased,
    coordinate_noise,
    per_example_moments,
)

__all__ = [
    "AdamNoiseEstimator",
    "AdamNoiseResult",
    "Estimate",
    "adam_preconditioner",
    "restoring_buffers",
    "sign_alignment",
    "sign_matched_kappa2",
    "summarise_groups",
]


# ------------------------------------------------------------------------------ population
def _aligned_terms(mean: torch.Tensor, var_mean: torch.Tensor, sigma2: torch.Tensor,
                   batch_size: float, kind: Literal["beta", "erf"]) -> torch.Tensor:
    """Per coordinate ``|g| beta_i(B)`` (``kind="beta"``: ``g^2 / sqrt(g^2 + a)``,
    ``a = pi sigma^2 / (2B)``) or ``|g| erf(|g| / tau)`` (``tau = sigma sqrt(2/B)``), evaluated
    at ``m`` with the correction ``- s^2 f''(m) / 2``."""
    m, v = mean.double(), var_mean.double().clamp_min(0)
    sig2 = sigma2.double().clamp_min(0)
    if kind == "beta":
        a = math.pi * sig2 / (2.0 * batch_size)
        d = m * m + a
        ok = d > 0
        d = torch.where(ok, d, torch.ones_like(d))
        f = torch.where(ok, m * m / d.sqrt(), torch.zeros_like(m))
        f2 = a * (2.0 * a - m * m) / d.pow(2.5)
    else:
        tau = (sig2 * (2.0 / batch_size)).sqrt()
        ok = tau > 0
        tau = torch.where(ok, tau, torch.ones_like(tau))
        x = m / tau
        f = torch.where(ok, m * torch.erf(x), m.abs())
        f2 = 4.0 / (math.sqrt(math.pi) * tau) * torch.exp(-x * x) * (1.0 - x * x)
    return f - 0.5 * v * torch.where(ok, f2, torch.zeros_like(f2))


def sign_alignment(mean: torch.Tensor, var_mean: torch.Tensor, sigma2: torch.Tensor,
                   batch_size: float) -> tuple[float, float]:
    """``(sum_i |g_i| beta_i(B), sum_i |g_i| erf(|g_i|/sigma_i sqrt(B/2)))``: the expected
    descent ``sum_i E[sign(g_B,i)] g_i`` per coordinate, with the algebraic ``beta_i`` of the
    mean-field model and with the exact Gaussian ``erf``, from means ``m`` of variance
    ``var_mean`` (``var_mean = 0``: ``mean`` is the population gradient)."""
    b = sc._pos("batch_size", batch_size)
    return (float(_aligned_terms(mean, var_mean, sigma2, b, "beta").sum()),
            float(_aligned_terms(mean, var_mean, sigma2, b, "erf").sum()))


def sign_matched_kappa2(l1: float, alignment: float, batch_size: float) -> float:
    """``kappa^2 = (2B/pi) ((l1 / A)^2 - 1)``: the mean-field ``kappa^2`` for which
    ``l1 beta(kappa^2, B) = A = sum_i |g_i| beta_i(B)`` (module docstring). Estimates may give
    ``A > l1`` and so a negative value: it is returned as is (clamping would bias it)."""
    b, a, l = sc._pos("batch_size", batch_size), sc._pos("alignment", alignment), sc._pos("l1", l1)
    return 2.0 * b / math.pi * ((l / a) ** 2 - 1.0)


# ------------------------------------------------------------------------------ Adam state
def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]
                        ) -> list[torch.Tensor]:
    """``P = 1 / (sqrt(v_hat) + eps)`` per parameter from an Adam/AdamW state,
    ``v_hat = v / (1 - beta2^step)`` (``v`` the ``max_exp_avg_sq`` under ``amsgrad``), the
    diagonal preconditioner of the step ``-lr P m_hat``."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for i, p in enumerate(params):
        g, st = group_of.get(id(p)), optimizer.state.get(p, {})
        if g is None:
            raise ValueError(f"params[{i}] is not in the optimizer's param_groups")
        key = "max_exp_avg_sq" if g.get("amsgrad") else "exp_avg_sq"
        if key not in st or "betas" not in g:
            raise ValueError(f"params[{i}] has no Adam second-moment state ({key!r}): pass an "
                             "Adam/AdamW optimizer after at least one step")
        step = float(st["step"])
        v_hat = st[key].detach().double() / (1.0 - g["betas"][1] ** step)
        out.append(1.0 / (v_hat.sqrt() + g["eps"]))
    return out


# ------------------------------------------------------------------------------ results
class Estimate(NamedTuple):
    """A measured value, its standard error (nan when not estimable) and, when the value is
    undefined (nan), why."""

    value: float
    stderr: float
    reason: str | None = None


@dataclass(frozen=True)
class AdamNoiseResult:
    """One :meth:`AdamNoiseEstimator.update`, in per-example loss units (module docstring).

    ``alignment_table`` rows ``(B', mean-field l1 beta(kappa^2, B'), sum_i |g_i| beta_i(B'),
    sum_i |g_i| erf(|g_i|/sigma_i sqrt(B'/2)))`` for ``B' = B 2^-3 .. B 2^3``: how well one
    ``kappa^2`` (matched at ``B``) stands for the per-coordinate sums elsewhere."""

    call: int
    n: int
    groups: int
    batch_size: float
    l1: Estimate
    alignment: Estimate
    kappa2: Estimate
    b_simple: Estimate
    b_precond: Estimate
    """``tr(P Sigma) / (g^T P g)``, ``P`` Adam's ``1/(sqrt(v_hat)+eps)``: the noise scale of
    the preconditioned step when ``P H ~ I`` (nan without an optimizer)."""
    tr_h: Estimate
    s_h_s: Estimate
    off_h: Estimate
    """``sum_{i!=j} sign(g_i g_j) H_ij = s^T H s - tr H``."""
    off_ratio: Estimate
    """``off_h / tr_h`` (``1 / beta_noise^2`` when positive): the shape of the curve."""
    beta_noise: Estimate
    eta_max: Estimate
    lr_inf: Estimate
    """``l1 / s^T H s``: the optimal sign-descent lr as ``B -> inf``."""
    inv_b_peak: Estimate
    """``1 / B_peak = 2 (s^T H s - 2 tr H) / (pi kappa^2 tr H)``: a smooth function of the
    sums whose error is honest where ``B_peak``'s is not; ``<= 0`` means no peak."""
    b_peak: Estimate
    """``1 / inv_b_peak`` where positive, delta-method error."""
    b_noise2: Estimate
    alignment_table: tuple[tuple[float, float, float, float], ...]
    sign_flips_expected: float
    """``sum_k Phi(-|m_k| / s_k)``: coordinates whose batch sign is expected to be wrong."""
    coordinates: int

    def b_peak_interval(self, z: float = 1.96) -> tuple[float, float]:
        """``B_peak`` from ``inv_b_peak -/+ z se``, inverted: ``(lo, inf)`` when the upper end
        of the interval says "no peak" is possible; ``(nan, nan)`` when undefined."""
        inv = self.inv_b_peak
        if inv.reason is not None or not math.isfinite(inv.stderr):
            return (math.nan, math.nan)
        lo, hi = inv.value - z * inv.stderr, inv.value + z * inv.stderr
        if hi <= 0:
            return (math.inf, math.inf)
        return (1.0 / hi, math.inf if lo <= 0 else 1.0 / lo)

    def optimal_lr(self, batch_size: float) -> float:
        """``eta*(B)`` of the measured curve, :func:`gradstats.scaling.adam_sign_descent_lr`
        (its ValueError where the sums are not usable)."""
        return sc.adam_sign_descent_lr(self.l1.value, self.tr_h.value, self.s_h_s.value,
                                       self.kappa2.value, batch_size)

    def rule_params(self) -> dict[str, float]:
        """``kappa2`` and ``off_ratio`` for the "adam-sign-descent" rule of
        :class:`~gradstats.schedulers.BatchSizeRuleLR` and
        :class:`~gradstats.schedulers.BatchSizeController`."""
        return {"kappa2": self.kappa2.value, "off_ratio": self.off_ratio.value}


_GRID = tuple(2.0 ** k for k in range(-3, 4))
_NAMES = ("l1", "alignment", "kappa2", "b_simple", "b_precond", "tr_h", "s_h_s", "off_h",
          "off_ratio", "beta_noise", "eta_max", "lr_inf", "inv_b_peak", "b_noise2")


def _gradient_row(cn: CoordinateNoise, B: float, precond: torch.Tensor | None
                  ) -> dict[str, float]:
    l1 = float(abs_mean_debiased(cn.mean, cn.var_mean).sum())
    align = float(_aligned_terms(cn.mean, cn.var_mean, cn.sigma2, B, "beta").sum())
    tr, g2 = float(cn.sigma2.sum()), float(cn.g2.sum())
    row = {"l1": l1, "alignment": align, "tr_sigma": tr, "g2": g2,
           "b_simple": tr / g2 if g2 > 0 else math.nan, "b_precond": math.nan}
    if precond is not None:
        num, den = float(precond @ cn.sigma2), float(precond @ cn.g2)
        row["b_precond"] = num / den if den > 0 else math.nan
    return row


def _derive(row: dict[str, float], B: float) -> dict[str, tuple[float, str | None]]:
    """Every reported quantity of one (full or delete-one-group) row, with why it is nan."""
    l1, a, t, q = row["l1"], row["alignment"], row["tr_h"], row["s_h_s"]
    nan = math.nan
    out: dict[str, tuple[float, str | None]] = {
        "l1": (l1, None), "alignment": (a, None), "tr_h": (t, None), "s_h_s": (q, None),
        "off_h": (q - t, None),
        "b_simple": (row["b_simple"], None if row["b_simple"] == row["b_simple"]
                     else "|G|^2 estimate <= 0"),
        "b_precond": (row["b_precond"], None if row["b_precond"] == row["b_precond"]
                      else "no optimizer state, or g^T P g estimate <= 0")}
    k2 = (sign_matched_kappa2(l1, a, B), None) if l1 > 0 and a > 0 else \
        (nan, "sum |g| or the sign alignment estimate <= 0: kappa^2 undefined")
    out["kappa2"] = k2
    if k2[1] is None and k2[0] < 0:  # the derived values need kappa^2 >= 0
        k2 = (nan, "kappa^2 estimate < 0 (sum |g| below the sign alignment)")
    curv = None if t > 0 and q > 0 else ("tr(H) estimate <= 0" if not t > 0
                                         else "s^T H s estimate <= 0")
    out["off_ratio"] = ((q - t) / t, None) if t > 0 else (nan, "tr(H) estimate <= 0")
    # 1/B_peak = 2 (s^T H s - 2 tr H) / (pi kappa^2 tr H): smooth through "no peak" (<= 0)
    out["inv_b_peak"] = (2.0 * (q - 2.0 * t) / (math.pi * k2[0] * t), None) \
        if t > 0 and k2[1] is None and k2[0] > 0 else (nan, "tr(H) or kappa^2 estimate <= 0")
    out["lr_inf"] = (l1 / q, None) if curv is None else (nan, curv)
    out["b_noise2"] = (sc.adam_b_noise2_from_sums(k2[0], t, q), None) if curv is None and \
        k2[1] is None else (nan, curv or k2[1])
    if curv is None and q <= t:
        curv = ("s^T H s <= tr(H): sum_{i!=j} sign(g_i g_j) H_ij <= 0, no beta_noise (the "
                "optimal lr rises with B, no surge)")
    if curv is None:
        out["beta_noise"] = (sc.adam_beta_noise(t, q), None)
        out["eta_max"] = (sc.adam_eta_max(l1, t, q), None) if l1 > 0 else (nan, "sum |g| <= 0")
    else:
        for k in ("beta_noise", "eta_max"):
            out[k] = (nan, curv)
    return out


def _b_peak(inv: Estimate, beta_noise: Estimate) -> Estimate:
    """``B_peak = 1 / inv_b_peak``, its error by the delta method ``se(1/x) = se(x)/x^2``
    (meaningful while ``inv_b_peak`` is well away from 0; see
    :meth:`AdamNoiseResult.b_peak_interval`)."""
    if beta_noise.reason is not None:
        return Estimate(math.nan, math.nan, beta_noise.reason)
    if inv.reason is not None:
        return Estimate(math.nan, math.nan, inv.reason)
    if not inv.value > 0:
        return Estimate(math.nan, math.nan,
                        "beta_noise >= 1: no peak (the optimal lr rises with B)")
    return Estimate(1.0 / inv.value, inv.stderr / inv.value ** 2, None)


def _jackknife(full: dict, loo: list[dict]) -> dict[str, Estimate]:
    K = len(loo)
    res = {}
    for k in _NAMES:
        v, why = full[k]
        xs = [r[k][0] for r in loo]
        se = math.nan
        if why is None and all(math.isfinite(x) for x in xs):
            mean = sum(xs) / K
            se = math.sqrt((K - 1) / K * sum((x - mean) ** 2 for x in xs))
        res[k] = Estimate(v, se, why)
    res["b_peak"] = _b_peak(res["inv_b_peak"], res["beta_noise"])
    return res


@contextlib.contextmanager
def restoring_buffers(model: nn.Module) -> Iterator[None]:
    """Buffers that the block's extra forwards change (BatchNorm running statistics) get back
    their values when it ends."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in saved:
                if buf.shape != old.shape or not torch.equal(buf, old):
                    buf.data = old


def _flat(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1).double() for x in xs])


def _unflat(v: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(v[i:i + p.numel()].reshape(p.shape).to(p.dtype))
        i += p.numel()
    return out


def summarise_groups(s1: torch.Tensor, s2: torch.Tensor, sizes: Sequence[int],
                     t: Sequence[float], q: Sequence[float], batch_size: float, *,
                     precond: torch.Tensor | None = None, dataset_size: int | None = None,
                     call: int = 0) -> AdamNoiseResult:
    """Every estimate from ``K`` groups of independent examples: ``s1[j]``, ``s2[j]`` ``[K, P]``
    the sums ``sum_i g_i`` and ``sum_i g_i^2`` over group ``j``'s ``sizes[j]`` examples
    (per-example loss units, e.g. from :func:`gradstats.moments.per_example_moments` or the
    monitor's per-coordinate moments), ``t[j] = z_j^T H_j z_j`` and ``q[j] = s^T H_j s`` its
    curvature probes, ``precond`` ``[P]`` (:func:`adam_preconditioner`, flattened) or None.
    Standard errors: the delete-one-group jackknife."""
    K = len(sizes)
    if K < 2 or s1.shape[0] != K or s2.shape != s1.shape or len(t) != K or len(q) != K:
        raise ValueError(f"need K >= 2 groups with s1, s2 [K, P], t and q [K]; got K={K}, "
                         f"s1 {tuple(s1.shape)}, s2 {tuple(s2.shape)}, {len(t)} t, {len(q)} q")
    B = sc._pos("batch_size", batch_size)
    nj = torch.tensor([float(x) for x in sizes], dtype=torch.float64)
    tj, qj = torch.tensor(list(t), dtype=torch.float64), torch.tensor(list(q), dtype=torch.float64)
    S1, S2, n = s1.sum(0), s2.sum(0), int(sum(sizes))
    pre = None if precond is None else precond.double().reshape(-1)

    def row(a1, a2, m, w):
        r = _gradient_row(coordinate_noise(a2, a1 / m, m, None, dataset_size), B, pre)
        r["tr_h"], r["s_h_s"] = float(w @ tj / w.sum()), float(w @ qj / w.sum())
        return _derive(r, B)

    full = row(S1, S2, n, nj)
    loo = []
    for j in range(K):
        w = nj.clone()
        w[j] = 0.0
        loo.append(row(S1 - s1[j], S2 - s2[j], n - int(sizes[j]), w))
    est = _jackknife(full, loo)
    cn = coordinate_noise(S2, S1 / n, n, None, dataset_size)
    k2 = est["kappa2"].value
    table = []
    for f in _GRID:
        alg, erf = sign_alignment(cn.mean, cn.var_mean, cn.sigma2, B * f)
        mf = est["l1"].value * sc.adam_beta(k2, B * f) if k2 >= 0 else math.nan
        table.append((B * f, mf, alg, erf))
    s = cn.var_mean.clamp_min(0).sqrt()
    flips = torch.where(s > 0, 0.5 * torch.erfc(cn.mean.abs() / (s * _SQRT2)),
                        (cn.mean == 0).double() * 0.5)
    return AdamNoiseResult(call=call, n=n, groups=K, batch_size=B, **est,
                           alignment_table=tuple(table), sign_flips_expected=float(flips.sum()),
                           coordinates=int(S1.numel()))


# ------------------------------------------------------------------------------ estimator
class AdamNoiseEstimator:
    """Online ``kappa^2``, ``sum |g|``, the sign-descent curvature sums and from them
    ``beta_noise``, Adam's ``eta_max``, ``B_peak`` and ``B_noise-2`` (module docstring), on a
    batch of independent (held-out or fresh) examples every ``every`` steps; the forwards and
    backwards run inside ``monitor.paused()``. Not the SGD ``B_noise`` of
    :class:`gradstats.curvature.CurvatureEstimator`.

    Typical use::

        est = AdamNoiseEstimator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                                 batch_size=B, every=200, monitor=monitor)
        for step, batch in enumerate(loader):
            ...  # the training step
            res = est.maybe_update(step, next(heldout), optimizer=opt)
        # res.kappa2, res.beta_noise, res.eta_max, res.b_peak: Estimate(value, stderr, reason)
        # res.optimal_lr(B2); BatchSizeRuleLR(opt, "adam-sign-descent", B, **res.rule_params())

    Args:
        model: the model; its trainable parameters (or ``params``) define ``g`` and ``H``.
        loss_fn: ``loss_fn(model, batch) -> scalar``, the mean loss over the batch's examples
            (``reduction="sum"``: the sum). It is also called on single examples.
        batch_size: the training batch size ``B`` that ``kappa^2`` is matched at.
        groups: ``K`` groups of the batch for the jackknife and the curvature probes (memory:
            ``16 K P`` bytes for the group sums of ``P`` parameters).
        probes: Rademacher probes per group for ``tr H``.
        method, eps: how Hessian-vector products are formed (:func:`gradstats.curvature.hvp`).
        monitor: a :class:`gradstats.GradStatsMonitor`, paused while measuring.
        dataset_size: ``M`` when the batch is drawn without replacement from ``M`` examples.
        chunk_size: examples per ``vmap`` call of :func:`~gradstats.moments.per_example_moments`.
        seed: seeds the probes.

    Cost per call: one per-example gradient pass over the batch (``torch.func``) and
    ``1 + probes`` Hessian-vector products on each group (together ``1 + probes`` on the batch).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], *,
                 batch_size: float, params: Iterable[torch.Tensor] | None = None,
                 groups: int = 16, probes: int = 1, every: int = 1,
                 method: Literal["auto", "double", "finite"] = "auto", eps: float | None = None,
                 monitor: Any = None, reduction: Literal["mean", "sum"] = "mean",
                 dataset_size: int | None = None, chunk_size: int | None = None,
                 seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(model, batch)")
        for name, v, lo in (("groups", groups, 2), ("probes", probes, 1), ("every", every, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if monitor is not None and not callable(getattr(monitor, "paused", None)):
            raise ValueError("monitor must have a paused() context manager (a GradStatsMonitor)")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if method not in ("auto", "double", "finite"):
            raise ValueError(f"method must be 'auto', 'double' or 'finite', got {method!r}")
        self.model, self.loss_fn, self.monitor = model, loss_fn, monitor
        self.batch_size = sc._pos("batch_size", batch_size)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.params = _params_list(list(params))
        self.groups, self.probes, self.every = groups, probes, every
        self.method, self.eps, self.reduction = method, eps, reduction
        self.dataset_size, self.chunk_size = dataset_size, chunk_size
        self._gen = torch.Generator().manual_seed(int(seed))
        self.calls = 0
        self.last: AdamNoiseResult | None = None

    def maybe_update(self, step: int, batch: Any, **kwargs: Any) -> AdamNoiseResult | None:
        """:meth:`update` when ``step % every == 0``, else None."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        return None if step % self.every else self.update(batch, **kwargs)

    def update(self, batch: Any, *, sign: Sequence[torch.Tensor] | None = None,
               optimizer: torch.optim.Optimizer | None = None,
               batch_size: float | None = None) -> AdamNoiseResult:
        """Measure on ``batch`` (a tensor or nested tuple/list/dict of tensors, examples along
        dim 0, independent of each other). ``sign``: the sign vector ``s`` (one tensor per
        parameter, e.g. :meth:`gradstats.moments.GradientSignEMA.sign`); default the sign of
        this batch's mean gradient. ``optimizer``: an Adam/AdamW whose state gives ``b_precond``.
        ``batch_size`` overrides the constructor's ``B`` for this call."""
        n = _batch_size(batch, "batch")
        K = self.groups
        if n < K:
            raise ValueError(f"batch has {n} examples, fewer than groups={K}")
        B = self.batch_size if batch_size is None else sc._pos("batch_size", batch_size)
        pre = None if optimizer is None else _flat(adam_preconditioner(optimizer, self.params))
        bounds = [n * j // K for j in range(K + 1)]
        parts = [_slice(batch, slice(a, b)) for a, b in zip(bounds, bounds[1:])]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        pause = self.monitor.paused() if self.monitor is not None else contextlib.nullcontext()
        with pause, restoring_buffers(self.model), torch.enable_grad():
            sums = [per_example_moments(self.model, self.loss_fn, part, self.params,
                                        self.chunk_size)[:2] for part in parts]
            s1 = torch.stack([a for a, _ in sums])
            s2 = torch.stack([b for _, b in sums])
            s = torch.where(s1.sum(0) >= 0, 1.0, -1.0).double() if sign is None \
                else self._sign(sign)
            t, q = zip(*(self._curvature(part, size, s) for part, size in zip(parts, sizes)))
        self.calls += 1
        self.last = summarise_groups(s1, s2, sizes, t, q, B, precond=pre,
                                     dataset_size=self.dataset_size, call=self.calls)
        return self.last

    def _sign(self, sign: Sequence[torch.Tensor]) -> torch.Tensor:
        xs = list(sign)
        if len(xs) != len(self.params) or any(x.shape != p.shape for x, p in
                                               zip(xs, self.params)):
            raise ValueError("sign must hold one tensor per parameter, shaped like it")
        v = _flat(xs).to(self.params[0].device)
        if not bool(((v == 1) | (v == -1)).all()):
            raise ValueError("sign must hold only +1 and -1")
        return v

    def _loss(self, batch: Any, size: int) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        loss = loss.reshape(())
        return loss / size if self.reduction == "sum" else loss

    def _curvature(self, part: Any, size: int, s: torch.Tensor) -> tuple[float, float]:
        """``(mean over probes of z^T H_j z, s^T H_j s)`` on one group, every product from the
        same RNG state (the same dropout masks)."""
        dev = self.params[0].device
        cuda = [dev.index or 0] if dev.type == "cuda" else []

        def quad(v: torch.Tensor) -> float:
            vs = _unflat(v, self.params)
            with torch.random.fork_rng(devices=cuda):  # each product leaves the RNG as it was
                loss = None if self.method == "finite" else self._loss(part, size)
                hv = hvp(loss, self.params, vs, method=self.method, eps=self.eps,
                         closure=lambda: self._loss(part, size))
            return float(_flat(hv) @ _flat(vs))

        zs = [(torch.randint(0, 2, (s.numel(),), generator=self._gen, dtype=torch.float64) * 2
               - 1).to(dev) for _ in range(self.probes)]
        return sum(quad(z) for z in zs) / self.probes, quad(s)
