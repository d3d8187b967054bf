"""gradstats.moments and gradstats.adam: per-coordinate moments, kappa^2, the sign-descent
curvature, each against per-example autograd, exact Hessians and exact expectations."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstats import GradStatsMonitor, step_estimate
from gradstats.adam import (
    AdamNoiseEstimator,
    adam_preconditioner,
    sign_alignment,
    sign_matched_kappa2,
    summarise_groups,
)
from gradstats.moments import (
    GradientSignEMA,
    abs_mean_debiased,
    coordinate_noise,
    embedding_sq_moments,
    linear_sq_moments,
    norm_sq_moments,
    per_example_moments,
)

from conftest import devices
from problems import LINEAR_CASES

f64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: more threads only contend on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------ references
def per_example_grads(module, x, G):
    """``{name: [B, *shape]}``: each example's parameter gradient of ``<module(x_b), G_b>``."""
    params = {k: v.detach() for k, v in module.named_parameters()}

    def f(p, xi, gi):
        return (torch.func.functional_call(module, p, (xi[None],)) * gi[None]).sum()

    return torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(params, x, G)


def weighted_sq(u, w):
    return (u.square() * w.reshape(-1, *([1] * (u.dim() - 1)))).sum(0)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ moments
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("max_bytes", [16 << 20, 1])
def test_linear_sq_moments_match_per_example_autograd(case, max_bytes, device):
    torch.manual_seed(sum(map(ord, case.name)))
    lin = nn.Linear(case.d_in, case.d_out).double().to(device)
    A = torch.randn(case.B, *case.mid, case.d_in, dtype=f64, device=device)
    G = torch.randn(case.B, *case.mid, case.d_out, dtype=f64, device=device)
    w = torch.rand(case.B, dtype=f64, device=device) + 0.1
    ref = per_example_grads(lin, A, G)
    mw, mb = linear_sq_moments(A, G, w, max_bytes=max_bytes)
    close(mw, weighted_sq(ref["weight"], w))
    close(mb, weighted_sq(ref["bias"], w))
    mw1, none = linear_sq_moments(A.transpose(-1, -2).contiguous().transpose(-1, -2), G,
                                  bias=False, max_bytes=max_bytes)  # non-contiguous input
    assert none is None
    close(mw1, ref["weight"].square().sum(0))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_sq_moments_match_per_example_autograd(padding_idx, device):
    torch.manual_seed(1)
    V, d, B, T = 9, 5, 6, 11
    emb = nn.Embedding(V, d, padding_idx=padding_idx).double().to(device)
    ids = torch.randint(0, V, (B, T))
    ids[0, :4] = 3  # repeated ids within an example
    ids[1, 0] = 2
    ids = ids.to(device)
    G = torch.randn(B, T, d, dtype=f64, device=device)
    w = torch.rand(B, dtype=f64, device=device) + 0.1
    ref = per_example_grads(emb, ids, G)["weight"]
    got = embedding_sq_moments(ids, G, V, w, padding_idx=padding_idx)
    close(got, weighted_sq(ref, w))


def test_embedding_sq_moments_scale_grad_by_freq():
    """Under scale_grad_by_freq each example's gradient is its part of the batch gradient,
    ``s_v = 1/c_v`` with ``c_v`` the batch count: built here from one-hot matrices."""
    torch.manual_seed(2)
    V, d, B, T = 7, 3, 5, 6
    ids = torch.randint(0, V, (B, T))
    G = torch.randn(B, T, d, dtype=f64)
    onehot = F.one_hot(ids, V).double()  # [B, T, V]
    counts = onehot.sum((0, 1)).clamp_min(1)
    u = torch.einsum("btv,btd->bvd", onehot, G) / counts[None, :, None]
    close(embedding_sq_moments(ids, G, V, scale_grad_by_freq=True), u.square().sum(0))
    # the per-example parts add up to torch's own batch gradient
    emb = nn.Embedding(V, d, scale_grad_by_freq=True).double()
    (emb(ids) * G).sum().backward()
    close(u.sum(0), emb.weight.grad)


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.LayerNorm(6), (5, 4, 6)),
    (lambda: nn.LayerNorm((3, 4)), (4, 3, 4)),
    (lambda: nn.RMSNorm(6), (5, 3, 6)),
    (lambda: nn.GroupNorm(2, 4), (3, 4, 5, 2)),
])
def test_norm_sq_moments_match_per_example_autograd(make, shape):
    torch.manual_seed(3)
    mod = make().double()
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(*shape, dtype=f64)
    G = torch.randn(*shape, dtype=f64)
    w = torch.rand(shape[0], dtype=f64) + 0.1
    ref = per_example_grads(mod, x, G)
    got = norm_sq_moments(mod, x, G, w)
    assert set(got) == set(ref)
    for k in ref:
        close(got[k], weighted_sq(ref[k], w))
    with pytest.raises(ValueError, match="normalisation-layer rule"):
        norm_sq_moments(nn.Linear(2, 2), x, G)


def test_moment_argument_errors():
    A, G = torch.randn(3, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match="weights must be a"):
        linear_sq_moments(A, G, torch.ones(2))
    with pytest.raises(ValueError, match="must agree"):
        linear_sq_moments(A, torch.randn(2, 2))
    with pytest.raises(ValueError, match="ids must be integer"):
        embedding_sq_moments(torch.randn(3, 2), torch.randn(3, 2, 4), 5)


# ------------------------------------------------------------------------------ coordinate noise
def test_coordinate_noise_is_exactly_unbiased_by_enumeration():
    """Every ordered sample of n from a population of M, with fixed unequal example weights:
    the average estimate equals the population values exactly (with replacement: variance
    divisor M; without replacement and dataset_size=M: divisor M - 1)."""
    rng = np.random.default_rng(4)
    M, n, P = 4, 3, 5
    pop = torch.tensor(rng.normal(size=(M, P)) + rng.normal(size=P), dtype=f64)
    c = torch.tensor([0.5, 1.0, 2.5], dtype=f64)  # loss scales of the n examples
    w = c / c.sum()
    g = pop.mean(0)
    for draws, M_arg, ddof in ((itertools.product(range(M), repeat=n), None, 0),
                               (itertools.permutations(range(M), n), M, 1)):
        sig, g2, k = 0.0, 0.0, 0
        for idx in draws:
            x = pop[list(idx)]
            cn = coordinate_noise(x.square().sum(0), w @ x, n, float(w.square().sum()), M_arg)
            sig, g2, k = sig + cn.sigma2, g2 + cn.g2, k + 1
        close(sig / k, pop.var(0, correction=ddof))
        close(g2 / k, g.square())


def test_coordinate_noise_sums_are_the_monitors_estimates():
    torch.manual_seed(5)
    n, P = 7, 12
    x = torch.randn(n, P, dtype=f64) + 0.3
    c = torch.rand(n, dtype=f64) + 0.2
    w = c / c.sum()
    for w2, mean in ((None, x.mean(0)), (float(w.square().sum()), w @ x)):
        for M in (None, 20):
            cn = coordinate_noise(x.square().sum(0), mean, n, w2, M)
            est = step_estimate(float(x.square().sum()), float(mean.square().sum()), n, M, w2)
            assert float(cn.sigma2.sum()) == pytest.approx(est.tr_sigma, rel=1e-12)
            assert float(cn.g2.sum()) == pytest.approx(est.g2, rel=1e-12)
    close(coordinate_noise(x.square().sum(0), x.mean(0), n).sigma2, x.var(0))
    with pytest.raises(ValueError, match="n must be"):
        coordinate_noise(x[0], x[0], 1)
    with pytest.raises(ValueError, match="dataset_size"):
        coordinate_noise(x[0], x[0], 7, None, 3)


# ------------------------------------------------------------------------------ kappa^2
def test_sign_matched_kappa2_is_exact_at_B_and_has_the_stated_limits():
    rng = np.random.default_rng(6)
    g = rng.choice([-1.0, 1.0], 40) * rng.uniform(0.5, 2, 40)
    sigma = rng.uniform(0.5, 5, 40)
    gt, st = torch.tensor(g), torch.tensor(sigma**2)
    zero = torch.zeros_like(gt)
    for B in (1.0, 16.0, 300.0):
        beta_i = 1 / np.sqrt(1 + math.pi * (sigma / g) ** 2 / (2 * B))
        A = float(np.abs(g) @ beta_i)
        alg, erf = sign_alignment(gt, zero, st, B)
        assert alg == pytest.approx(A, rel=1e-12)
        assert erf == pytest.approx(sum(abs(a) * math.erf(abs(a) / s * math.sqrt(B / 2))
                                        for a, s in zip(g, sigma)), rel=1e-12)
        k2 = sign_matched_kappa2(np.abs(g).sum(), A, B)
        assert np.abs(g).sum() / math.sqrt(1 + math.pi * k2 / (2 * B)) == pytest.approx(A)
    l1 = np.abs(g).sum()
    big, small = 1e6, 1e-7  # relative corrections ~ max r_i / B and B / min r_i
    k_big = sign_matched_kappa2(l1, sign_alignment(gt, zero, st, big)[0], big)
    assert k_big == pytest.approx((sigma**2 / np.abs(g)).sum() / l1, rel=1e-3)
    k_small = sign_matched_kappa2(l1, sign_alignment(gt, zero, st, small)[0], small)
    assert k_small == pytest.approx((l1 / (g**2 / sigma).sum()) ** 2, rel=1e-3)


def test_abs_mean_debiased_bias_is_bounded_as_stated():
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(400_000, generator=gen, dtype=f64)
    one = torch.ones_like(z)
    for snr in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 6.0):
        est = abs_mean_debiased(snr + z, one)
        raw = float((snr + z).abs().mean()) - snr
        bias = float(est.mean()) - snr
        assert abs(bias) <= (0.48 if snr < 0.5 else 0.1)
        if snr <= 1.0:
            assert abs(bias) <= 0.6 * raw  # |m| is biased by 0.8 s at g = 0
    assert float(abs_mean_debiased(torch.tensor([-2.0]), torch.zeros(1))) == 2.0


# ------------------------------------------------------------------------------ exact population
class Population:
    """A small float64 MLP (26 parameters) and M regression examples: exact per-example
    gradients, g, sigma^2 (divisor M: batches are drawn with replacement), and the full-data
    Hessian."""

    def __init__(self, seed=0, M=4096):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        self.X = torch.randn(M, 3, dtype=f64)
        self.Y = torch.tanh(self.X @ torch.randn(3, 2, dtype=f64)) + 0.5 * torch.randn(M, 2,
                                                                                       dtype=f64)
        self.params = list(self.model.parameters())
        self.refresh()

    @staticmethod
    def loss_fn(m, b):
        return F.mse_loss(m(b[0]), b[1])

    def _flat_loss(self, v, x, y):
        d, i = {}, 0
        for (name, p) in self.model.named_parameters():
            d[name] = v[i:i + p.numel()].view_as(p)
            i += p.numel()
        return F.mse_loss(torch.func.functional_call(self.model, d, (x,)), y)

    def refresh(self):
        w = torch.cat([p.detach().reshape(-1) for p in self.params])
        per = torch.func.vmap(torch.func.grad(lambda v, x, y: self._flat_loss(v, x[None], y[None])),
                              in_dims=(None, 0, 0))(w, self.X, self.Y)
        self.g, self.sigma2 = per.mean(0), per.var(0, correction=0)
        self.H = torch.autograd.functional.hessian(lambda v: self._flat_loss(v, self.X, self.Y), w)
        self.s = torch.where(self.g >= 0, 1.0, -1.0).double()

    def sign_list(self):
        return [x.view_as(p) for x, p in zip(self.s.split([p.numel() for p in self.params]),
                                             self.params)]

    def exact(self, B, precond=None):
        g, sig2, H, s = self.g, self.sigma2, self.H, self.s
        l1 = float(g.abs().sum())
        A = float((g.square() / (g.square() + math.pi * sig2 / (2 * B)).sqrt()).sum())
        k2 = 2 * B / math.pi * ((l1 / A) ** 2 - 1)
        t, q = float(H.trace()), float(s @ H @ s)
        out = {"l1": l1, "kappa2": k2, "tr_h": t, "s_h_s": q, "off_h": q - t,
               "off_ratio": (q - t) / t, "beta_noise": math.sqrt(t / (q - t)),
               "eta_max": l1 / (2 * math.sqrt(t * (q - t))), "lr_inf": l1 / q,
               "b_noise2": math.pi * k2 * t / (2 * q), "b_simple": float(sig2.sum() /
                                                                       g.square().sum()),
               "inv_b_peak": 2 * (q - 2 * t) / (math.pi * k2 * t)}
        if precond is not None:
            out["b_precond"] = float(precond @ sig2 / (precond @ g.square()))
        return out

    def batch(self, gen, n):
        idx = torch.randint(0, self.X.shape[0], (n,), generator=gen)
        return self.X[idx], self.Y[idx]


def test_per_example_moments_match_explicit_gradients():
    pop = Population(M=64)
    pop.refresh()
    s1, s2, n = per_example_moments(pop.model, pop.loss_fn, (pop.X, pop.Y), pop.params,
                                    chunk_size=5)
    assert n == 64
    close(s1 / n, pop.g)
    close(s2 / n - (s1 / n).square(), pop.sigma2)


@pytest.fixture(scope="module")
def adam_population():
    pop = Population(seed=3, M=2048)  # beta_noise ~ 0.8: a surge with a peak near B = 18
    opt = torch.optim.Adam(pop.params, lr=1e-3)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):  # an Adam state to read the preconditioner from
        opt.zero_grad()
        pop.loss_fn(pop.model, pop.batch(gen, 64)).backward()
        opt.step()
    opt.zero_grad()
    pop.refresh()
    return pop, opt


def test_estimates_are_within_their_standard_errors_of_the_exact_values(adam_population):
    """Repeated calls on fresh batches: every estimate's z-score against the exact population
    value is O(1) (mean ~ 0, spread ~ 1): the values are unbiased to within their errors and
    the jackknife errors are honest."""
    pop, opt = adam_population
    B, R = 32, 30
    P = torch.cat([x.reshape(-1) for x in adam_preconditioner(opt, pop.params)])
    exact = pop.exact(B, P)
    assert exact["inv_b_peak"] > 0  # this population has a peak
    est = AdamNoiseEstimator(pop.model, pop.loss_fn, batch_size=B, seed=1)
    gen = torch.Generator().manual_seed(3)
    z = {k: [] for k in exact}
    covered = 0
    for _ in range(R):
        res = est.update(pop.batch(gen, 512), sign=pop.sign_list(), optimizer=opt)
        for k, v in exact.items():
            e = getattr(res, k)
            assert e.reason is None
            z[k].append((e.value - v) / e.stderr)
        lo, hi = res.b_peak_interval()
        covered += lo <= 1 / exact["inv_b_peak"] <= hi
    assert est.calls == R and res.call == R and res.groups == 16
    for k, zs in z.items():  # the jackknife has K - 1 = 15 degrees of freedom
        zs = np.array(zs)
        assert abs(zs.mean()) < 0.7, (k, zs.mean())
        assert 0.6 < zs.std() < 1.6, (k, zs.std())
        assert np.mean(np.abs(zs) < 3) >= 0.85, (k, zs)
    assert covered >= 0.8 * R  # B_peak's interval, from inv_b_peak's


def test_the_batch_sign_and_its_flip_count(adam_population):
    pop, _ = adam_population
    est = AdamNoiseEstimator(pop.model, pop.loss_fn, batch_size=32, groups=8)
    gen = torch.Generator().manual_seed(5)
    predicted, observed = [], []
    for _ in range(12):
        X, Y = pop.batch(gen, 256)
        res = est.update((X, Y))
        mean = per_example_moments(pop.model, pop.loss_fn, (X, Y), pop.params)[0]
        observed.append(int((torch.where(mean >= 0, 1.0, -1.0).double() != pop.s).sum()))
        predicted.append(res.sign_flips_expected)
    assert res.coordinates == 26
    assert abs(np.mean(observed) - np.mean(predicted)) < 1.0 + 0.5 * np.mean(predicted)


def test_alignment_table_reports_mean_field_against_per_coordinate(adam_population):
    pop, _ = adam_population
    B = 32
    res = AdamNoiseEstimator(pop.model, pop.loss_fn, batch_size=B, groups=4).update(
        pop.batch(torch.Generator().manual_seed(2), 2048))
    rows = {b: r for b, *r in res.alignment_table}
    assert sorted(rows) == [B * 2.0**k for k in range(-3, 4)]
    mf, alg, _ = rows[B]
    assert mf == pytest.approx(alg, rel=1e-9)  # matched at B by construction
    # against the exact population sums, within a few standard errors of l1
    zero = torch.zeros_like(pop.g)
    for b, (mf, alg, erf) in rows.items():
        ex_alg, ex_erf = sign_alignment(pop.g, zero, pop.sigma2, b)
        assert alg == pytest.approx(ex_alg, abs=4 * res.l1.stderr)
        assert erf == pytest.approx(ex_erf, abs=4 * res.l1.stderr)
        assert math.isfinite(mf)


# ------------------------------------------------------------------------------ undefined states
class Quadratic(nn.Module):
    """Per-example loss 0.5 w^T H w - x^T w: Hessian H, per-example gradient H w - x."""

    def __init__(self, H, w):
        super().__init__()
        self.register_buffer("H", H)
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return 0.5 * self.w @ self.H @ self.w - x @ self.w


def quadratic_case(off_scale, seed=0, d=6):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen, dtype=f64)
    x_mean = torch.randn(d, generator=gen, dtype=f64)
    D = torch.diag(torch.rand(d, generator=gen, dtype=f64) + 0.5)
    s = torch.sign(D @ w - x_mean)
    H = D + off_scale * (torch.outer(s, s) - torch.eye(d, dtype=f64)) / (d - 1)
    return Quadratic(H, w), x_mean, s, float(torch.trace(H)), float(s @ H @ s)


@pytest.mark.parametrize("off_scale,defined", [
    (0.0, {"beta_noise": False, "b_peak": False}),   # diagonal H: no off-diagonal sum
    (-0.5, {"beta_noise": False, "b_peak": False}),  # negative off-diagonal sum
    (0.5, {"beta_noise": True, "b_peak": False}),    # 0 < off < tr H: beta_noise > 1
    (20.0, {"beta_noise": True, "b_peak": True}),    # off > tr H: a peak
])
@pytest.mark.parametrize("device", devices())
def test_quadratic_curvature_and_undefined_states(off_scale, defined, device):
    """``H`` constant: ``s^T H s`` is exact, ``beta_noise``, ``eta_max`` and ``B_peak`` follow
    from the exact sums, and each undefined state is named."""
    model, x_mean, s, t, q = quadratic_case(off_scale)
    gen = torch.Generator().manual_seed(1)
    X = x_mean + 0.3 * torch.randn(400, 6, generator=gen, dtype=f64)
    model, X, s = model.to(device), X.to(device), s.to(device)
    est = AdamNoiseEstimator(model, lambda m, x: m(x).mean(), batch_size=8, groups=8, probes=2)
    res = est.update(X, sign=[s])
    assert res.s_h_s.value == pytest.approx(q, rel=1e-10)
    assert abs(res.tr_h.value - t) <= 4 * res.tr_h.stderr + 1e-12
    assert (res.off_h.value > 0) == (off_scale > 0)
    for k, ok in defined.items():
        e = getattr(res, k)
        assert math.isfinite(e.value) == ok, (k, e)
        assert (e.reason is None) == ok
    if not defined["beta_noise"]:
        assert "no beta_noise" in res.beta_noise.reason and "no beta_noise" in res.eta_max.reason
    else:
        tr = res.tr_h.value
        assert res.beta_noise.value == pytest.approx(math.sqrt(tr / (q - tr)), rel=1e-12)
        assert res.eta_max.value == pytest.approx(
            res.l1.value / (2 * math.sqrt(tr * (q - tr))), rel=1e-12)
    if defined["b_peak"]:
        assert res.b_peak.value == pytest.approx(
            math.pi * res.kappa2.value * res.tr_h.value / (2 * (q - 2 * res.tr_h.value)),
            rel=1e-10)
    elif defined["beta_noise"]:
        assert res.beta_noise.value > 1 and "no peak" in res.b_peak.reason
    for k in ("b_noise2", "lr_inf", "kappa2"):
        assert getattr(res, k).reason is None  # defined with or without a surge


def test_nonpositive_curvature_is_named():
    model, x_mean, _, _, _ = quadratic_case(0.0)
    model.H.neg_()
    X = x_mean + 0.3 * torch.randn(64, 6, dtype=f64)
    res = AdamNoiseEstimator(model, lambda m, x: m(x).mean(), batch_size=8, groups=4).update(X)
    assert res.tr_h.reason is None and res.tr_h.value < 0
    for k in ("beta_noise", "eta_max", "b_peak", "b_noise2", "lr_inf"):
        assert "tr(H) estimate <= 0" in getattr(res, k).reason


def test_summarise_groups_refuses_bad_shapes():
    with pytest.raises(ValueError, match="K >= 2"):
        summarise_groups(torch.zeros(1, 3), torch.zeros(1, 3), [4], [1.0], [1.0], 8)


# ------------------------------------------------------------------------------ sign EMA
def test_gradient_sign_ema_variance_is_honest():
    """Batch gradients ``N(g, sigma^2/B)`` per step: the EMA's stated variance matches the
    spread of its mean about g, so its flip probabilities and |g| are calibrated."""
    gen = torch.Generator().manual_seed(8)
    P = 4000
    g = torch.randn(P, generator=gen, dtype=f64) * 0.3
    p = nn.Parameter(torch.zeros(P, dtype=f64))
    ema = GradientSignEMA([p], beta=0.9)
    assert float(ema.flip_probability()[0].mean()) == 0.5
    for _ in range(60):
        p.grad = g + torch.randn(P, generator=gen, dtype=f64)
        ema.update()
    m, v = ema.mean()[0], ema.var_mean()[0]
    zs = (m - g) / v.sqrt()
    assert 0.9 < float(zs.std()) < 1.1 and abs(float(zs.mean())) < 0.06
    flips = (ema.sign()[0] != torch.sign(g)).double()
    assert float(flips.sum()) == pytest.approx(float(ema.flip_probability()[0].sum()), rel=0.25)
    assert float(ema.abs_debiased()[0].sum()) == pytest.approx(float(g.abs().sum()), rel=0.05)
    with pytest.raises(ValueError, match="one tensor per parameter"):
        ema.update([g, g])
    again = GradientSignEMA([p], beta=0.5)
    again.load_state_dict(ema.state_dict())
    p.grad = g.clone()
    ema.update()
    again.update()
    close(again.mean()[0], ema.mean()[0])
    close(again.var_mean()[0], ema.var_mean()[0])


# ------------------------------------------------------------------------------ integration
def test_estimator_passes_are_not_counted_by_the_monitor():
    pop = Population(M=256)
    mon = GradStatsMonitor(pop.model, mode="hooks")
    est = AdamNoiseEstimator(pop.model, pop.loss_fn, batch_size=16, groups=4, monitor=mon,
                             every=2)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x, y = pop.batch(gen, 16)
        pop.loss_fn(pop.model, (x, y)).backward()
        assert est.maybe_update(step, pop.batch(gen, 64)) is None or step % 2 == 0
        st = mon.step()
        assert st.n == 16
        for p in pop.params:
            p.grad = None
    assert est.calls == 2
    with pytest.raises(ValueError, match="no Adam second-moment state"):
        adam_preconditioner(torch.optim.Adam(pop.params), pop.params)
    with pytest.raises(ValueError, match="fewer than groups"):
        est.update(pop.batch(gen, 3))
    with pytest.raises(ValueError, match="sign must hold"):
        est.update(pop.batch(gen, 8), sign=[torch.zeros_like(p) for p in pop.params])
