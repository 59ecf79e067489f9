"""A balancer in PyTorch Lightning under ``strategy="ddp"``: manual optimization, CPU processes.

``python -m experiments.lightning_example --balancer mgda --steps 50`` (from the checkout; needs
``pip install 'mtl-balance[lightning]'``). Lightning starts the second process itself (gloo on
CPU); each rank trains an MMoE on its shard of the synthetic task. The module subclasses
``mtl.lightning.BalancedLightningModule``, so ``opt.backward(losses, representation=z)`` on the
optimizer from ``self.optimizers()`` goes through Lightning's strategy (DDP all-reduces the
gradients) and ``opt.step()`` through Lightning (step counting, LR scheduler, hooks).

At the end rank 0 prints the last weights and losses, the largest parameter difference between
the ranks (0.0: every rank holds the same model) and, with ``--checkpoint PATH``, the balancer
state saved in the Lightning checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from balancers.registry import make_balancer
from mtl.models import build_model
from tasks.synthetic import make_synthetic

try:
    import lightning as L
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise SystemExit(
        "this example needs PyTorch Lightning: pip install 'mtl-balance[lightning]'"
    ) from exc

from mtl.lightning import BalancedLightningModule  # noqa: E402


class MultiTask(BalancedLightningModule, L.LightningModule):
    """An MMoE on the synthetic task, balanced by ``balancer`` (manual optimization: set by
    ``BalancedLightningModule``)."""

    def __init__(
        self, balancer: str, level: str, lr: float, batch_size: int, num_tasks: int = 2
    ) -> None:
        super().__init__()
        self.balancer, self.level, self.lr, self.batch_size = balancer, level, lr, batch_size
        self.splits = make_synthetic(num_tasks=num_tasks, correlation=0.5, num_samples=4096, seed=0)
        torch.manual_seed(0)  # the same initial parameters on every rank
        self.model = build_model("mmoe", **self.splits.model_kwargs())
        self.last: dict[str, Any] = {}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self.model(x)
        losses = [F.mse_loss(p, y[:, k]) for k, p in enumerate(out.task_outputs)]
        opt = self.optimizers()  # Lightning's wrapper, routed by BalancedLightningModule
        opt.zero_grad()
        if self.level == "representation":
            info = opt.backward(losses, representation=out.representation)
        else:
            info = opt.backward(losses, shared_parameters=self.model.shared_parameters())
        opt.step()
        self.lr_schedulers().step()
        self.last = {"weights": info.weights.tolist(), "losses": info.losses.tolist()}

    def configure_optimizers(self) -> Any:
        inner = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        opt = make_balancer(self.balancer, inner, self.splits.num_tasks)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
        return [opt], [sched]

    def train_dataloader(self) -> Any:
        train = self.splits.train
        data = torch.utils.data.TensorDataset(train.x_num, train.y)
        # under DDP Lightning adds a DistributedSampler: each rank gets its own shard
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--balancer", default="mgda", help="e.g. mgda, multibalance, gradops")
    parser.add_argument(
        "--level", choices=["representation", "parameters"], default="representation"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256, help="per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--devices", type=int, default=2, help="CPU processes")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--checkpoint", default=None, help="save a Lightning checkpoint here")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    module = MultiTask(args.balancer, args.level, args.lr, args.batch_size)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    if args.checkpoint:
        trainer.save_checkpoint(args.checkpoint)

    # every rank must hold the same parameters: the largest difference to rank 0's
    flat = torch.cat([p.detach().reshape(-1) for p in module.model.parameters()])
    diff = 0.0
    if dist.is_available() and dist.is_initialized():
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        gap = (flat - ref).abs().max().reshape(1)
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)
        diff = float(gap.item())
    if trainer.global_rank == 0:
        print(
            f"world={trainer.world_size} steps={trainer.global_step} balancer={args.balancer} "
            f"level={args.level} weights={module.last['weights']} "
            f"losses={module.last['losses']} max|param difference across ranks|={diff:.3g}"
        )
        if args.checkpoint:
            saved = torch.load(args.checkpoint, weights_only=False)
            bal = saved["optimizer_states"][0]["balancer"]
            print(
                f"checkpoint {args.checkpoint}: balancer {bal['method']} "
                f"num_steps={bal['num_steps']} state keys={sorted(bal['state'])}"
            )
    return 0


if __name__ == "__main__":
    code = main()
    if dist.is_available() and dist.is_initialized():
        # gloo's teardown at interpreter exit can abort the process ("terminate called without
        # an active exception", about one run in six here) once the work is done: leave after
        # every rank has finished, without running it
        sys.stdout.flush()
        sys.stderr.flush()
        dist.barrier()
        os._exit(code)
    raise SystemExit(code)
