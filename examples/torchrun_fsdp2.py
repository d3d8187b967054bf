"""The two-batch noise scale under FSDP2 (``fully_shard``).

    torchrun --nproc-per-node 2 examples/torchrun_fsdp2.py [--steps 200] [--batch 32] [--micro 2]

CPU (gloo) or one GPU per rank (nccl). Each block of a small residual MLP is sharded with
``fully_shard``; every rank runs ``--micro`` micro-batches per step. ``TwoBatchEstimator`` hooks
the unsharded parameters' gradients (each micro-batch's local gradient, before FSDP2's
reduce-scatter) and compares them with the reduce-scattered ``.grad``; rank 0 prints B_simple.
The per-example ``GradStatsMonitor`` takes the same ``fully_shard`` model (tests/test_fsdp.py).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from gradstats.twobatch import TwoBatchEstimator


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="examples per rank and micro-batch")
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per step")
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))
    torch.manual_seed(0)
    teacher = torch.randn(16, 4, device=device)
    model = nn.Sequential(nn.Linear(16, 64), Block(64), Block(64), nn.Linear(64, 4)).to(device)
    for block in model[1:3]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    two = TwoBatchEstimator(model, beta=0.95)  # after fully_shard

    gen = torch.Generator(device=device).manual_seed(1 + rank)
    for step in range(1, args.steps + 1):
        for _ in range(args.micro):
            x = torch.randn(args.batch, 16, device=device, generator=gen)
            y = (x @ teacher + 0.5 * torch.randn(args.batch, 4, device=device,
                                                  generator=gen)).argmax(1)
            (nn.functional.cross_entropy(model(x), y) / args.micro).backward()
            two.count(len(x))
        est = two.step()  # before opt.step()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 20 == 0 or step == args.steps):
            print(f"step {step:4d}  two-batch B_simple {est.b_simple_ema:8.2f} "
                  f"[{est.b_simple_interval[0]:.1f}, {est.b_simple_interval[1]:.1f}]  "
                  f"tr {est.tr_sigma_ema:.4g}  |G|^2 {est.g2_ema:.4g}  "
                  f"({est.units} units of {args.batch})", flush=True)
    two.detach()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
