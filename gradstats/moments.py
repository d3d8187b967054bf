"""Per-coordinate second moments of per-example gradients, and the per-coordinate noise.

For a parameter ``theta`` and examples ``b`` with per-example gradients ``u_b`` (what autograd
propagates for example ``b``), the functions here return, for every element ``k`` of
``theta``,

    M2[k] = sum_b w_b u_b[k]^2          (w_b = 1 unless ``weights`` is given)

from what the layer saw (its input ``A`` and output gradient ``G``) without forming the
``B x P`` per-example gradients where the layer allows. ``weights = 1/c_b^2`` (``c_b`` the
example's loss scale, see :mod:`gradstats.units`) puts ``M2`` in per-example loss units, as the
monitor's norms are. Sums run in the inputs' precision (at least float32, float64 for float64
inputs).

- Linear, one position per example: ``M2_W = (w G∘G)^T (A∘A)``, one GEMM; ``M2_b = sum_b w_b
  g_b^2``.
- Linear over ``T`` positions: ``u_b = G_b^T A_b``, formed for a chunk of examples at a time
  (one batched GEMM, at most ``max_bytes`` of tiles) and squared before the next chunk, like the
  direct route of ``csrc/cpu/linear.cpp``. The Gram route has no per-coordinate analogue
  cheaper than this (``sum_{t,s} (g_t∘g_s)(a_t∘a_s)^T`` costs ``T`` times more). Convolutions
  fit here through their unfold view (``A`` the patches, ``T`` the output positions).
- Embedding: each example's gradient is nonzero in the rows of the ids it used,
  ``u_b[v] = s_v sum_{t: x_bt = v} g_bt``; one sort groups positions by (example, id) and
  ``F.embedding_bag`` forms the segment sums (``O(B T d)``, nothing ``B x V``).
- Norm layers (LayerNorm, RMSNorm, GroupNorm, InstanceNorm, eval BatchNorm): the per-example
  ``dgamma_b``, ``dbeta_b`` ``[B, K]`` that their rule already forms (:func:`dense_sq_moments`).

The norm layers' rule gives the per-example ``dgamma_b``, ``dbeta_b``; the other
functions form none.

:func:`coordinate_noise` turns ``M2`` and the batch gradient into each coordinate's unbiased
variance ``sigma_k^2`` and squared mean ``g_k^2``, the per-coordinate form of
:func:`gradstats.estimators.step_estimate` (same weighted-mean estimator, same units), so that
``sum_k sigma_k^2`` and ``sum_k g_k^2`` are the monitor's ``tr(Sigma)`` and ``|G|^2``.
Population values: :func:`abs_mean_debiased` (``|g_k|`` from a mean of known variance) and
:class:`GradientSignEMA` (``sign(g)`` with its confidence, over steps).
:func:`per_example_moments` is the ``torch.func`` route for any model (it forms per-example
gradients, a chunk at a time).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .rules.base import compute_dtype
from .rules.registry import rule_for

__all__ = [
    "CoordinateNoise",
    "GradientSignEMA",
    "abs_mean_debiased",
    "coordinate_noise",
    "dense_sq_moments",
    "embedding_sq_moments",
    "linear_sq_moments",
    "norm_sq_moments",
    "per_example_moments",
]

#: default bound on the per-example tiles formed at once by :func:`linear_sq_moments`
TILE_BYTES = 16 << 20


def _weights(weights: torch.Tensor | None, B: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor | None:
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or weights.shape != (B,):
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights)
        raise ValueError(f"weights must be a [B] = [{B}] tensor (one per example), got {shape}")
    return weights.to(device=device, dtype=dtype)


def linear_sq_moments(A: torch.Tensor, G: torch.Tensor, weights: torch.Tensor | None = None, *,
                      bias: bool = True, max_bytes: int = TILE_BYTES
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(M2_W [d_out, d_in], M2_b [d_out] or None)``: ``sum_b w_b u_b^2`` elementwise for a
    Linear with input ``A`` ``[B, ..., d_in]`` and output gradient ``G`` ``[B, ..., d_out]``
    (the middle dims flattened into ``T``), ``u_b = sum_t g_bt a_bt^T`` and bias
    ``sum_t g_bt``."""
    if A.dim() < 2 or G.dim() != A.dim() or A.shape[:-1] != G.shape[:-1]:
        raise ValueError(f"A [B, ..., d_in] and G [B, ..., d_out] must agree on every dim but the "
                         f"last, got {tuple(A.shape)} and {tuple(G.shape)}")
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
    dt = compute_dtype(A, G)
    B, d_in, d_out = A.shape[0], A.shape[-1], G.shape[-1]
    a = A.reshape(B, A.shape[1:-1].numel(), d_in).to(dt)
    g = G.reshape(B, G.shape[1:-1].numel(), d_out).to(dt)
    w = _weights(weights, B, dt, A.device)
    T = a.shape[1]
    if T == 1:
        g2 = g[:, 0].square()
        if w is not None:
            g2 = g2 * w[:, None]
        return g2.t() @ a[:, 0].square(), g2.sum(0) if bias else None
    m2 = torch.zeros(d_out, d_in, dtype=dt, device=A.device)
    chunk = max(1, max_bytes // max(1, d_out * d_in * a.element_size()))
    for b0 in range(0, B, chunk):
        tiles = torch.bmm(g[b0:b0 + chunk].transpose(1, 2), a[b0:b0 + chunk]).square_()
        if w is not None:
            tiles.mul_(w[b0:b0 + chunk, None, None])
        m2 += tiles.sum(0)
    mb = None
    if bias:
        s2 = g.sum(1).square()
        mb = (s2 * w[:, None] if w is not None else s2).sum(0)
    return m2, mb


def dense_sq_moments(per_example: torch.Tensor, weights: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """``sum_b w_b u_b^2`` from explicit per-example gradients ``[B, ...]`` (small parameters:
    the norm layers' ``dgamma_b``, ``dbeta_b``)."""
    u = per_example.to(compute_dtype(per_example))
    w = _weights(weights, u.shape[0], u.dtype, u.device)
    sq = u.square()
    if w is not None:
        sq = sq * w.reshape(-1, *([1] * (u.dim() - 1)))
    return sq.sum(0)


def norm_sq_moments(module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor,
                    weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"weight": M2, "bias": M2}`` (each shaped like the parameter) of a normalisation
    layer with input ``x`` and output gradient ``grad_output``, from the per-example
    ``dgamma_b``, ``dbeta_b`` of its layer rule."""
    rule = rule_for(module)
    if rule is None or not hasattr(rule, "per_example"):
        raise ValueError(f"{type(module).__name__} has no normalisation-layer rule (LayerNorm, "
                         "RMSNorm, GroupNorm, InstanceNorm, BatchNorm in eval mode)")
    return {k: dense_sq_moments(v, weights).reshape(getattr(module, k).shape)
            for k, v in rule.per_example(module, x, grad_output).items()}


def embedding_sq_moments(ids: torch.Tensor, G: torch.Tensor, num_embeddings: int,
                         weights: torch.Tensor | None = None, *, padding_idx: int | None = None,
                         scale_grad_by_freq: bool = False) -> torch.Tensor:
    """``[V, d]``: ``sum_b w_b u_b[v]^2`` for an embedding table with ids ``[B, ...]`` and
    output gradient ``G`` ``[B, ..., d]``; ``u_b[v] = s_v sum_{t: x_bt = v} g_bt``, positions
    holding ``padding_idx`` contribute nothing, ``s_v = 1/c_v`` (``c_v`` the count of ``v`` in
    the whole batch) under ``scale_grad_by_freq``, else 1."""
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"ids must be integer, got {ids.dtype}")
    if G.shape[:-1] != ids.shape or ids.dim() < 1:
        raise ValueError(f"G must be ids.shape + [d] with a batch dim first, got ids "
                         f"{tuple(ids.shape)} and G {tuple(G.shape)}")
    V, B, d = int(num_embeddings), ids.shape[0], G.shape[-1]
    dt = compute_dtype(G)
    flat = ids.reshape(-1).long()
    g = G.reshape(-1, d).to(dt)
    example = torch.arange(B, device=ids.device).repeat_interleave(flat.numel() // B)
    key = example * V + flat
    if padding_idx is not None:
        key = key.masked_fill(flat == padding_idx, B * V)  # one segment past the real ones
    sorted_keys, order = torch.sort(key)
    keys, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    sums = F.embedding_bag(order, g, counts.cumsum(0) - counts, mode="sum")
    real = keys < B * V
    keys, sq = keys[real], sums[real].square()
    rows = keys.remainder(V)
    if scale_grad_by_freq:
        c = torch.bincount(flat, minlength=V).to(dt).clamp_min(1)
        sq = sq / c[rows, None].square()
    w = _weights(weights, B, dt, ids.device)
    if w is not None:
        sq = sq * w[keys // V, None]
    return torch.zeros(V, d, dtype=dt, device=G.device).index_add_(0, rows, sq)


# ------------------------------------------------------------------------------ noise
@dataclass(frozen=True)
class CoordinateNoise:
    """Per-coordinate noise of one parameter, in per-example loss units.

    ``sigma2[k]``: unbiased variance of one example's gradient; ``g2[k]``: unbiased
    ``g_k^2`` (may be negative); ``mean[k]``: the (weighted) batch-mean gradient; ``var_mean[k]
    = sigma2[k] (sum w^2 - 1/M)``: the variance of ``mean[k]`` about the population ``g_k``."""

    mean: torch.Tensor
    sigma2: torch.Tensor
    g2: torch.Tensor
    var_mean: torch.Tensor


def coordinate_noise(sum_sq: torch.Tensor, mean: torch.Tensor, n: int,
                     weights_sq: float | None = None, dataset_size: int | None = None
                     ) -> CoordinateNoise:
    """Each coordinate's unbiased ``sigma_k^2`` and ``g_k^2`` from ``sum_sq = sum_i g_ik^2``
    (per-example loss units, e.g. ``M2`` with ``weights = 1/c_i^2``) and the weighted mean
    gradient ``mean = sum_i w_i g_i`` (``sum w_i = 1``; ``p.grad / sum_i c_i``):

        sigma_k^2 = (sum_sq_k / n - mean_k^2) / (1 - sum w^2)
        g_k^2     = mean_k^2 - sigma_k^2 (sum w^2 - 1/M)

    since ``E[sum_sq_k / n] = g_k^2 + sigma_k^2`` and ``E[mean_k^2] = g_k^2 + sigma_k^2 sum
    w^2`` (``sum w^2 = 1/n`` when ``weights_sq`` is None: the usual ``n - 1`` divisor;
    ``1/M = 0`` without ``dataset_size``, as in :func:`~gradstats.estimators.step_estimate`)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2 (a variance needs two examples), got {n!r}")
    if sum_sq.shape != mean.shape:
        raise ValueError(f"sum_sq and mean must have the same shape, got {tuple(sum_sq.shape)} "
                         f"and {tuple(mean.shape)}")
    w2 = 1.0 / n if weights_sq is None else float(weights_sq)
    if not (1.0 / n) * (1 - 1e-12) <= w2 < 1.0:
        raise ValueError(f"weights_sq must lie in [1/n, 1) for weights summing to 1, got {w2!r}")
    inv_m = 0.0
    if dataset_size is not None:
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or \
                dataset_size < n:
            raise ValueError(f"dataset_size must be an int >= n = {n}, got {dataset_size!r}")
        inv_m = 1.0 / dataset_size
    m = mean.double()
    sigma2 = (sum_sq.double() / n - m.square()) / (1.0 - w2)
    shrink = w2 - inv_m
    return CoordinateNoise(mean=m, sigma2=sigma2, g2=m.square() - sigma2 * shrink,
                           var_mean=sigma2.clamp_min(0) * shrink)


# ------------------------------------------------------------------------------ population
_SQRT2 = math.sqrt(2.0)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def abs_mean_debiased(mean: torch.Tensor, var_mean: torch.Tensor) -> torch.Tensor:
    """``|g_k|`` estimated from means ``m_k ~ N(g_k, s_k^2)`` (``s_k^2 = var_mean``):
    ``|m| - s b(|m|/s)``, ``b(x) = 2 phi(x) - 2 x Phi(-x)`` being the bias of ``|m|``
    (``0.80 s`` at ``g = 0``). No unbiased estimator of ``|g|`` exists; this one is biased by at
    most ``0.47 s`` (at ``g = 0``), by ``<= 0.1 s`` for ``|g| > s/2`` and exponentially little for
    ``|g| >> s`` (``sqrt(m^2 - s^2)`` is biased by ``-s^2/(2|g|)`` even there). May be slightly
    negative; sums of it are what it is for."""
    a = mean.double().abs()
    s = var_mean.double().clamp_min(0).sqrt()
    x = torch.where(s > 0, a / s.clamp_min(1e-300), torch.zeros_like(a))
    bias = 2.0 * _phi(x) - x * torch.erfc(x / _SQRT2)
    return torch.where(s > 0, a - s * bias, a)


class GradientSignEMA:
    """The population ``sign(g)`` and ``|g|`` from an EMA over steps of the batch gradient.

    Per step ``x_t`` (the mean gradient in per-example loss units: ``p.grad`` for a mean loss,
    ``p.grad / sum_i c_i`` in general) enters bias-corrected weights ``w_t``;
    ``m = sum_t w_t x_t`` and its variance ``C / (n_eff - 1)`` (``C`` the weighted central
    second moment of the ``x_t``, ``n_eff = 1 / sum w^2``) as in
    :class:`gradstats.estimators.NoiseScaleEMA`. It assumes the steps' gradients share one
    mean: drift of the parameters inflates the variance (the confidence is conservative) and
    makes ``m`` lag. Memory: two copies of the parameters, float64."""

    def __init__(self, params: Iterable[torch.Tensor], beta: float = 0.9) -> None:
        self.params = list(params)
        if not self.params or not all(isinstance(p, torch.Tensor) for p in self.params):
            raise ValueError("params must be a non-empty iterable of tensors")
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < 1:
            raise ValueError(f"beta must be a real number in (0, 1), got {beta!r}")
        self.beta = float(beta)
        self.steps, self._w, self._w2 = 0, 0.0, 0.0
        self._m = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        self._c = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]

    def update(self, grads: Sequence[torch.Tensor] | None = None, scale: float = 1.0) -> None:
        """Add one step: ``grads`` (default each parameter's ``.grad``) divided by ``scale``."""
        gs = [p.grad for p in self.params] if grads is None else list(grads)
        if len(gs) != len(self.params) or any(g is None for g in gs):
            raise ValueError("grads must hold one tensor per parameter (a .grad is None?)")
        a = 1.0 - self.beta
        self._w = self.beta * self._w + a
        self._w2 = self.beta * self.beta * self._w2 + a * a
        f = a / self._w
        for m, c, g in zip(self._m, self._c, gs):
            x = g.detach().double() / float(scale)
            d = x - m
            m.add_(f * d)
            c.mul_(self.beta).add_(a * d * (x - m))  # West's weighted update
        self.steps += 1

    def _var(self) -> list[torch.Tensor]:
        n_eff = self._w * self._w / self._w2 if self.steps else 0.0
        if self.steps < 2 or not n_eff > 1:
            return [torch.full_like(m, math.inf) for m in self._m]
        return [c / (self._w * (n_eff - 1.0)) for c in self._c]

    def mean(self) -> list[torch.Tensor]:
        """The smoothed gradient ``m`` per parameter (float64)."""
        return [m.clone() for m in self._m]

    def var_mean(self) -> list[torch.Tensor]:
        """The variance of ``m`` about ``g`` per coordinate (inf before two steps)."""
        return self._var()

    def sign(self) -> list[torch.Tensor]:
        """``sign(m)`` per parameter, ``+1`` where ``m = 0``."""
        return [torch.where(m >= 0, 1.0, -1.0).to(m) for m in self._m]

    def flip_probability(self) -> list[torch.Tensor]:
        """``P(sign(m) != sign(g)) = Phi(-|m| / s)`` per coordinate (0.5 before two steps)."""
        return [0.5 * torch.erfc(m.abs() / (v.sqrt() * _SQRT2)) for m, v in
                zip(self._m, self._var())]

    def abs_debiased(self) -> list[torch.Tensor]:
        """``|g|`` per coordinate, :func:`abs_mean_debiased` of the EMA."""
        return [abs_mean_debiased(m, v.nan_to_num(posinf=0.0)) for m, v in
                zip(self._m, self._var())]

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "steps": self.steps, "w": self._w, "w2": self._w2,
                "m": [m.clone() for m in self._m], "c": [c.clone() for c in self._c]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["m"]) != len(self._m) or any(
                a.shape != b.shape for a, b in zip(state["m"], self._m)):
            raise ValueError("state does not match these parameters (count or shapes)")
        self.beta, self.steps, self._w, self._w2 = (float(state["beta"]), int(state["steps"]),
                                                    float(state["w"]), float(state["w2"]))
        self._m = [x.to(m).clone() for x, m in zip(state["m"], self._m)]
        self._c = [x.to(m).clone() for x, m in zip(state["c"], self._m)]


# ------------------------------------------------------------------------------ reference route
class _LossOf(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``torch.func.functional_call`` can swap
    the parameters the loss sees."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def per_example_moments(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                        batch: Any, params: list[torch.Tensor], chunk_size: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(sum_i g_i, sum_i g_i^2, n)`` elementwise over ``params`` (flattened and concatenated,
    float64) with ``g_i`` the gradient of ``loss_fn(model, batch_i)``, ``batch_i`` example ``i``
    kept as a batch of one: per-example loss units for any model, through ``torch.func``
    (``vmap(grad)``, ``chunk_size`` examples at a time; default ``~2^23 / P``). The route for
    layers without a moment rule and for held-out batches; it forms ``chunk x P`` gradients."""
    leaves, spec = tree_flatten(batch)
    batched = [isinstance(t, torch.Tensor) and t.dim() > 0 for t in leaves]
    sizes = {int(t.shape[0]) for t, b in zip(leaves, batched) if b}
    if len(sizes) != 1:
        raise ValueError(f"batch must hold tensors that agree on a batch dim 0, got sizes "
                         f"{sorted(sizes) or 'none'}")
    n = sizes.pop()
    wrapper = _LossOf(model, loss_fn)
    names_of = {id(p): k for k, p in wrapper.named_parameters(remove_duplicate=False)}
    missing = [i for i, p in enumerate(params) if id(p) not in names_of]
    if missing:
        raise ValueError(f"params{missing} are not parameters of model")
    names = [names_of[id(p)] for p in params]
    P = sum(p.numel() for p in params)
    chunk = chunk_size or max(1, (1 << 23) // max(1, P))
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")

    def one(pvals: tuple[torch.Tensor, ...], *xs: torch.Tensor) -> torch.Tensor:
        it = iter(xs)
        rebuilt = [next(it).unsqueeze(0) if b else t for t, b in zip(leaves, batched)]
        loss = torch.func.functional_call(wrapper, dict(zip(names, pvals)),
                                          (tree_unflatten(rebuilt, spec),))
        return loss.reshape(())

    grad_fn = torch.func.vmap(torch.func.grad(one), in_dims=(None,) + (0,) * sum(batched),
                              randomness="different")
    dev = params[0].device
    s1 = torch.zeros(P, dtype=torch.float64, device=dev)
    s2 = torch.zeros(P, dtype=torch.float64, device=dev)
    pvals = tuple(p.detach() for p in params)
    xs = [t for t, b in zip(leaves, batched) if b]
    for i0 in range(0, n, chunk):
        g = grad_fn(pvals, *(x[i0:i0 + chunk] for x in xs))
        flat = torch.cat([x.reshape(x.shape[0], -1) for x in g], 1).double()
        s1 += flat.sum(0)
        s2 += flat.square().sum(0)
    return s1, s2, n
