"""Hessian-vector products and the Hessian-weighted noise scale (gradstats.curvature)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstats import ContractError, GradStatsMonitor, NoiseScaleEMA, StepEstimate
from gradstats.curvature import CurvatureEstimator, finite_difference_eps, hvp
from gradstats.scaling import sgd_optimal_lr

from conftest import devices

f64 = torch.float64


# ------------------------------------------------------------------------------ models
class MLP(nn.Module):
    def __init__(self, d_in=3, hidden=4, d_out=2):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyAttention(nn.Module):
    """One attention layer; ``manual=True`` writes softmax(q k^T / sqrt(d)) v out by hand
    (double-differentiable), ``manual=False`` calls scaled_dot_product_attention, whose
    CPU kernel has no double backward."""

    def __init__(self, d=4, manual=False):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, 1)
        self.manual = manual

    def forward(self, x):  # x: [B, T, d]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.manual:
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            h = att @ v
        else:
            h = F.scaled_dot_product_attention(q, k, v)
        return self.out(torch.tanh(h)).mean(dim=(1, 2))


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def explicit_hessian(model, loss_of_output):
    """The full Hessian of ``loss_of_output(model(...))`` over the flattened parameters."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    sizes = [p.numel() for p in params]

    def f(flat):
        d = {n: c.view_as(p) for n, c, p in zip(names, flat.split(sizes), params)}
        return loss_of_output(lambda *a: torch.func.functional_call(model, d, a))

    return torch.autograd.functional.hessian(f, torch.cat([p.reshape(-1) for p in params]))


def flat(xs):
    return torch.cat([x.reshape(-1) for x in xs])


def rand_like_params(model, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]


# ------------------------------------------------------------------------------ hvp
@pytest.mark.parametrize("method", ["double", "finite", "auto"])
def test_hvp_matches_explicit_hessian(method):
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(7, 3, dtype=f64), torch.randn(7, 2, dtype=f64)
    hess = explicit_hessian(model, lambda m: F.mse_loss(m(x), y))
    params = list(model.parameters())
    v = rand_like_params(model, 1)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    grad_objs = [p.grad for p in params]
    before = [p.detach().clone() for p in params]
    ptrs, versions = [p.data_ptr() for p in params], [p._version for p in params]

    loss = F.mse_loss(model(x), y)
    keep = F.mse_loss(model(x), y)  # a graph built before the call stays usable
    hv = hvp(loss, params, v, method=method, closure=lambda: F.mse_loss(model(x), y))
    rtol = 1e-12 if method != "finite" else 1e-7
    torch.testing.assert_close(flat(hv), hess @ flat(v), rtol=rtol, atol=rtol)

    for p, b, g, gobj, ptr, ver in zip(params, before, grads, grad_objs, ptrs, versions):
        assert torch.equal(p, b) and p.data_ptr() == ptr and p._version == ver  # bit-exact
        assert p.grad is gobj and torch.equal(p.grad, g)  # .grad untouched
    torch.autograd.grad(keep, params)


def test_hvp_single_tensor_and_float32_step():
    w = torch.randn(5, requires_grad=True)  # float32
    a = torch.randn(5, 5)
    h = a @ a.T + torch.eye(5)

    def closure():
        return 0.5 * w @ h @ w + torch.sin(w).sum()

    v = torch.randn(5)
    exact = (h - torch.diag(torch.sin(w.detach()))) @ v
    out = hvp(closure(), w, v, method="double")
    assert isinstance(out, torch.Tensor) and out.shape == (5,)
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    eps = finite_difference_eps(w, v)
    assert math.isclose(eps, torch.finfo(torch.float32).eps ** (1 / 3) * w.norm().item()
                        / v.norm().item(), rel_tol=1e-6)
    torch.testing.assert_close(hvp(None, w, v, method="finite", closure=closure), exact,
                               rtol=2e-3, atol=2e-3)
    assert finite_difference_eps(w, torch.zeros(5)) == 0.0
    assert torch.equal(hvp(None, w, torch.zeros(5), method="finite", closure=closure),
                       torch.zeros(5))


def test_hvp_finite_uses_same_dropout_masks_and_keeps_rng():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1)).double()
    x = torch.randn(6, 4, dtype=f64)
    params = list(model.parameters())
    v = rand_like_params(model, 2)

    def closure():
        return model(x).pow(2).mean()

    torch.manual_seed(11)
    ref = hvp(closure(), params, v, method="double")  # one dropout mask
    torch.manual_seed(11)
    state = torch.get_rng_state()
    out = hvp(None, params, v, method="finite", closure=closure)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG did not move
    torch.testing.assert_close(flat(out), flat(ref), rtol=1e-6, atol=1e-7)


def test_hvp_auto_falls_back_where_double_backward_is_unsupported():
    torch.manual_seed(0)
    model = TinyAttention().double()
    manual = TinyAttention(manual=True).double()
    manual.load_state_dict(model.state_dict())
    x = torch.randn(3, 5, 4, dtype=f64)
    params, v = list(model.parameters()), rand_like_params(model, 4)
    ref = hvp(manual(x).sum(), list(manual.parameters()), v, method="double")

    with pytest.raises(RuntimeError, match="derivative"):
        hvp(model(x).sum(), params, v, method="double")
    with pytest.raises(ValueError, match="closure"):
        hvp(model(x).sum(), params, v, method="auto")
    out = hvp(model(x).sum(), params, v, method="auto", closure=lambda: model(x).sum())
    torch.testing.assert_close(flat(out), flat(ref), rtol=1e-6, atol=1e-8)


def test_hvp_argument_errors():
    w = torch.randn(3, dtype=f64, requires_grad=True)
    loss = (w ** 3).sum()
    with pytest.raises(ValueError, match="method"):
        hvp(loss, [w], [w.detach()], method="exact")
    with pytest.raises(ValueError, match=r"v\[0\] has shape"):
        hvp(loss, [w], [torch.zeros(4)])
    with pytest.raises(ValueError, match="one tensor per parameter"):
        hvp(loss, [w], [torch.zeros(3), torch.zeros(3)])
    with pytest.raises(ValueError, match="closure is required"):
        hvp(loss, [w], [torch.zeros(3)], method="finite")
    with pytest.raises(ValueError, match="eps"):
        hvp(loss, [w], [torch.zeros(3)], method="finite", closure=lambda: loss, eps=0.0)
    with pytest.raises(ValueError, match=r"params\[0\] does not require grad"):
        hvp(loss, [w.detach()], [torch.zeros(3)])
    with pytest.raises(ValueError, match="loss must be a scalar"):
        hvp(None, [w], [torch.zeros(3)])
    with pytest.raises(ValueError, match="closure must return a scalar"):
        hvp(None, [w], [torch.ones(3)], method="finite", closure=lambda: w * 2)


# ------------------------------------------------------------------------------ noisy quadratic
D, REPLICAS, HALF, CALLS = 10, 8, 8, 1000


class NoisyQuadratic(nn.Module):
    """Per-example loss ``0.5 (w - w*)^T H (w - w*) + noise_i . w``: per-example gradient
    ``H (w - w*) + noise_i``, Hessian exactly ``H``; a batch is the noise, ``[b, R, D]``.

    Vectorised: ``w`` is ``[R, D]`` and ``H = I_R (x) H0`` (``R`` independent replicas of a
    ``D``-dimensional problem), noise covariance ``Sigma = I_R (x) Sigma0``. One call then
    carries ``R`` independent draws; its estimates are their sums, and the truth is ``R``
    times the one-replica value (the ratios ``B_noise``, ``eta_max`` are the replica's)."""

    def __init__(self, h, w_star):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(REPLICAS, D, dtype=f64))
        self.register_buffer("h", h)
        self.register_buffer("w_star", w_star.expand(REPLICAS, D).clone())

    def forward(self, noise):
        e = self.w - self.w_star
        return 0.5 * torch.einsum("rd,de,re->", e, self.h, e) + (noise.mean(0) * self.w).sum()


def quadratic_problem(b_noise_target=8.0):
    g = torch.Generator().manual_seed(1234)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=f64))
    h = q @ torch.diag(torch.logspace(-0.5, 0.5, D, dtype=f64)) @ q.T  # SPD, condition 10
    q2, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=f64))
    sigma = q2 @ torch.diag(torch.logspace(0.5, -0.5, D, dtype=f64)) @ q2.T  # other axes
    l_sigma = torch.linalg.cholesky(sigma)
    tr_hs = torch.trace(h @ sigma).item()
    direction = torch.randn(D, generator=g, dtype=f64)
    grad_dir = h @ direction
    # scale w - w* so that B_noise = tr(H Sigma) / G^T H G = b_noise_target
    scale = math.sqrt(tr_hs / (b_noise_target * (grad_dir @ h @ grad_dir).item()))
    model = NoisyQuadratic(h, -scale * direction)  # w = 0, so w - w* = scale * direction
    big_g = (model.w.detach() - model.w_star) @ h  # [R, D], H symmetric
    truth = dict(tr_h_sigma=REPLICAS * tr_hs, gHg=torch.einsum("rd,de,re->", big_g, h,
                                                                big_g).item(),
                 g2=big_g.pow(2).sum().item())
    noise = torch.randn(CALLS, 2 * HALF, REPLICAS, D, generator=g, dtype=f64) @ l_sigma.T
    return model, truth, noise


def _mean_se(xs):
    t = torch.tensor(xs, dtype=f64)
    return t.mean().item(), (t.std() / math.sqrt(len(xs))).item()


def test_noisy_quadratic_estimates_are_unbiased():
    model, truth, noise = quadratic_problem()
    est = CurvatureEstimator(model, lambda m, b: m(b), beta=0.0, method="double")
    res = [est.update(noise[i]) for i in range(CALLS)]
    assert {r.method for r in res} == {"double"} and model.w.grad is None

    zs = {}
    for key in ("tr_h_sigma", "gHg", "g2"):
        mean, se = _mean_se([getattr(r, key) for r in res])
        zs[key] = (mean - truth[key]) / se
        assert abs(zs[key]) < 3.0, (key, mean, truth[key], se)
    # The naive |g_batch|_H^2 overestimates G^T H G by tr(H Sigma) / n, n = 2 * HALF.
    mean, se = _mean_se([r.gHg_naive for r in res])
    assert (mean - truth["gHg"]) / se > 10.0
    assert abs(mean - truth["gHg"] - truth["tr_h_sigma"] / (2 * HALF)) / se < 3.0

    # Ratios of the averaged estimates against the truth, and the SGD rule built from them.
    tr = sum(r.tr_h_sigma for r in res) / CALLS
    ghg = sum(r.gHg for r in res) / CALLS
    g2 = sum(r.g2 for r in res) / CALLS
    b_noise_true = truth["tr_h_sigma"] / truth["gHg"]
    eta_max_true = truth["g2"] / truth["gHg"]
    assert abs(tr / ghg / b_noise_true - 1) < 0.04
    assert abs(g2 / ghg / eta_max_true - 1) < 0.04
    for batch_size in (1, 8, 64, 1024):
        lr = sgd_optimal_lr(g2 / ghg, tr / ghg, batch_size)
        lr_true = sgd_optimal_lr(eta_max_true, b_noise_true, batch_size)
        assert abs(lr / lr_true - 1) < 0.05
    # Per call: the result's own ratios.
    r = res[-1]
    assert r.defined and math.isclose(r.b_noise, r.tr_h_sigma / r.gHg, rel_tol=1e-12)
    assert math.isclose(r.eta_max, r.g2 / r.gHg, rel_tol=1e-12)


def test_quadratic_finite_and_two_batches_and_hessian_batch_agree():
    model, truth, noise = quadratic_problem()
    lf = lambda m, b: m(b)  # noqa: E731
    double = CurvatureEstimator(model, lf, beta=0.0, method="double")
    finite = CurvatureEstimator(model, lf, beta=0.0, method="finite")
    for i in range(3):
        a, b = double.update(noise[i]), finite.update(noise[i])
        for key in ("tr_h_sigma", "gHg", "g2", "gHg_naive"):
            assert math.isclose(getattr(a, key), getattr(b, key), rel_tol=1e-8), key
        # Two independent batches given separately = one batch split in halves.
        c = double.update(noise[i, :HALF], noise[i, HALF:])
        assert math.isclose(c.tr_h_sigma, a.tr_h_sigma, rel_tol=1e-12)
        # H does not depend on the examples here, so a separate Hessian batch changes nothing.
        d = double.update(noise[i], hessian_batch=noise[i + 1])
        assert math.isclose(d.gHg, a.gHg, rel_tol=1e-12)


def test_unequal_halves_are_unbiased():
    model, truth, noise = quadratic_problem()
    est = CurvatureEstimator(model, lambda m, b: m(b), beta=0.0)
    res = [est.update(noise[i, :7]) for i in range(300)]  # halves of 3 and 4
    assert (res[0].b_a, res[0].b_b) == (3, 4)
    for key in ("tr_h_sigma", "gHg"):
        mean, se = _mean_se([getattr(r, key) for r in res])
        assert abs(mean - truth[key]) < 3.0 * se, key


def test_ema_is_ratio_of_bias_corrected_emas():
    model, truth, noise = quadratic_problem()
    est = CurvatureEstimator(model, lambda m, b: m(b), beta=0.9)
    ref_noise, ref_lr = NoiseScaleEMA(0.9), NoiseScaleEMA(0.9)
    for i in range(20):
        r = est.update(noise[i])
        ref_noise.update(StepEstimate(16, r.tr_h_sigma, r.gHg, math.nan, True, None))
        ref_lr.update(StepEstimate(16, r.g2, r.gHg, math.nan, True, None))
    assert r.call == 20 and est.calls == 20  # 1-based
    assert r.b_noise_ema == est.b_noise == ref_noise.b_simple
    assert r.eta_max_ema == est.eta_max == ref_lr.b_simple
    assert r.tr_h_sigma_ema == ref_noise.tr_sigma and r.gHg_ema == ref_noise.g2
    assert r.g2_ema == ref_lr.tr_sigma and r.b_noise_stderr == ref_noise.b_simple_stderr
    assert est.optimal_lr(32) == sgd_optimal_lr(est.eta_max, est.b_noise, 32)
    # state round trip
    other = CurvatureEstimator(model, lambda m, b: m(b), beta=0.5)
    other.load_state_dict(est.state_dict())
    assert other.b_noise == est.b_noise and other.calls == 20
    assert other.update(noise[30]).b_noise_ema == est.update(noise[30]).b_noise_ema


def test_maybe_update_every_n_steps():
    model, _, noise = quadratic_problem()
    est = CurvatureEstimator(model, lambda m, b: m(b), every=3)
    ran = [s for s in range(10) if est.maybe_update(s, noise[s]) is not None]
    assert ran == [0, 3, 6, 9] and est.calls == 4


# ------------------------------------------------------------------------------ real models
def test_estimator_finite_matches_double_on_nonlinear_model():
    torch.manual_seed(0)
    model = MLP().double()
    batch = (torch.randn(12, 3, dtype=f64), torch.randn(12, 2, dtype=f64))
    hbatch = (torch.randn(5, 3, dtype=f64), torch.randn(5, 2, dtype=f64))
    before = [p.detach().clone() for p in model.parameters()]
    for kw in ({}, {"hessian_batch": hbatch}):
        a = CurvatureEstimator(model, mse, method="double").update(batch, **kw)
        b = CurvatureEstimator(model, mse, method="finite").update(batch, **kw)
        assert (a.method, b.method) == ("double", "finite")
        for key in ("tr_h_sigma", "gHg", "g2", "gHg_naive"):
            assert math.isclose(getattr(a, key), getattr(b, key), rel_tol=1e-6), (kw, key)
        assert a.defined == b.defined == (a.gHg > 0)
        if a.defined:
            assert math.isclose(a.b_noise, b.b_noise, rel_tol=1e-6)
        else:
            assert math.isnan(a.b_noise) and a.reason == "G^T H G estimate <= 0"
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q) and p.grad is None


@pytest.mark.parametrize("device", devices())
def test_estimator_float32_finite_matches_float64(device):
    torch.manual_seed(0)
    model = MLP(8, 32, 4).to(device)
    batch = (torch.randn(64, 8, device=device), torch.randn(64, 4, device=device))
    ref = CurvatureEstimator(MLP(8, 32, 4).double().to(device), mse, method="double")
    ref.model.load_state_dict(model.state_dict())
    r64 = ref.update(tuple(t.double() for t in batch))
    for method in ("double", "finite"):
        r = CurvatureEstimator(model, mse, method=method).update(batch)
        for key in ("tr_h_sigma", "gHg", "g2", "gHg_naive"):
            assert math.isclose(getattr(r, key), getattr(r64, key), rel_tol=1e-3), (method, key)


def test_estimator_sum_reduction_and_non_finite():
    torch.manual_seed(0)
    model = MLP().double()
    batch = (torch.randn(10, 3, dtype=f64), torch.randn(10, 2, dtype=f64))
    a = CurvatureEstimator(model, mse).update(batch)
    b = CurvatureEstimator(model, lambda m, bt: F.mse_loss(m(bt[0]), bt[1], reduction="sum")
                           / 2, reduction="sum").update(batch)  # mse averages over 2 outputs
    for key in ("tr_h_sigma", "gHg", "g2"):
        assert math.isclose(getattr(a, key), getattr(b, key), rel_tol=1e-10), key
    est = CurvatureEstimator(model, lambda m, bt: mse(m, bt) * float("nan"))
    r = est.update(batch)
    assert r.reason == "non-finite" and not r.defined and math.isnan(r.tr_h_sigma)
    assert est.ema_noise.steps == 0 and math.isnan(est.b_noise)


def test_estimator_auto_uses_finite_differences_for_cpu_attention():
    torch.manual_seed(0)
    model = TinyAttention().double()
    manual = TinyAttention(manual=True).double()
    manual.load_state_dict(model.state_dict())
    batch = (torch.randn(10, 5, 4, dtype=f64), torch.randn(10, dtype=f64))
    est = CurvatureEstimator(model, mse)  # method="auto"
    r = est.update(batch)
    assert r.method == "finite" and est.method_used == "finite"
    assert "derivative" in est.fallback_reason
    ref = CurvatureEstimator(manual, mse, method="double").update(batch)
    for key in ("tr_h_sigma", "gHg", "g2", "gHg_naive"):
        assert math.isclose(getattr(r, key), getattr(ref, key), rel_tol=1e-6), key
    with pytest.raises(RuntimeError, match="derivative"):
        CurvatureEstimator(model, mse, method="double").update(batch)


def test_estimator_leaves_grads_and_buffers_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    batch = (torch.randn(16, 3, dtype=f64), torch.randn(16, 1, dtype=f64))
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    for method in ("double", "finite"):
        CurvatureEstimator(model, mse, method=method).update(batch)
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, grads[n]), n
        for n, b in model.named_buffers():
            assert torch.equal(b, buffers[n]), n


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_monitor_does_not_count_estimator_passes(mode):
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    mon = GradStatsMonitor(model, mode=mode)
    est = CurvatureEstimator(model, mse, monitor=mon, every=2)
    big = (torch.randn(16, 5, dtype=f64), torch.randn(16, 3, dtype=f64))
    for step in range(2):
        x, y = torch.randn(8, 5, dtype=f64), torch.randn(8, 3, dtype=f64)
        est.maybe_update(step, big)
        assert model.weight.grad is None
        mse(model, (x, y)).backward()
        stats = mon.step()
        assert stats.n == 8 and not stats.skipped  # only the training batch was counted
        model.zero_grad()
    assert est.calls == 1 and est.last.method == "double" and est.last.defined


def test_without_pause_the_monitor_objects():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    mon = GradStatsMonitor(model)
    est = CurvatureEstimator(model, mse)  # no monitor=: its backward passes are seen
    with pytest.raises(ContractError):
        est.update((torch.randn(16, 5, dtype=f64), torch.randn(16, 3, dtype=f64)))
        mse(model, (torch.randn(8, 5, dtype=f64), torch.randn(8, 3, dtype=f64))).backward()
        mon.step()


def test_estimator_argument_errors():
    model = MLP().double()
    one = (torch.randn(1, 3, dtype=f64), torch.randn(1, 2, dtype=f64))
    with pytest.raises(ValueError, match="every"):
        CurvatureEstimator(model, mse, every=0)
    with pytest.raises(ValueError, match="beta"):
        CurvatureEstimator(model, mse, beta=1.0)
    with pytest.raises(ValueError, match="method"):
        CurvatureEstimator(model, mse, method="newton")
    with pytest.raises(ValueError, match="loss_fn"):
        CurvatureEstimator(model, None)
    with pytest.raises(ValueError, match="monitor"):
        CurvatureEstimator(model, mse, monitor=object())
    est = CurvatureEstimator(model, mse)
    with pytest.raises(ValueError, match="at least 2"):
        est.update(one)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        est.update((torch.randn(4, 3, dtype=f64), torch.randn(5, 2, dtype=f64)))
    with pytest.raises(ValueError, match="batch_b"):
        est.update(one, (torch.randn(0, 3, dtype=f64), torch.randn(0, 2, dtype=f64)))
    with pytest.raises(ValueError, match="step"):
        est.maybe_update(-1, one)
    bad = CurvatureEstimator(model, lambda m, b: m(b[0]))
    with pytest.raises(ValueError, match="scalar"):
        bad.update((torch.randn(4, 3, dtype=f64), torch.randn(4, 2, dtype=f64)))
