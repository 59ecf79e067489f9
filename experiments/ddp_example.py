"""Minimal DDP training with a balancer: ``torchrun --nproc_per_node=2 -m experiments.ddp_example``.

Each rank trains on its own shard of the synthetic task. The balancer all-reduces the K x K Gram
matrix and the losses, so every rank computes the same weights; the weighted backward is an
ordinary DDP backward whose gradients DDP averages.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from balancers.registry import make_balancer
from mtl.models import build_model
from tasks.synthetic import make_synthetic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--balancer", default="mgda")
    parser.add_argument(
        "--level", choices=["representation", "parameters"], default="representation"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256, help="per rank")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # identical initial parameters on every rank
    splits = make_synthetic(num_tasks=2, correlation=0.5, num_samples=4096, seed=0)
    model = build_model("mmoe", **splits.model_kwargs())
    ddp = DistributedDataParallel(model)
    opt = make_balancer(args.balancer, torch.optim.Adam(ddp.parameters(), lr=1e-3), 2)
    shard = splits.train.subset(torch.arange(rank, len(splits.train), world))
    gen = torch.Generator().manual_seed(rank)
    step = 0
    while step < args.steps:
        for x, ys in shard.batches(args.batch_size, shuffle=True, generator=gen, drop_last=True):
            out = ddp(x)
            losses = [F.mse_loss(p, y) for p, y in zip(out.task_outputs, ys)]
            opt.zero_grad()
            if args.level == "representation":
                info = opt.backward(losses, representation=out.representation)
            else:
                info = opt.backward(losses, shared_parameters=list(model.shared_parameters()))
            opt.step()
            step += 1
            if step >= args.steps:
                break
    if rank == 0:
        print(
            f"world={world} steps={step} weights={info.weights.tolist()} "
            f"losses={info.losses.tolist()}"
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
