"""Linear per-example norm ops against the float64 reference and torch.func per-example grads."""
import pytest
import torch
from torch.func import functional_call, grad, vmap

import gradstats
from gradstats import reference
from problems import LINEAR_CASES

from conftest import devices

STRATEGIES = ["auto", "outer", "gram", "direct"]


def _strategies(case):
    return [s for s in STRATEGIES if s != "outer" or case.T == 1]


def _inputs(case, dtype=torch.float64, device="cpu", seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    A = torch.randn(case.B, *case.mid, case.d_in, dtype=torch.float64, generator=gen)
    G = torch.randn(case.B, *case.mid, case.d_out, dtype=torch.float64, generator=gen)
    return A.to(device=device, dtype=dtype), G.to(device=device, dtype=dtype)


def _close(x, ref, rtol, bound=None):
    """|x - ref| <= rtol * max(|ref|, bound): rounding in low precision scales with the
    magnitude of the summed terms (``bound``), which exceeds the value where they cancel."""
    x, ref = x.double().cpu(), ref.double().cpu()
    scale = ref.abs() if bound is None else torch.maximum(ref.abs(), bound.cpu())
    assert ((x - ref).abs() <= rtol * scale).all(), ((x - ref).abs() / scale).max().item()


def _bounds(A, G):
    """Per example sum_{t,s} |a_t.a_s||g_t.g_s| and sum_{t,s} |g_t.g_s|: the magnitudes whose
    rounding the weight and bias norms carry (equal to the norms when T = 1)."""
    B = A.shape[0]
    a = A.double().reshape(B, -1, A.shape[-1])
    g = G.double().reshape(B, -1, G.shape[-1])
    ka = (a @ a.transpose(1, 2)).abs()
    kg = (g @ g.transpose(1, 2)).abs()
    return (ka * kg).sum((1, 2)), kg.sum((1, 2))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.name)
def test_norms_match_float64_reference(case, device):
    A, G = _inputs(case, device=device)
    ref_w, ref_b = reference.linear_norms(A, G)
    for strategy in _strategies(case):
        w, b = gradstats.linear_norms(A, G, strategy)
        assert w.dtype == torch.float64 and w.shape == (case.B,)
        _close(w, ref_w, 1e-10)
        _close(b, ref_b, 1e-10)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.name)
def test_norms_match_torch_func_float32(case, device):
    """Per-example gradients of a real nn.Linear from torch.func, against the ops in float32."""
    layer = torch.nn.Linear(case.d_in, case.d_out).to(device)
    A, R = _inputs(case, torch.float32, device)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, a, r):  # d loss / d output = r, so G = R exactly
        return (functional_call(layer, p, (a.unsqueeze(0),)) * r.unsqueeze(0)).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, A, R)
    ref_w = g["weight"].double().square().flatten(1).sum(1)
    ref_b = g["bias"].double().square().flatten(1).sum(1)
    bw, bb = _bounds(A, R)
    for strategy in _strategies(case):
        w, b = gradstats.linear_norms(A, R, strategy)
        assert w.dtype == torch.float32
        _close(w, ref_w, 1e-5, bw)
        _close(b, ref_b, 1e-5, bb)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_matches_reference(case, device, dtype):
    A, G = _inputs(case, dtype, device)
    ref = reference.linear_fused(A, G)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for strategy in _strategies(case):
        dW, db, w, b = gradstats.linear_fused(A, G, strategy)
        assert dW.shape == (case.d_out, case.d_in) and db.shape == (case.d_out,)
        assert dW.dtype == dtype and db.dtype == dtype
        # dW entries can be near zero: compare at the scale of the whole matrix.
        scale = ref[0].abs().max().item()
        torch.testing.assert_close(dW.double().cpu(), ref[0], rtol=0, atol=rtol * scale * 10)
        torch.testing.assert_close(db.double().cpu(), ref[1], rtol=0,
                                   atol=rtol * ref[1].abs().max().item() * 10)
        bw, bb = _bounds(A, G)
        _close(w, ref[2], rtol, bw)
        _close(b, ref[3], rtol, bb)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_and_transposed_inputs(device):
    base_a = torch.randn(9, 4, 6, dtype=torch.float64, device=device)
    base_g = torch.randn(3, 4, 9, dtype=torch.float64, device=device)
    A = base_a.permute(1, 0, 2)[:, ::2]  # [4, 5, 6], strided
    G = base_g.permute(1, 2, 0)[:, ::2]  # [4, 5, 3], transposed last dims
    assert not A.is_contiguous() and not G.is_contiguous()
    ref_w, ref_b = reference.linear_norms(A, G)
    for strategy in ["auto", "gram", "direct"]:
        w, b = gradstats.linear_norms(A, G, strategy)
        _close(w, ref_w, 1e-10)
        _close(b, ref_b, 1e-10)
        dW, db, w2, _ = gradstats.linear_fused(A, G, strategy)
        _close(w2, ref_w, 1e-10)
        _close(dW, reference.linear_fused(A, G)[0], 1e-10)


@pytest.mark.parametrize("device", devices())
def test_mixed_autocast_dtypes(device):
    """float32 A with bfloat16 G (as autocast produces) is accepted and computed in float32."""
    A = torch.randn(4, 5, 8, device=device)
    G = torch.randn(4, 5, 3, device=device).to(torch.bfloat16)
    ref_w, ref_b = reference.linear_norms(A, G.float())
    bw, bb = _bounds(A, G.float())
    for strategy in ["gram", "direct"]:
        w, b = gradstats.linear_norms(A, G, strategy)
        assert w.dtype == torch.float32
        _close(w, ref_w, 1e-5, bw)
        _close(b, ref_b, 1e-5, bb)
    dW, db, _, _ = gradstats.linear_fused(A, G)
    assert dW.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.name)
def test_half_precision_cuda(case, dtype):
    A, G = _inputs(case, dtype, "cuda")
    ref_w, ref_b = reference.linear_norms(A, G)  # the same rounded inputs, in float64
    for strategy in _strategies(case):
        w, b = gradstats.linear_norms(A, G, strategy)
        assert w.dtype == torch.float32
        bw, bb = _bounds(A, G)
        _close(w, ref_w, 1e-4, bw)
        _close(b, ref_b, 1e-4, bb)


def test_auto_strategy_follows_cost_model():
    assert gradstats.linear_strategy(1, 512, 512) == "outer"
    # Gram ~ T^2 (d_in + d_out), direct ~ T d_in d_out.
    assert gradstats.linear_strategy(16, 768, 768) == "gram"
    assert gradstats.linear_strategy(4096, 64, 64) == "direct"


@pytest.mark.parametrize(
    "A_shape, G_shape, kwargs, match",
    [
        ((4, 3, 5), (5, 3, 2), {}, "same batch size"),
        ((4, 3, 5), (4, 2, 2), {}, "agree in every dim"),
        ((4,), (4,), {}, "A must have at least 2 dims"),
        ((4, 5), (4, 3, 2), {}, "same number of dims"),
        ((4, 3, 5), (4, 3, 2), {"strategy": "outer"}, "'outer' needs"),
        ((4, 3, 5), (4, 3, 2), {"strategy": "fastest"}, "strategy must be one of"),
    ],
)
@pytest.mark.parametrize("op", [gradstats.linear_norms, gradstats.linear_fused])
def test_bad_input_names_the_argument(op, A_shape, G_shape, kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        op(torch.randn(A_shape), torch.randn(G_shape), **kwargs)


@pytest.mark.parametrize("op", [gradstats.linear_norms, gradstats.linear_fused])
def test_inputs_that_require_grad_are_refused_by_name(op):
    with pytest.raises(RuntimeError, match=r"must not require grad \(pass A.detach\(\)"):
        op(torch.randn(3, 4, requires_grad=True), torch.randn(3, 2))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_batch_contributes_nothing(device, strategy):
    A, G = torch.randn(0, 1 if strategy == "outer" else 3, 5), torch.randn(0, 1 if strategy == "outer" else 3, 2)
    A, G = A.to(device), G.to(device)
    w, b = gradstats.linear_norms(A, G, strategy)
    dW, db, w2, b2 = gradstats.linear_fused(A, G, strategy)
    assert w.shape == b.shape == w2.shape == b2.shape == (0,)
    assert dW.shape == (2, 5) and not dW.any() and db.shape == (2,) and not db.any()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("strategy", ["auto", "gram", "direct"])
def test_positions_with_a_common_component_keep_float32_accuracy(device, strategy):
    """a_t = c + delta_t with a large common c and sum_t g_t ~ 0: uncentred Gram sums cancel
    catastrophically in float32; every route stays within 10x the direct route's error."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    errs = {}
    for st in ("direct", strategy):
        worst = 0.0
        for trial in range(4):
            B, T, d_in, d_out = 3, 48, 24, 16
            c = 100.0 * torch.randn(d_in, generator=gen, dtype=torch.float64)
            A = c + 0.01 * torch.randn(B, T, d_in, generator=gen, dtype=torch.float64)
            G = torch.randn(B, T, d_out, generator=gen, dtype=torch.float64)
            G = G - G.mean(1, keepdim=True) + 1e-3 * torch.randn(B, 1, d_out, generator=gen,
                                                                   dtype=torch.float64)
            ref, _ = reference.linear_norms(A, G)
            w, _ = gradstats.linear_norms(A.float().to(device), G.float().to(device), st)
            assert (w >= 0).all()
            worst = max(worst, ((w.double().cpu() - ref).abs() / ref).max().item())
        errs[st] = worst
    assert errs[strategy] <= 10 * max(errs["direct"], 1e-7), errs


def _accumulators(S, N, K=2, device="cpu"):
    f64 = dict(dtype=torch.float64, device=device)
    return torch.zeros(S, N, **f64), torch.zeros(S, 2 * K, **f64)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.name)
def test_collect_ops_write_norms_and_probe_into_the_accumulators(case, device):
    A, G = _inputs(case, device=device)
    E, P = _accumulators(3, case.B + 4, device=device)
    rows = torch.arange(2, 2 + case.B, device=device)
    gen = torch.Generator().manual_seed(1)
    xw, yw, vb = (torch.randn(n, 2, generator=gen, dtype=torch.float64).to(device)
                  for n in (case.d_out, case.d_in, case.d_out))
    ref_w, ref_b = reference.linear_norms(A, G)
    dw_i, db_i = reference.linear_per_example_grads(A, G)
    dW, db = dw_i.sum(0), db_i.sum(0)
    for strategy in _strategies(case):
        for fused in (False, True):
            E.zero_(), P.zero_()
            op = gradstats.ops.linear_fused_collect if fused else gradstats.ops.linear_collect
            out = op(A, G, E, P, rows, 0, 2, xw, yw, vb, strategy)
            _close(E[0, 2:2 + case.B], ref_w, 1e-10)
            _close(E[2, 2:2 + case.B], ref_b, 1e-10)
            assert not E[1].any() and not E[:, :2].any() and not E[:, 2 + case.B:].any()
            want_w = torch.stack([xw[:, j].cpu() @ dW @ yw[:, j].cpu() for j in range(2)])
            _close(P[0, :2], want_w, 1e-10)
            _close(P[2, :2], vb.cpu().t() @ db, 1e-10)
            # bounds: |x_j||y_j| sum_t |g_t||a_t| >= |the projection|
            assert (P[0, 2:].cpu() >= want_w.abs() * (1 - 1e-12)).all()
            if fused:
                _close(out[0], dW, 1e-10)
                _close(out[1], db, 1e-10)


def test_collect_ops_opcheck():
    A, G = torch.randn(3, 4, 5), torch.randn(3, 4, 2)
    E, P = _accumulators(2, 6)
    rows = torch.tensor([1, 2, 3])
    x, y, v = (torch.randn(n, 2, dtype=torch.float64) for n in (2, 5, 2))
    for op in (torch.ops.gradstats.linear_collect.default,
               torch.ops.gradstats.linear_fused_collect.default):
        torch.library.opcheck(op, (A, G, E, P, rows, 0, 1, x, y, v, "auto"))
        torch.library.opcheck(op, (A, G, E, P, rows, 1, -1, None, None, None, "gram"))


@pytest.mark.parametrize("op", [gradstats.linear_norms, gradstats.linear_fused])
def test_integer_inputs_are_refused(op):
    with pytest.raises(RuntimeError, match="A must be a floating-point tensor"):
        op(torch.ones(3, 4, dtype=torch.int64), torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="G must be a floating-point tensor"):
        op(torch.randn(3, 4), torch.ones(3, 2, dtype=torch.int32))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_on_different_devices_are_refused():
    with pytest.raises(RuntimeError, match="same device"):
        gradstats.linear_norms(torch.randn(3, 4, device="cuda"), torch.randn(3, 2))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", [LINEAR_CASES[0], LINEAR_CASES[3], LINEAR_CASES[7]],
                         ids=lambda c: c.name)
def test_opcheck(case, device):
    A, G = _inputs(case, torch.float32, device)
    for strategy in _strategies(case):
        torch.library.opcheck(torch.ops.gradstats.linear_norms.default, (A, G, strategy))
        torch.library.opcheck(torch.ops.gradstats.linear_fused.default, (A, G, strategy))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def f(A, G):
        w, b = gradstats.linear_norms(A * 2.0, G)
        dW, db, w2, b2 = gradstats.linear_fused(A, G, "direct")
        return w.sum() + b, dW.abs().sum() + w2

    A, G = torch.randn(5, 6, 7), torch.randn(5, 6, 4)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(A, G), f(A, G)):
        torch.testing.assert_close(got, want)
