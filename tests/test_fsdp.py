"""The monitor under FSDP2 (fully_shard), HSDP and DDP with real gloo processes on CPU: the
statistics equal those of one process over the global batch, every rank reaches the same
numbers and decisions."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import shared_pool  # noqa: E402

from gradstats import GradStatsMonitor  # noqa: E402


class _Scale(nn.Module):  # no layer rule: covered at the function level
    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * self.gamma


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.scale = _Scale(7)
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.scale(self.norm(self.inp(x)))))


def _data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 5, generator=g, dtype=torch.float64),
            torch.randn(n, 3, generator=g, dtype=torch.float64))


def _loss(model, x, y, reduction):
    per = (model(x) - y).square().sum(1)
    return per.mean() if reduction == "mean" else per.sum()


def _stats(st):
    return [st.tr_sigma, st.g2, st.b_simple_ema, float(st.per_example_sq_norms.sum())]


def _sharded_task(rank, group, sizes, reduction, mesh_shape, mp, steps=2):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = _Net().double()
    if mesh_shape is None:
        mesh = DeviceMesh.from_group(group, "cpu")
    else:
        ranks = torch.arange(group.size()).reshape(mesh_shape)
        mesh = DeviceMesh("cpu", ranks, mesh_dim_names=("replicate", "shard"))
    kw = {}
    if mp:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.float32,
                                               reduce_dtype=torch.float64)
    for m in (model.inp, model.out):
        fully_shard(m, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    mon = GradStatsMonitor(model, loss_reduction=reduction, process_group=group)
    out = []
    offset = sum(sizes[:rank])
    for step in range(steps):
        x, y = _data(100 + step, sum(sizes))
        xb, yb = x[offset:offset + sizes[rank]], y[offset:offset + sizes[rank]]
        _loss(model, xb, yb, reduction).backward()
        st = mon.step()
        out.append(_stats(st) + [st.verified])
        model.zero_grad()
    return out


def _one_process(sizes, reduction, steps=2):
    torch.manual_seed(0)
    model = _Net().double()
    mon = GradStatsMonitor(model, loss_reduction="sum")
    out = []
    for step in range(steps):
        x, y = _data(100 + step, sum(sizes))
        _loss(model, x, y, "sum").backward()
        out.append(_stats(mon.step()))
        model.zero_grad()
    return out


@pytest.fixture(scope="module")
def pool():
    return shared_pool(4)


@pytest.mark.parametrize("sizes, reduction, mesh", [
    ([4, 4], "mean", None),
    ([3, 5], "sum", None),
    ([2, 3, 0, 4], "sum", None),
    ([3, 3, 3, 3], "mean", (2, 2)),
], ids=["fsdp2-2", "fsdp2-2-unequal", "fsdp2-4-empty-rank", "hsdp-2x2"])
def test_fsdp2_statistics_equal_one_process_over_the_global_batch(pool, sizes, reduction, mesh):
    results = pool.run(_sharded_task, sizes, reduction, mesh, False, world=len(sizes))
    want = _one_process(sizes, reduction)
    for rank_rows in results:
        assert rank_rows == results[0] or all(
            np.allclose(a[:3], b[:3], rtol=1e-12, equal_nan=True) for a, b in zip(rank_rows, results[0]))
    for got, ref in zip(results[0], want):
        # the statistics are global; the per-example norms are this rank's
        np.testing.assert_allclose(got[:3], ref[:3], rtol=1e-6, equal_nan=True)
    assert results[0][0][-1]  # the first step was probed and passed


def test_fsdp2_with_a_mixed_precision_policy(pool):
    results = pool.run(_sharded_task, [4, 4], "mean", None, True, world=2)
    want = _one_process([4, 4], "mean")
    for got, ref in zip(results[0], want):
        np.testing.assert_allclose(got[:3], ref[:3], rtol=1e-5, equal_nan=True)


def _ddp_task(rank, group, sizes, steps=3):
    from gradstats.schedulers import BatchSizeController

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(_Net().double(), process_group=group)
    mon = GradStatsMonitor(model, loss_reduction="sum", process_group=group)
    ctl = BatchSizeController(b_min=2, b_max=64, micro_batch_size=2)
    out = []
    offset = sum(sizes[:rank])
    for step in range(steps):
        x, y = _data(100 + step, sum(sizes))
        xb, yb = x[offset:offset + sizes[rank]], y[offset:offset + sizes[rank]]
        _loss(model, xb, yb, "sum").backward()
        st = mon.step()
        out.append(_stats(st)[:3] + [ctl.update(st.b_simple_ema)])
        model.zero_grad()
    return out


def test_ddp_with_an_empty_rank_and_the_same_decision_everywhere(pool):
    sizes = [3, 0, 5]
    results = pool.run(_ddp_task, sizes, world=3)
    want = _one_process(sizes, "sum", steps=3)
    for rank_rows in results[1:]:  # bit-identical statistics and batch-size decisions
        np.testing.assert_array_equal(np.array(rank_rows), np.array(results[0]))
    for got, ref in zip(results[0], want):
        np.testing.assert_allclose(got[:3], ref[:3], rtol=1e-6, equal_nan=True)
