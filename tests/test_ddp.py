"""DDP with 2 gloo processes on CPU gives the same statistics as one process over the global batch."""
import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from monitor_problems import PROBLEMS, data, train_step  # noqa: E402

WORLD, PER_RANK, STEPS = 2, 6, 3
FIELDS = ("n", "tr_sigma", "g2", "b_simple", "tr_sigma_ema", "g2_ema", "b_simple_ema")


def _run(model, batches, mode, ddp_rank=None):
    import gradstats

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradstats.GradStatsMonitor(model, mode=mode, beta=0.5)
    out = []
    for X, Y in batches:
        if ddp_rank is not None:
            X, Y = (t[ddp_rank * PER_RANK:(ddp_rank + 1) * PER_RANK] for t in (X, Y))
        stats = train_step(model, mon, X, Y, optimizer=opt)
        out.append({f: getattr(stats, f) for f in FIELDS}
                   | {"layers": {k: v.tr_sigma for k, v in stats.layers.items()}})
    mon.detach()
    return out


def _worker(rank, init_file, result_file, base, batches):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    res = {}
    for mode in ("hooks", "fused"):
        model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        res[mode] = _run(model, batches, mode, ddp_rank=rank)
        del model
    if rank == 0:
        torch.save(res, result_file)
    # Both ranks done with every collective before either tears gloo down (a rank that exits
    # while its peer still holds the connection can abort in gloo's threads).
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    problem = PROBLEMS[1]
    torch.manual_seed(0)
    base = problem.make_model().double()
    batches = [data(problem, WORLD * PER_RANK, seed=60 + i) for i in range(STEPS)]
    result_file = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(result_file), base, batches),
             nprocs=WORLD, join=True)
    got = torch.load(result_file, weights_only=False)
    for mode in ("hooks", "fused"):
        want = _run(copy.deepcopy(base), batches, mode)
        for g, w in zip(got[mode], want):
            assert g["n"] == w["n"] == WORLD * PER_RANK
            for f in FIELDS[1:]:
                assert abs(g[f] - w[f]) <= 1e-8 * abs(w[f]), (mode, f, g[f], w[f])
            for k in w["layers"]:
                assert abs(g["layers"][k] - w["layers"][k]) <= 1e-8 * abs(w["layers"][k])
