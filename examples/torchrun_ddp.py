"""The noise scale under DDP, two ways: the per-example monitor and the two-batch estimator.

    torchrun --nproc-per-node 2 examples/torchrun_ddp.py [--steps 200] [--batch 32]

CPU (gloo) or one GPU per rank (nccl). Each rank trains a small MLP on its own stream of a
synthetic classification task; rank 0 prints both estimates of B_simple = tr(Sigma)/|G|^2:
``GradStatsMonitor`` (every example's gradient norm, one packed all-reduce) and
``TwoBatchEstimator`` (each rank's gradient against the all-reduced one, no per-example kernels).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import gradstats
from gradstats.twobatch import TwoBatchEstimator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="examples per rank and step")
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same model and task on every rank; the data differ by rank
    teacher = torch.randn(16, 4, device=device)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)
    monitor = gradstats.GradStatsMonitor(ddp, beta=0.95)
    two = TwoBatchEstimator(ddp, beta=0.95)  # registers the communication hook

    gen = torch.Generator(device=device).manual_seed(1 + rank)
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, 16, device=device, generator=gen)
        y = (x @ teacher + 0.5 * torch.randn(args.batch, 4, device=device, generator=gen)).argmax(1)
        nn.functional.cross_entropy(ddp(x), y).backward()
        mon, est = monitor.step(), two.step(batch_size=len(x))  # before opt.step()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 20 == 0 or step == args.steps):
            print(f"step {step:4d}  B_simple: monitor {mon.b_simple_ema:8.2f} "
                  f"[{mon.b_simple_interval[0]:.1f}, {mon.b_simple_interval[1]:.1f}]   "
                  f"two-batch {est.b_simple_ema:8.2f} "
                  f"[{est.b_simple_interval[0]:.1f}, {est.b_simple_interval[1]:.1f}]"
                  f"  ({world} ranks x {args.batch})", flush=True)
    monitor.detach()
    two.detach()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
