"""step_reduce (the numeric part of monitor.step() in one op) against float64 arithmetic, on
fresh random accumulators and gradients; the CPU kernel and the composite (CUDA, meta) one."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradstats import ops as _ops
from conftest import devices

_COMPOSITE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def _reference(E, r, n, coef, grads):
    E, r = E.double().cpu().numpy()[:, :n], r.double().cpu().numpy()[:n]
    c = r * coef
    w = np.where(c > 0, 1.0 / np.where(c > 0, c, 1.0) ** 2, 0.0)
    S = E.shape[0]
    gsq = np.zeros(S)
    for s, g in enumerate(grads):
        if g is not None:
            gsq[s] = float((g.double() ** 2).sum())
    return np.concatenate([(E * w).sum(1), gsq, [c.sum(), (c * c).sum()], (E * w).sum(0)])


def _grad(rng, dtype, device):
    shape = [(), (5,), (3, 7), (64, 130), (2, 3, 4)][int(rng.integers(5))]
    g = torch.from_numpy(rng.standard_normal(shape)).to(device=device, dtype=dtype)
    if g.dim() == 2 and rng.random() < 0.3:
        g = g.t()  # a non-contiguous gradient
    return g


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), S=st.integers(1, 6), cap=st.integers(1, 40),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       composite=st.booleans(), with_grads=st.booleans())
def test_step_reduce_matches_float64(seed, S, cap, dtype, composite, with_grads):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, cap + 1))
    E = torch.from_numpy(rng.random((S, cap)) * 10.0 ** rng.integers(-3, 4))
    r = torch.from_numpy(rng.random(cap))
    r[torch.from_numpy(rng.random(cap) < 0.2)] = 0.0  # examples whose forward saw no backward
    coef = float(rng.choice([1.0, 0.5, 1024.0]))
    grads = [None if rng.random() < 0.25 else _grad(rng, dtype, "cpu") for _ in range(S)] \
        if with_grads else []
    if composite:
        got = torch.ops.gradstats.step_reduce.default.redispatch(_COMPOSITE, E, r, n, coef, grads)
    else:
        got = _ops.step_reduce(E, r, n, coef, grads)
    want = _reference(E, r, n, coef, grads)
    assert got.dtype == torch.float64 and got.shape == (2 * S + 2 + n,)
    got = got.numpy()
    g_rtol = 1e-12 if dtype == torch.float64 else 1e-5  # float32 accumulation of the norms
    gs = slice(S, 2 * S)
    np.testing.assert_allclose(got[gs], want[gs], rtol=g_rtol, atol=0)
    rest = np.r_[0:S, 2 * S:2 * S + 2 + n]
    np.testing.assert_allclose(got[rest], want[rest], rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", devices())
def test_step_reduce_on_each_device(device):
    torch.manual_seed(0)
    E = torch.rand(4, 50, dtype=torch.float64, device=device)
    r = torch.rand(50, dtype=torch.float64, device=device)
    grads = [torch.randn(30, 20, device=device), None, torch.randn(7, device=device).half(),
             torch.randn(3, 3, dtype=torch.float64, device=device)]
    got = _ops.step_reduce(E, r, 33, 2.0, grads).cpu().numpy()
    want = _reference(E, r, 33, 2.0, grads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("args, match", [
    ((torch.rand(2, 5), torch.rand(5).double(), 3, 1.0, []), "E must be a float64"),
    ((torch.rand(2, 5).double(), torch.rand(4).double(), 3, 1.0, []), "r must be float64"),
    ((torch.rand(2, 5).double(), torch.rand(5).double(), 6, 1.0, []), "n must be in"),
    ((torch.rand(2, 5).double(), torch.rand(5).double(), 3, 1.0, [None]), "one entry per slot"),
    ((torch.rand(1, 5).double(), torch.rand(5).double(), 3, 1.0, [torch.ones(2, dtype=torch.long)]),
     "dense floating"),
])
def test_step_reduce_names_bad_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        _ops.step_reduce(*args)


def test_step_reduce_opcheck():
    E, r = torch.rand(3, 9, dtype=torch.float64), torch.rand(9, dtype=torch.float64)
    torch.library.opcheck(torch.ops.gradstats.step_reduce.default,
                          (E, r, 5, 0.5, [torch.randn(4), None, torch.randn(2, 2)]))
