"""Tests for gradstats.schedulers: LR schedules, resumption, the batch-size controller."""

import io
import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    SequentialLR,
)

from gradstats.schedulers import (
    AdaScaleLR,
    BatchSizeController,
    BatchSizeRuleLR,
    ControlledBatchSampler,
    WarmupConstant,
    WarmupCosine,
    warmup_cosine_factor,
)


def make_opt(lrs=(0.1, 0.03)):
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(ps, lrs)], lr=lrs[0])


def lrs_of(opt):
    return [float(g["lr"]) for g in opt.param_groups]


def expected_warmup_cosine(t, W, T, m):  # written independently of the module
    if t < W:
        return (t + 1) / W
    if t >= T:
        return m
    return m + (1 - m) * (1 + math.cos(math.pi * (t - W) / (T - W))) / 2


def roundtrip(obj_state):
    buf = io.BytesIO()
    torch.save(obj_state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# --------------------------------------------------------------------------- warm-up schedules
@pytest.mark.parametrize("W,T,m", [(5, 40, 0.1), (0, 17, 0.0), (3, 3, 0.25), (1, 12, 0.5)])
def test_warmup_cosine_sequence(W, T, m):
    opt = make_opt()
    sched = WarmupCosine(opt, W, T, m)
    for t in range(T + 5):
        for base, lr in zip((0.1, 0.03), lrs_of(opt)):
            assert lr == pytest.approx(
                base * expected_warmup_cosine(t, W, T, m), rel=1e-9, abs=1e-15
            )
        assert sched.get_last_lr() == pytest.approx(lrs_of(opt))
        opt.step()
        sched.step()


def test_warmup_constant_and_factor_shape():
    opt = make_opt()
    sched = WarmupConstant(opt, 4)
    seen = []
    for _ in range(10):
        seen.append(lrs_of(opt)[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.025, 0.05, 0.075, 0.1] + [0.1] * 6)
    f = [warmup_cosine_factor(t, 10, 50, 0.2) for t in range(60)]
    assert all(a < b for a, b in pairwise(f[:10]))
    assert all(a >= b for a, b in pairwise(f[10:]))
    assert (
        min(f[10:]) == pytest.approx(0.2)
        and max(f) == pytest.approx(1.0)
        and f[0] == pytest.approx(0.1)
    )


def test_warmup_argument_errors():
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(make_opt(), 10, 5)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        WarmupCosine(make_opt(), 1, 5, 1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupConstant(make_opt(), -1)


# --------------------------------------------------------------------------- resumption
def run_schedule(build, n, hook=None, split=None):
    """lr sequence over n steps; with split, save at step `split`, rebuild, load and go on."""
    opt = make_opt()
    sched = build(opt)
    out = []
    for t in range(n):
        if split is not None and t == split:
            state = roundtrip({"opt": opt.state_dict(), "sched": sched.state_dict()})
            opt = make_opt()
            sched = build(opt)
            sched.load_state_dict(state["sched"])
            opt.load_state_dict(state["opt"])
        if hook:
            hook(sched, t)
        out.append(lrs_of(opt))
        opt.step()
        sched.step()
    return out


rng_gains = np.random.default_rng().uniform(1.0, 4.0, 60)
batch_plan = {7: 64, 19: 256, 33: 48}


def gain_hook(sched, t):
    sched.set_gain(rng_gains[t])


def batch_hook(sched, t):
    if t in batch_plan:
        sched.set_batch_size(batch_plan[t], b_noise=100.0 + t)


@pytest.mark.parametrize(
    "build,hook",
    [
        (lambda o: WarmupCosine(o, 6, 40, 0.1), None),
        (lambda o: WarmupConstant(o, 9), None),
        (lambda o: AdaScaleLR(o, lambda tau: warmup_cosine_factor(tau, 10, 120, 0.05)), gain_hook),
        (lambda o: BatchSizeRuleLR(o, "sgd-optimal", 32, b_noise=100.0), batch_hook),
        (
            lambda o: SequentialLR(o, [LinearLR(o, 0.2, 1.0, 5), WarmupCosine(o, 0, 30, 0.1)], [5]),
            None,
        ),
        (lambda o: ChainedScheduler([WarmupCosine(o, 4, 50, 0.0), ExponentialLR(o, 0.97)]), None),
    ],
    ids=["cosine", "constant", "adascale", "batchrule", "sequential", "chained"],
)
def test_resume_gives_identical_lr_sequence(build, hook):
    full = run_schedule(build, 50, hook)
    for split in (1, 13, 37):
        assert run_schedule(build, 50, hook, split=split) == full


# --------------------------------------------------------------------------- composition
def test_sequential_lr_with_warmup_cosine():
    opt = make_opt((1.0,))
    sched = SequentialLR(opt, [LinearLR(opt, 0.2, 1.0, 5), WarmupCosine(opt, 0, 30, 0.1)], [5])
    for t in range(40):
        want = 0.2 + 0.8 * t / 5 if t < 5 else expected_warmup_cosine(t - 5, 0, 30, 0.1)
        assert lrs_of(opt)[0] == pytest.approx(want, rel=1e-9)
        opt.step()
        sched.step()


def test_chained_scheduler_multiplies():
    opt = make_opt()
    bs = BatchSizeRuleLR(opt, "linear", 32)
    sched = ChainedScheduler([WarmupCosine(opt, 4, 30, 0.1), ExponentialLR(opt, 0.95), bs])
    B = 32
    for t in range(35):
        if t in (6, 20):
            B *= 4
            bs.set_batch_size(B)
        for base, lr in zip((0.1, 0.03), lrs_of(opt)):
            want = base * expected_warmup_cosine(t, 4, 30, 0.1) * 0.95**t * B / 32
            assert lr == pytest.approx(want, rel=1e-9)
        opt.step()
        sched.step()


# --------------------------------------------------------------------------- AdaScale
def test_adascale_lr_tau_and_gain():
    def lam(tau):
        return warmup_cosine_factor(tau, 8, 100, 0.0)

    gains = np.random.default_rng().uniform(1, 8, 40)
    for scale in (True, False):
        opt = make_opt()
        sched = AdaScaleLR(opt, lam, scale_lr_by_gain=scale)
        tau = 0.0
        for r in gains:
            sched.set_gain(r)
            for base, lr in zip((0.1, 0.03), lrs_of(opt)):
                assert lr == pytest.approx(base * lam(tau) * (r if scale else 1.0), rel=1e-12)
            opt.step()
            sched.step()
            tau += r
            assert sched.tau == pytest.approx(tau, rel=1e-12)
            assert sched.state_dict()["tau"] == pytest.approx(tau, rel=1e-12)
    with pytest.raises(ValueError, match="gain"):
        sched.set_gain(float("nan"))


def test_adascale_with_unit_gain_equals_lambda_lr():
    def lam(t):
        return warmup_cosine_factor(t, 5, 30, 0.1)

    o1, o2 = make_opt(), make_opt()
    s1, s2 = AdaScaleLR(o1, lam), LambdaLR(o2, lam)
    for _ in range(35):
        assert lrs_of(o1) == pytest.approx(lrs_of(o2), rel=1e-12)
        for o, s in ((o1, s1), (o2, s2)):
            o.step()
            s.step()


# --------------------------------------------------------------------------- batch-size rule
@pytest.mark.parametrize(
    "rule", ["linear", "sqrt", "sgd-optimal", "adam-optimal", "adam-surge", "adam-sign-descent"]
)
def test_batch_size_rule_lr(rule):
    rng = np.random.default_rng()
    B0 = 64
    kw = {
        "b_noise": rng.uniform(10, 1000),
        "kappa2": rng.uniform(10, 1000),
        "beta_noise": rng.uniform(0.2, 0.9),
        "off_ratio": rng.uniform(-0.9, 6.0),
    }

    def eta(B):  # independent unnormalised forms
        beta = (1 + math.pi * kw["kappa2"] / (2 * B)) ** -0.5
        return {
            "linear": B,
            "sqrt": math.sqrt(B),
            "sgd-optimal": 1 / (1 + kw["b_noise"] / B),
            "adam-optimal": beta,
            "adam-surge": 1 / (kw["beta_noise"] / beta + beta / kw["beta_noise"]),
            "adam-sign-descent": beta / (1 + kw["off_ratio"] * beta**2),
        }[rule]

    opt = make_opt()
    sched = BatchSizeRuleLR(opt, rule, B0, **kw)
    for B in rng.integers(1, 4096, 6):
        sched.set_batch_size(int(B))
        for base, lr in zip((0.1, 0.03), lrs_of(opt)):
            assert lr == pytest.approx(base * eta(B) / eta(B0), rel=1e-9)
        opt.step()
        sched.step()
        assert lrs_of(opt)[0] == pytest.approx(0.1 * eta(B) / eta(B0), rel=1e-9)  # step keeps it
    with pytest.raises(ValueError, match="rule must be one of"):
        BatchSizeRuleLR(make_opt(), "cubic", 32)


# --------------------------------------------------------------------------- controller
def nearest_multiple(x, m):
    ks = np.arange(0, int(x // m) + 3)
    return int(ks[np.argmin(np.abs(x - ks * m))] * m)


def test_controller_clip_round_and_accumulation():
    rng = np.random.default_rng()
    for _ in range(200):
        micro = int(rng.choice([1, 2, 4, 8]))
        m = micro * int(rng.integers(1, 5))
        b_min, b_max = int(rng.integers(1, 64)), int(rng.integers(256, 4096))
        alpha = rng.uniform(0.2, 3)
        c = BatchSizeController(b_min, b_max, micro, alpha=alpha, multiple=m, hysteresis=0.0)
        x = float(np.exp(rng.uniform(-2, 10)))
        got = c.update(x)
        lo, hi = m * math.ceil(b_min / m), m * (b_max // m)
        want = min(max(nearest_multiple(min(max(alpha * x, b_min), b_max), m), lo), hi)
        assert got == want == c.batch_size
        assert got % m == 0 and c.accumulation_steps * micro == got


def test_controller_hysteresis_and_bad_measurements():
    c = BatchSizeController(8, 1024, 8, hysteresis=0.1)
    assert c.batch_size == 8
    assert c.update(128) == 128
    assert c.update(136) == 128  # +6.25% <= 10%
    assert c.update(120) == 128  # -6.25%
    assert c.update(144) == 144  # +12.5%
    for bad in (float("nan"), float("inf"), -float("inf"), -5.0, 0.0, None, "x"):
        assert c.update(bad) == 144
    assert c.steps == 11 and c.last_b_simple == 144.0
    assert c.update(1e9) == 1024
    assert c.update(1e-3) == 8


def test_controller_warmup_ramp():
    W, b_min, b_max, m = 10, 32, 1024, 16
    c = BatchSizeController(b_min, b_max, 16, warmup_steps=W, hysteresis=0.0)
    for n in range(1, 15):
        cap = b_min + (b_max - b_min) * min(1.0, n / W)
        assert c.update(1e9) == m * math.floor(cap / m)


def test_controller_couples_lr_and_composes_with_schedule():
    opt = make_opt()
    sched = WarmupCosine(opt, 3, 40, 0.1)
    c = BatchSizeController(32, 2048, 32, hysteresis=0.0, lr_rule="sqrt", optimizer=opt)
    rng = np.random.default_rng()
    for t in range(30):
        B = c.update(float(rng.uniform(16, 3000)))
        for base, lr in zip((0.1, 0.03), lrs_of(opt)):
            assert lr == pytest.approx(
                base * expected_warmup_cosine(t, 3, 40, 0.1) * math.sqrt(B / 32), rel=1e-9
            )
        opt.step()
        sched.step()
        # the sqrt factor survives the scheduler's step
        assert lrs_of(opt)[0] == pytest.approx(
            0.1 * expected_warmup_cosine(t + 1, 3, 40, 0.1) * math.sqrt(B / 32)
        )


def test_controller_sgd_optimal_uses_measured_noise_scale():
    opt = make_opt((1.0,))
    c = BatchSizeController(16, 4096, 16, hysteresis=0.0, lr_rule="sgd-optimal", optimizer=opt)
    for x in (100.0, 400.0, 3000.0, 50.0):
        B = c.update(x)
        assert lrs_of(opt)[0] == pytest.approx((1 + x / 16) / (1 + x / B), rel=1e-9)


def run_controller(mk, inputs, feed, split=None):
    """``feed(controller, x)`` for each input, with the controller and its optimizer saved,
    rebuilt and restored from the saved state before input ``split``."""
    opt = make_opt()
    c, out = mk(opt), []
    for t, x in enumerate(inputs):
        if t == split:
            st = roundtrip({"c": c.state_dict(), "o": opt.state_dict()})
            opt = make_opt()
            c = mk(opt)
            c.load_state_dict(st["c"])
            opt.load_state_dict(st["o"])
        out.append((feed(c, x), c.accumulation_steps, lrs_of(opt)))
    return out


def test_controller_state_dict_resume():
    xs = np.random.default_rng().uniform(-100, 5000, 60)
    xs[::7] = np.nan

    def mk(o):
        return BatchSizeController(
            16, 2048, 8, multiple=16, warmup_steps=20, lr_rule="sqrt", optimizer=o
        )

    full = run_controller(mk, xs, lambda c, x: c.update(x))
    assert len({b for b, _, _ in full}) > 3
    assert run_controller(mk, xs, lambda c, x: c.update(x), split=25) == full


def test_controller_argument_errors():
    with pytest.raises(ValueError, match="multiple must be a multiple of micro_batch_size"):
        BatchSizeController(8, 64, 4, multiple=6)
    with pytest.raises(ValueError, match="b_max"):
        BatchSizeController(64, 8, 4)
    with pytest.raises(ValueError, match="no multiple"):
        BatchSizeController(17, 30, 32)
    with pytest.raises(ValueError, match="lr_rule"):
        BatchSizeController(8, 64, 4, lr_rule="cubic")
    with pytest.raises(ValueError, match="micro_batch_size"):
        BatchSizeController(8, 64, 0)


# --------------------------------------------------------------------------- sampler
def test_sampler_follows_controller():
    n = 4000  # ~20 batches: enough that several sizes occur (seeded: not a flaky count)
    c = BatchSizeController(16, 256, 16, hysteresis=0.0)
    sampler = ControlledBatchSampler(torch.utils.data.SequentialSampler(range(n)), c)
    sizes, seen = [], []
    measurements = iter(np.random.default_rng(0).uniform(1, 400, 1000))
    for batch in sampler:
        assert len(batch) == c.batch_size or len(seen) + len(batch) == n
        sizes.append(len(batch))
        seen.extend(batch)
        c.update(next(measurements))
    assert seen == list(range(n))
    assert len(set(sizes)) > 3


def test_sampler_micro_batches_drop_last_len_and_dataloader():
    n = 203
    c = BatchSizeController(32, 256, 8, hysteresis=0.0)
    c.update(64)
    for drop_last in (False, True):
        for micro in (False, True):
            s = ControlledBatchSampler(range(n), c, drop_last=drop_last, micro_batches=micro)
            batches = list(s)
            assert len(s) == len(batches)
            size = 8 if micro else 64
            assert all(len(b) == size for b in batches[:-1])
            assert sum(map(len, batches)) == (n // 64 * 64 if drop_last else n)
    s = ControlledBatchSampler(range(n), c, micro_batches=True)
    first = list(s)[: c.accumulation_steps]
    assert [i for b in first for i in b] == list(range(64))
    ds = torch.utils.data.TensorDataset(torch.arange(n))
    dl = torch.utils.data.DataLoader(ds, batch_sampler=ControlledBatchSampler(range(n), c))
    got = [x.shape[0] for (x,) in dl]
    assert got[:3] == [64, 64, 64] and sum(got) == n


# --------------------------------------------------------------------------- controller, Adam
def sign_descent_eta(B, kappa2, rho):  # independent form of the measured curve
    beta = (1 + math.pi * kappa2 / (2 * B)) ** -0.5
    return beta / (1 + rho * beta**2)


@pytest.mark.parametrize("rho", [-0.5, 0.4, 2.5, 12.0])
def test_controller_adam_plateau_targets_the_lr_plateau(rho):
    """The target is the smallest batch size whose optimal lr is within tol of the best one
    (found here by brute force over integers), rounded to the multiple; the lr follows the
    measured curve."""
    kappa2, tol, m = 300.0, 0.1, 8
    bs = np.arange(1, 200_000)
    eta = sign_descent_eta(bs, kappa2, rho)
    sup = max(eta.max(), 1 / (1 + rho) if rho <= 1 else 0.5 / math.sqrt(rho))
    first = int(bs[np.argmax(eta >= (1 - tol) * sup)])
    opt = make_opt((1.0,))
    c = BatchSizeController(8, 100_000, 8, hysteresis=0.0, target="adam-plateau", tol=tol,
                            lr_rule="adam-sign-descent", optimizer=opt)
    got = c.update(float("nan"), kappa2=kappa2, off_ratio=rho)
    assert abs(got - first) <= m  # the continuous threshold, rounded to a multiple of 8
    assert got % m == 0
    assert lrs_of(opt)[0] == pytest.approx(
        sign_descent_eta(got, kappa2, rho) / sign_descent_eta(8, kappa2, rho), rel=1e-9)
    assert c.last_kappa2 == kappa2 and c.last_off_ratio == rho


def test_controller_adam_noise2_and_fixed_parameters():
    c = BatchSizeController(8, 4096, 8, hysteresis=0.0, alpha=2.0, target="adam-noise2",
                            off_ratio=1.5)
    for kappa2 in (40.0, 400.0, 4000.0):
        want = min(max(2.0 * math.pi * kappa2 / (2 * (1 + 1.5)), 8), 4096)
        assert c.update(float("nan"), kappa2=kappa2) == nearest_multiple(want, 8)
    # no kappa2 measured: B_simple stands in for it
    assert c.update(400.0) == nearest_multiple(2.0 * math.pi * 400.0 / 5.0, 8)
    before = c.batch_size
    for bad in (float("nan"), -3.0):  # bad measurements keep the size
        assert c.update(1.0, kappa2=bad) == before
    assert c.update(1.0, kappa2=50.0, off_ratio=-1.5) == before
    with pytest.raises(ValueError, match="needs off_ratio"):
        BatchSizeController(8, 64, 8, target="adam-plateau").update(1.0, kappa2=3.0)
    with pytest.raises(ValueError, match="target must be one of"):
        BatchSizeController(8, 64, 8, target="adam")
    with pytest.raises(ValueError, match="tol must be in"):
        BatchSizeController(8, 64, 8, target="adam-plateau", tol=1.0)


def test_controller_adam_state_dict_resume():
    rng = np.random.default_rng()
    meas = [(float(rng.uniform(10, 3000)), float(rng.uniform(-0.5, 8))) for _ in range(40)]

    def mk(o):
        return BatchSizeController(16, 2048, 8, multiple=16, target="adam-plateau",
                                   lr_rule="adam-sign-descent", optimizer=o)

    def feed(c, m):
        return c.update(None, kappa2=m[0], off_ratio=m[1])

    full = run_controller(mk, meas, feed)
    assert len({b for b, _, _ in full}) > 3
    assert run_controller(mk, meas, feed, split=17) == full
