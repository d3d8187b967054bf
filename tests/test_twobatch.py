"""The two-batch estimator against per-example autograd, in one process and on gloo ranks.

References are formed here from explicit per-example gradients (torch.func) and the loss weights
the test itself puts on each example; the statistical tests draw Gaussian per-example gradients
of known mean and covariance and check the mean over many steps against the truth.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import shared_pool  # noqa: E402
from monitor_problems import PROBLEMS, data, example_losses, per_example_grads  # noqa: E402

from gradstats import GradStatsMonitor  # noqa: E402
from gradstats.estimators import NoiseScaleEMA, StepEstimate  # noqa: E402
from gradstats.twobatch import TwoBatchEstimator, two_batch_estimate  # noqa: E402

BETA, LR, STEPS = 0.6, 0.05, 3
FIELDS = ("tr_sigma", "g2", "b_simple", "tr_sigma_ema", "g2_ema", "b_simple_ema")
# Gaussian per-example gradients: g_i = z_i ~ N(MU, diag(COV)), so G = MU and tr(Sigma) = sum COV.
MU = torch.tensor([0.6, -0.4, 0.3, 0.0, 0.5, -0.2], dtype=torch.float64)
COV = torch.tensor([1.0, 0.5, 2.0, 0.8, 0.3, 1.4], dtype=torch.float64)


class Tied(nn.Module):
    """One Linear used twice: its hook must see the sum over both uses."""

    def __init__(self):
        super().__init__()
        self.inp, self.mix, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.mix(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.mix(h)))


def _model(tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return (Tied() if tied else PROBLEMS[0].make_model()).double()


def _weight(b: int, k: int, reduction: str, accumulation: str) -> float:
    """What the test's loss multiplies each example's loss by."""
    return (1.0 / max(b, 1) if reduction == "mean" else 1.0) * (
        1.0 / k if accumulation == "mean" else 1.0)


def _micro(step: int, rank: int, sizes: list[int]):
    X, Y = data(PROBLEMS[0], sum(sizes), seed=1000 * step + rank)
    return list(zip(X.split(sizes), Y.split(sizes)))


def _backward(model, x, y, w: float) -> None:
    (example_losses(model(x), y).sum() * w).backward()


def _train(model, est, rank: int, sizes: list[int], reduction: str, accumulation: str,
           sync=lambda last: contextlib.nullcontext()) -> list[dict]:
    """STEPS SGD steps over ``sizes`` micro-batches; ``sync(last)`` wraps each backward."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    got = []
    for step in range(STEPS):
        for j, (x, y) in enumerate(_micro(step, rank, sizes)):
            with sync(j == len(sizes) - 1):
                _backward(model, x, y, _weight(len(x), len(sizes), reduction, accumulation))
            est.count(len(x))
        got.append(_record(est.step()))
        opt.step()
        opt.zero_grad()
    return got


def _record(st) -> dict:
    return {f: getattr(st, f) for f in FIELDS} | {"n": st.n, "units": st.units}


def _reference(ranks: list[list[int]], reduction: str, accumulation: str, unit: str,
               tied: bool = False) -> list[dict]:
    """Per step: units of examples with weights c_i (the loss), normalised gradients
    g_u = sum c_i g_i / sum c_i, v_u = sum (c_i / sum c)^2, G_big = sum_all c_i g_i / sum c,
    W_u = sum_u c / sum c; tr = (S - |G_big|^2)/(vbar - V), |G|^2 = S - tr vbar. ``unit`` is
    "rank" (DDP) or "micro" (one process, FSDP2). Parameters follow SGD on the DDP average."""
    model = _model(tied)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ema, out, world = NoiseScaleEMA(BETA), [], len(ranks)
    for step in range(STEPS):
        units, all_g, all_c = [], [], []
        for r, sizes in enumerate(ranks):
            k, members = len(sizes), []
            for x, y in _micro(step, r, sizes):
                if len(x) == 0:
                    continue
                g = per_example_grads(model, x, y)
                c = torch.full((len(x),), _weight(len(x), k, reduction, accumulation),
                               dtype=torch.float64)
                members.append((g, c))
                all_g.append(g)
                all_c.append(c)
            groups = members if unit == "micro" else [
                (torch.cat([g for g, _ in members]), torch.cat([c for _, c in members]))
            ] if members else []
            units += [(c @ g / c.sum(), ((c / c.sum()) ** 2).sum(), c.sum()) for g, c in groups]
        g_all, c_all = torch.cat(all_g), torch.cat(all_c)
        big = c_all @ g_all / c_all.sum()
        W = torch.stack([u[2] for u in units]) / c_all.sum()
        v = torch.stack([u[1] for u in units])
        S = torch.stack([u[0].square().sum() for u in units]).mean()
        V = (W * W * v).sum()
        tr = (S - big.square().sum()) / (v.mean() - V)
        g2 = S - tr * v.mean()
        ema.update(StepEstimate(int(sum(map(sum, ranks))), float(tr), float(g2),
                                float(tr / g2), bool(g2 > 0), None))
        out.append({"tr_sigma": float(tr), "g2": float(g2), "b_simple": float(tr / g2),
                    "tr_sigma_ema": ema.tr_sigma, "g2_ema": ema.g2, "b_simple_ema": ema.b_simple,
                    "units": len(units)})
        # the optimizer sees the DDP average (1/world) sum_ranks sum_i c_i g_i
        flat = c_all @ g_all / world
        i = 0
        for p in model.parameters():
            p.grad = flat[i:i + p.numel()].view_as(p).clone()
            i += p.numel()
        opt.step()
    return out


def _assert_close(got: list[dict], want: list[dict], rtol: float = 1e-9) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["units"] == w["units"]
        for f in FIELDS:
            assert math.isclose(g[f], w[f], rel_tol=rtol, abs_tol=1e-12), (f, g[f], w[f])


# ----------------------------------------------------------------------------- one process
@pytest.mark.parametrize("sizes,reduction,accumulation,tied", [
    ([3, 4, 3], "mean", "mean", False),
    ([2, 5], "sum", "sum", True),
    ([4, 0, 3, 2], "mean", "sum", True),
])
def test_accumulation_in_one_process_matches_per_example_reference(sizes, reduction,
                                                                   accumulation, tied):
    model = _model(tied)
    est = TwoBatchEstimator(model, loss_reduction=reduction, accumulation=accumulation,
                            beta=BETA)
    got = _train(model, est, 0, sizes, reduction, accumulation)
    _assert_close(got, _reference([sizes], reduction, accumulation, "micro", tied))
    assert got[0]["n"] == sum(sizes)


def test_equal_batches_give_mccandlish_formulas():
    """B_small = b, B_big = k b: McCandlish et al. (2018, App. A) as published."""
    rng = np.random.default_rng(3)
    small, big, b, k = rng.uniform(2, 3), rng.uniform(0.5, 1.5), 8, 4
    est = two_batch_estimate(small, 1 / b, big, 1 / (k * b), n=k * b, units=k)
    B_s, B_b = b, k * b
    assert math.isclose(est.tr_sigma, (small - big) / (1 / B_s - 1 / B_b), rel_tol=1e-12)
    assert math.isclose(est.g2, (B_b * big - B_s * small) / (B_b - B_s), rel_tol=1e-12)


def _gaussian_step(model, est, sizes, gen) -> None:
    """One step whose per-example gradients are z_i ~ N(MU, diag(COV)): loss_i = w . z_i."""
    k = len(sizes)
    for b in sizes:
        z = MU + COV.sqrt() * torch.randn(b, len(MU), generator=gen, dtype=torch.float64)
        (model(z).sum() / (max(b, 1) * k)).backward()
        est.count(b)


def _within_3se(x: np.ndarray, truth: float) -> bool:
    return abs(x.mean() - truth) < 3 * x.std(ddof=1) / math.sqrt(len(x))


def test_one_process_is_unbiased_on_gaussian_gradients():
    model = nn.Linear(len(MU), 1, bias=False).double()
    est = TwoBatchEstimator(model, beta=0.9)
    gen = torch.Generator().manual_seed(5)
    tr, g2 = [], []
    for _ in range(400):
        _gaussian_step(model, est, [3, 5, 4, 4], gen)
        st = est.step()
        tr.append(st.tr_sigma)
        g2.append(st.g2)
        model.zero_grad()
    assert _within_3se(np.array(tr), float(COV.sum()))
    assert _within_3se(np.array(g2), float(MU.square().sum()))


def test_one_micro_batch_is_undefined_and_skipped_by_the_ema():
    model = _model()
    est = TwoBatchEstimator(model)
    (x, y), = _micro(0, 0, [6])
    _backward(model, x, y, 1 / 6)
    st = est.step(batch_size=6)
    assert not st.defined and "fewer than two" in st.reason
    assert math.isnan(st.tr_sigma) and math.isnan(st.tr_sigma_ema) and est.ema.steps == 0


def test_paused_backward_passes_are_not_counted():
    def run(extra: bool) -> float:
        model = _model()
        est = TwoBatchEstimator(model)
        for x, y in _micro(0, 0, [3, 4]):
            _backward(model, x, y, 1 / (2 * len(x)))
            if extra:
                with est.paused():
                    torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
            est.count(len(x))
        return est.step().tr_sigma

    assert run(True) == run(False)


def test_state_dict_resumes_bit_identically():
    def run(resume: bool) -> list[float]:
        model = _model()
        est, out = TwoBatchEstimator(model, beta=0.7), []
        for step in range(4):
            if resume and step == 2:
                sd = est.state_dict()
                est.detach()
                est = TwoBatchEstimator(model, beta=0.7)
                est.load_state_dict(sd)
            for x, y in _micro(step, 0, [3, 4]):
                _backward(model, x, y, 1 / (2 * len(x)))
                est.count(len(x))
            out.append(est.step().b_simple_ema)
            model.zero_grad()
        return out

    assert run(True) == run(False)


def test_misuse_is_named():
    model = _model()
    with pytest.raises(ValueError, match="loss_reduction"):
        TwoBatchEstimator(model, loss_reduction="token_mean")
    with pytest.raises(TypeError, match="nn.Module"):
        TwoBatchEstimator("model")
    with pytest.raises(ValueError, match="requires_grad"):
        TwoBatchEstimator(nn.Linear(2, 2).requires_grad_(False))
    est = TwoBatchEstimator(model)
    with pytest.raises(ValueError, match="batch_size"):
        est.count(-1)
    with pytest.raises(RuntimeError, match=r"no count\(batch_size\)"):
        est.step()
    with pytest.raises(RuntimeError, match="no backward pass"):
        est.count(3)
    (x, y), = _micro(0, 0, [4])
    _backward(model, x, y, 0.25)
    with pytest.raises(RuntimeError, match=r"after the last count\(\)"):
        est.step()
    est.detach()
    with pytest.raises(RuntimeError, match="detached"):
        est.count(4)
    est2 = TwoBatchEstimator(model)  # a fresh estimator on the same model counts as usual
    model.zero_grad()
    for x, y in _micro(0, 0, [2, 2]):
        _backward(model, x, y, 0.25)
        est2.count(2)
    assert est2.step().units == 2


def test_empty_micro_batch_with_a_gradient_is_refused():
    model = _model()
    est = TwoBatchEstimator(model)
    for x, y in _micro(0, 0, [3, 4]):
        _backward(model, x, y, 1.0)
        est.count(0 if len(x) == 3 else len(x))
    with pytest.raises(ValueError, match="batch_size=0"):
        est.step()


# ----------------------------------------------------------------------------- gloo ranks
@pytest.fixture(scope="module")
def pool():
    return shared_pool(4)


def _ddp_task(rank, group, ranks, reduction, accumulation, **ddp_kw):
    ddp = nn.parallel.DistributedDataParallel(_model(), process_group=group, **ddp_kw)
    est = TwoBatchEstimator(ddp, loss_reduction=reduction, accumulation=accumulation, beta=BETA)
    return _train(ddp, est, rank, ranks[rank], reduction, accumulation,
                  lambda last: contextlib.nullcontext() if last else ddp.no_sync())


@pytest.mark.parametrize("ranks,reduction,accumulation,view", [
    ([[4], [4]], "mean", "mean", False),
    ([[3], [5], [0], [2]], "mean", "mean", False),          # unequal, an empty rank
    ([[2, 3], [4]], "sum", "sum", False),                    # no_sync accumulation, sum loss
    ([[2, 1, 3], [3, 3], [5]], "mean", "mean", True),        # unequal micro-batches, no_sync
], ids=["2-equal", "4-unequal-empty", "2-nosync-sum", "3-nosync-mean-bucket-view"])
def test_ddp_matches_per_rank_reference(pool, ranks, reduction, accumulation, view):
    got = pool.run(_ddp_task, ranks, reduction, accumulation, world=len(ranks),
                   gradient_as_bucket_view=view)
    assert all(g == got[0] for g in got), "ranks disagree"
    _assert_close(got[0], _reference(ranks, reduction, accumulation, "rank"))


def test_ddp_formula_as_stated_for_unequal_ranks(pool):
    """The issue's formula, literally, from per-rank mean gradients (the empty rank excluded)."""
    ranks = [[3], [5], [0], [2]]
    got = pool.run(_ddp_task, ranks, "mean", "mean", world=4)[0][0]
    model = _model()
    g = [per_example_grads(model, x, y).mean(0) for r, s in enumerate(ranks)
         for x, y in _micro(0, r, s) if len(x)]
    b = torch.tensor([s[0] for s in ranks if s[0]], dtype=torch.float64)
    R, big = len(g), torch.stack(g).mean(0)
    mean_sq = torch.stack([t.square().sum() for t in g]).mean()
    tr = (mean_sq - big.square().sum()) / ((1 / R) * (1 - 1 / R) * (1 / b).sum())
    g2 = mean_sq - tr * (1 / b).mean()
    assert math.isclose(got["tr_sigma"], float(tr), rel_tol=1e-9)
    assert math.isclose(got["g2"], float(g2), rel_tol=1e-9)


def _ddp_sync_every_task(rank, group):
    ddp = nn.parallel.DistributedDataParallel(_model(), process_group=group)
    est = TwoBatchEstimator(ddp)
    for x, y in _micro(0, rank, [2, 2]):
        _backward(ddp, x, y, 0.25)  # no no_sync(): DDP syncs both
        est.count(len(x))
    try:
        est.step()
    except RuntimeError as e:
        return str(e)
    return None


def test_ddp_sync_before_the_last_backward_is_refused_on_every_rank(pool):
    msgs = pool.run(_ddp_sync_every_task, world=2)
    assert all(m is not None and "no_sync" in m for m in msgs), msgs


def _fsdp2_task(rank, group, ranks, defer_sync):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = DeviceMesh.from_group(group, "cpu")
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    est = TwoBatchEstimator(model, beta=BETA)

    @contextlib.contextmanager
    def sync(last: bool):
        if defer_sync:  # reduce-scatter only in the last backward
            model.set_requires_gradient_sync(last)
        yield

    return _train(model, est, rank, ranks[rank], "mean", "mean", sync)


# Every rank runs the same number of backward passes: each one reduce-scatters under FSDP2.
@pytest.mark.parametrize("ranks,defer_sync", [
    ([[3, 2], [4, 1]], False),
    ([[3, 2], [4, 1]], True),
    pytest.param([[2, 1], [3, 3], [0, 2], [4, 0]], False, marks=pytest.mark.slow),
], ids=["2-micro", "2-micro-deferred-sync", "4-unequal-empty"])
def test_fsdp2_matches_per_micro_batch_reference(pool, ranks, defer_sync):
    got = pool.run(_fsdp2_task, ranks, defer_sync, world=len(ranks))
    assert all(g == got[0] for g in got), "ranks disagree"
    _assert_close(got[0], _reference(ranks, "mean", "mean", "micro"))


def _fsdp2_facts_task(rank, group):
    """What the per-example monitor will meet under fully_shard (torch 2.14, CPU gloo)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    model = _model()
    before = [id(p) for p in model.parameters()]
    seen = []
    lin = model[0]
    lin.register_forward_hook(lambda m, a, o: seen.append(("hook, before", type(m.weight))))
    mesh = DeviceMesh.from_group(group, "cpu")
    fully_shard(lin, mesh=mesh)
    fully_shard(model, mesh=mesh)
    lin.register_forward_pre_hook(lambda m, a: seen.append(("pre, after", type(m.weight))))
    lin.register_forward_hook(lambda m, a, o: seen.append(("hook, after", type(m.weight))))
    x, y = _micro(0, rank, [3])[0]
    _backward(model, x, y, 1.0)
    return {
        "swapped": all(id(p) != i for p, i in zip(model.parameters(), before)),
        "params": {type(p) for p in model.parameters()} == {DTensor},
        "grads": all(isinstance(p.grad, DTensor) and p.grad.placements == (Shard(0),)
                     for p in model.parameters()),
        "seen": [(w, t is DTensor) for w, t in seen],
    }


def test_fsdp2_facts_the_monitor_depends_on(pool):
    facts = pool.run(_fsdp2_facts_task, world=2)[0]
    assert facts["swapped"] and facts["params"] and facts["grads"]
    # pre-hooks run after FSDP's (prepended) unshard; forward hooks registered after
    # fully_shard run after its reshard and see the DTensor, those registered before do not
    assert facts["seen"] == [("pre, after", False), ("hook, before", False),
                             ("hook, after", True)]


def _stat_task(rank, group, sizes, steps, seed):
    model = nn.parallel.DistributedDataParallel(
        nn.Linear(len(MU), 1, bias=False).double(), process_group=group)
    est = TwoBatchEstimator(model, beta=0.9)
    mon = GradStatsMonitor(model, process_group=group, beta=0.9)
    gen = torch.Generator().manual_seed(seed + rank)
    rows = []
    for _ in range(steps):
        _gaussian_step(model, est, [sizes[rank]], gen)
        st, ms = est.step(), mon.step()
        rows.append((st.tr_sigma, st.g2, ms.tr_sigma, ms.g2))
        model.zero_grad()
    return np.array(rows) if rank == 0 else None


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [[8, 8], [6, 2, 0, 8]], ids=["2-equal", "4-unequal-empty"])
def test_ddp_is_unbiased_and_noisier_than_per_example(pool, sizes):
    rows = pool.run(_stat_task, sizes, 150, 11, world=len(sizes))[0]
    tr, g2 = float(COV.sum()), float(MU.square().sum())
    for col, truth in ((0, tr), (1, g2), (2, tr), (3, g2)):
        assert _within_3se(rows[:, col], truth), (col, rows[:, col].mean(), truth)
    var = rows.var(0, ddof=1)
    print(f"\n{sizes}: Var(tr) two-batch {var[0]:.3g}, per-example {var[2]:.3g}; "
          f"Var(|G|^2) two-batch {var[1]:.3g}, per-example {var[3]:.3g}")
    # |G|^2's noise is mostly that of the shared |G_big|^2: only tr's must be lower
    assert var[2] < var[0]
