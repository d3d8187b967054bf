"""Hessian-vector products for any model: double backward where autograd can differentiate the
backward pass; otherwise (``scaled_dot_product_attention`` on CPU, flash attention, custom
``once_differentiable`` functions) a central finite difference of gradients,
``H v ~ (grad(w + eps v) - grad(w - eps v)) / (2 eps)``, which needs a ``closure`` that
recomputes the loss. The finite-difference step is chosen relative to the parameters::

    eps = eps_mach(dtype) ** (1/3) * |w| / |v|      (|w| -> 1 when all parameters are 0)

i.e. the perturbation ``eps v`` has norm ``eps_mach^(1/3) |w|``: ~6e-6 |w| in float64,
~5e-3 |w| in float32 (the step that balances the ``O(eps^2)`` truncation error of the
central difference against the ``O(eps_mach / eps)`` rounding error of the gradients), with
``dtype`` the least precise parameter dtype. Expect ~1e-8 relative agreement with double
backward in float64 and ~1e-3..1e-4 in float32; half precision is not useful here.

Side effects: none on the model. ``.grad`` is never written (only ``torch.autograd.grad``
is used), the parameters are perturbed by swapping ``p.data`` and restored to the very
tensors they held (bit-exact; version counters untouched, so graphs built earlier stay
valid), and each finite-difference evaluation starts from the same RNG state (dropout masks
agree between ``w + eps v`` and ``w - eps v``; the global RNG is not advanced). Also the batch
helpers the curvature estimators share (size and halves of a batch given as a tensor, tuple or
dict).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch

from .contract import ContractError

__all__ = ["hvp", "finite_difference_eps"]

_METHODS = ("auto", "double", "finite")


# ------------------------------------------------------------------------------ helpers
def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _params_list(params: Any, name: str = "params") -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        params = [params]
    try:
        out = list(params)
    except TypeError:
        raise ValueError(f"{name} must be a tensor or an iterable of tensors, got "
                         f"{type(params).__name__}") from None
    if not out:
        raise ValueError(f"{name} is empty")
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{name}[{i}] must be a tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"{name}[{i}] does not require grad")
    if len({id(p) for p in out}) != len(out):
        raise ValueError(f"{name} holds the same tensor more than once")
    return out


def _vectors(v: Any, params: list[torch.Tensor]) -> list[torch.Tensor]:
    vs = [v] if isinstance(v, torch.Tensor) else list(v)
    if len(vs) != len(params):
        raise ValueError(f"v must hold one tensor per parameter: got {len(vs)} for "
                         f"{len(params)} parameters")
    out = []
    for i, (x, p) in enumerate(zip(vs, params)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"v[{i}] must be a tensor, got {type(x).__name__}")
        if x.shape != p.shape:
            raise ValueError(f"v[{i}] has shape {tuple(x.shape)}, its parameter "
                             f"{tuple(p.shape)}")
        out.append(x.detach().to(device=p.device, dtype=p.dtype))
    return out


def _fill(grads: Iterable[torch.Tensor | None], params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]


def _norm64(xs: list[torch.Tensor]) -> float:
    return math.sqrt(float(sum(x.detach().double().pow(2).sum() for x in xs)))


def finite_difference_eps(params: Any, v: Any) -> float:
    """The default finite-difference step of :func:`hvp`:
    ``eps_mach(dtype) ** (1/3) * |w| / |v|`` (``|w| -> 1`` when all parameters are 0), with
    ``dtype`` the least precise of the parameters' dtypes; 0 when ``v`` is 0."""
    params = _params_list(params)
    vs = _vectors(v, params)
    v_norm = _norm64(vs)
    if v_norm == 0.0:
        return 0.0
    w_norm = _norm64(params)
    rel = max(torch.finfo(p.dtype).eps for p in params) ** (1.0 / 3.0)
    return rel * (w_norm if w_norm > 0.0 else 1.0) / v_norm


def _cuda_devices(params: list[torch.Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def _hvp_double(loss: torch.Tensor, params: list[torch.Tensor],
                vs: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return _hvp_from_grads(grads, params, vs, retain_graph=False)


def _hvp_from_grads(grads, params, vs, retain_graph: bool) -> list[torch.Tensor]:
    """``H v`` from first-order gradients that carry a graph (``create_graph=True``)."""
    pairs = [(g, v) for g, v in zip(grads, vs) if g is not None and g.requires_grad]
    if not pairs:  # the gradient does not depend on the parameters: H = 0
        return [torch.zeros_like(p) for p in params]
    out = torch.autograd.grad([g for g, _ in pairs], params, grad_outputs=[v for _, v in pairs],
                              retain_graph=retain_graph, allow_unused=True)
    return _fill(out, params)


def _grad_at(closure: Callable[[], torch.Tensor], params: list[torch.Tensor],
             vs: list[torch.Tensor], step: float) -> list[torch.Tensor]:
    """Gradient of ``closure()`` at ``w + step v``; the parameters get back their own tensors."""
    orig = [p.data for p in params]
    try:
        with torch.no_grad():
            for p, w, v in zip(params, orig, vs):
                p.data = w + step * v
        with torch.enable_grad(), torch.random.fork_rng(devices=_cuda_devices(params)):
            loss = closure()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"closure must return a scalar tensor, got "
                             f"{type(loss).__name__}"
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        if not loss.requires_grad:
            return [torch.zeros_like(p) for p in params]
        return _fill(torch.autograd.grad(loss.reshape(()), params, allow_unused=True), params)
    finally:
        for p, w in zip(params, orig):
            p.data = w


def _hvp_finite(closure, params, vs, eps: float | None) -> list[torch.Tensor]:
    if eps is None:
        eps = finite_difference_eps(params, vs)
        if eps == 0.0:
            return [torch.zeros_like(p) for p in params]
    plus = _grad_at(closure, params, vs, eps)
    minus = _grad_at(closure, params, vs, -eps)
    return [(a - b) / (2.0 * eps) for a, b in zip(plus, minus)]


def _double_unsupported(err: BaseException) -> bool:
    """A failed double backward that the finite-difference path can stand in for: any
    RuntimeError but running out of memory and the monitor's ContractError (a backward that
    was counted: the fix is ``monitor.paused()``, not another method)."""
    return isinstance(err, RuntimeError) and not isinstance(
        err, (torch.OutOfMemoryError, ContractError))


def _check_eps(eps: Any) -> float | None:
    if eps is None:
        return None
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (
            math.isfinite(float(eps)) and float(eps) > 0.0):
        raise ValueError(f"eps must be a finite number > 0 or None, got {eps!r}")
    return float(eps)


# ------------------------------------------------------------------------------ hvp
def hvp(
    loss: torch.Tensor | None,
    params: torch.Tensor | Iterable[torch.Tensor],
    v: torch.Tensor | Iterable[torch.Tensor],
    *,
    method: Literal["auto", "double", "finite"] = "auto",
    eps: float | None = None,
    closure: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Hessian-vector product ``H v`` of ``loss`` with respect to ``params``.

    Args:
        loss: scalar tensor whose graph reaches ``params`` (needed for ``"auto"`` and
            ``"double"``; may be None for ``"finite"``). The double-backward path frees its
            graph, as ``backward()`` would.
        params: the tensors (leaves requiring grad) that ``H`` is taken over; a single tensor
            or an iterable.
        v: one tensor per parameter, same shapes (a single tensor when ``params`` is one).
        method: ``"double"`` (autograd through the backward pass), ``"finite"`` (central
            difference of gradients, needs ``closure``) or ``"auto"``: double backward, and
            where it raises a RuntimeError (a backward that autograd cannot differentiate:
            CPU/flash attention, ``once_differentiable`` functions) the finite difference.
        eps: finite-difference step in units of ``v`` (perturbation ``eps * v``); default
            :func:`finite_difference_eps`, ``eps_mach^(1/3) |w| / |v|``.
        closure: ``closure() -> loss`` recomputing the same loss at the current parameter
            values (called twice, at ``w +/- eps v``, each from the same RNG state); the
            parameters are restored bit-exactly afterwards. ``.grad`` is never touched.

    Returns:
        ``H v`` (detached), a tensor when ``params`` was a tensor, else a list.

    Raises:
        ValueError: naming the argument: mismatched ``v``, ``method``, ``eps``, a missing
            ``loss``/``closure``, or ``"auto"`` without ``closure`` where double backward fails
            (the autograd error is chained).
    """
    single = isinstance(params, torch.Tensor)
    ps = _params_list(params)
    vs = _vectors(v, ps)
    _choice("method", method, _METHODS)
    eps = _check_eps(eps)
    if closure is not None and not callable(closure):
        raise ValueError(f"closure must be callable, got {type(closure).__name__}")
    if method == "finite" and closure is None:
        raise ValueError("closure is required for method='finite' (it recomputes the loss at "
                         "the perturbed parameters)")
    out = None
    if method != "finite":
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss must be a scalar tensor for method={method!r}, got "
                             f"{type(loss).__name__}")
        try:
            with torch.enable_grad():
                out = _hvp_double(loss.reshape(()), ps, vs)
        except RuntimeError as err:
            if method == "double" or not _double_unsupported(err):
                raise
            if closure is None:
                raise ValueError(
                    "double backward failed and no closure was given for the finite-difference "
                    f"fallback: pass closure= (a function recomputing the loss). Cause: {err}"
                ) from err
    if out is None:
        out = _hvp_finite(closure, ps, vs, eps)
    return out[0] if single else out


# ------------------------------------------------------------------------------ batches
def _leaves(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _leaves(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _leaves(v)]
    return []


def _batch_size(batch: Any, name: str) -> int:
    leaves = [t for t in _leaves(batch) if t.dim() > 0]
    if not leaves:
        raise ValueError(f"{name} holds no tensor with a batch dimension (tensors, or tuples, "
                         "lists and dicts of tensors, batch first)")
    sizes = {int(t.shape[0]) for t in leaves}
    if len(sizes) != 1:
        raise ValueError(f"{name}: its tensors disagree on the batch size (dim 0): "
                         f"{sorted(sizes)}")
    return sizes.pop()


def _slice(batch: Any, sl: slice) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[sl] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, sl) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_slice(v, sl) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, sl) for v in batch)
    return batch


# ------------------------------------------------------------------------------ estimator
