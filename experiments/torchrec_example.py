"""A multi-task DLRM on TorchRec under ``DistributedModelParallel``, balanced at the dense
representation (2 CPU processes, gloo).

``python -m experiments.torchrec_example --balancer mgda --sharding table_wise --steps 50``
starts the processes itself; ``torchrun --nproc_per_node=2 -m experiments.torchrec_example ...``
works too. Needs TorchRec (``docs/torchrec.md``: ``torchrec==1.8.0`` with ``fbgemm-gpu-cpu``).

The model: an ``EmbeddingBagCollection`` (one table per sparse feature) and a dense bottom MLP
feed DLRM's dot interaction; a shared top MLP turns it into ``z``, the balance point; three
towers read ``z``: click (logistic), conversion (logistic) and watch time (squared error, a
larger loss scale). ``DistributedModelParallel`` shards the tables by ``--sharding`` and wraps
the rest in its default data-parallel wrapper: ``DistributedDataParallel(static_graph=True,
gradient_as_bucket_view=True)``; the balanced step handles DDP's static graph
(``docs/ddp.md``). The tables are trained by a fused optimizer applied inside the backward
(TorchRec's usual set-up, ``apply_optimizer_in_backward``): the balancer wraps the dense
optimizer only, and the tables receive the combined gradient ``sum_k c_k dL_k/dz`` through
``z`` in the step's one ordinary backward.

Features are read from the pooled ``KeyedTensor`` by name (``to_dict()``): a sharded
collection returns its keys in the order of its shards (``['f0', 'f2', 'f1']`` for a
table-wise plan that puts t0 and t2 on rank 0), so ``KeyedTensor.values()`` would silently
permute the features.

At the end rank 0 prints the planned sharding, the first and last losses, the last weights and
the largest difference between the ranks' replicated parameters (0.0: every rank holds the same
dense model).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

try:
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed.model_parallel import (
        DataParallelWrapper,
        DefaultDataParallelWrapper,
        DistributedModelParallel,
    )
    from torchrec.distributed.sharding_plan import (
        column_wise,
        construct_module_sharding_plan,
        data_parallel,
        table_wise,
    )
    from torchrec.distributed.types import ParameterSharding, ShardingPlan, ShardingType
    from torchrec.models.dlrm import DenseArch, InteractionArch, SparseArch
    from torchrec.optim.optimizers import in_backward_optimizer_filter
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise SystemExit(
        "this example needs TorchRec on the CPU: see docs/torchrec.md "
        "(pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0 ...)"
    ) from exc

from balancers.registry import make_balancer
from mtl import BalancedOptimizer, BalanceInfo

TASKS = ("click", "conversion", "watch_time")
SHARDINGS = ("table_wise", "column_wise", "table_column_wise", "data_parallel", "mixed", "planner")


@dataclass(frozen=True)
class Config:
    """Sizes of the model and of the synthetic data (every rank builds the same)."""

    num_features: int = 4
    rows: int = 1000
    dim: int = 16  # embedding dim = the bottom MLP's output; a multiple of 8 for column shards
    num_dense: int = 8
    bottom: tuple[int, ...] = (32,)
    top: tuple[int, ...] = (64, 32)  # the last size is the width of z
    tower: int = 16
    max_ids: int = 3  # ids per sparse feature and sample: 1..max_ids

    @property
    def features(self) -> list[str]:
        return [f"f{i}" for i in range(self.num_features)]

    def tables(self) -> list[EmbeddingBagConfig]:
        return [
            EmbeddingBagConfig(
                name=f"t{i}", embedding_dim=self.dim, num_embeddings=self.rows, feature_names=[f]
            )
            for i, f in enumerate(self.features)
        ]


class MultiTaskDLRM(nn.Module):
    """DLRM's sparse, dense and interaction arches, a shared top MLP whose output ``z`` is the
    balance point, and one tower per task. ``forward(dense, sparse)`` returns the tuple
    ``(z, [logit or prediction per task])``: a tuple, so that DDP's static graph can look into
    it (never a dataclass: docs/ddp.md)."""

    def __init__(self, cfg: Config, num_tasks: int = len(TASKS), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the same initial parameters on every rank
        # SparseArch reads the pooled features with KeyedTensor.to_dict(), by name
        self.sparse_arch = SparseArch(EmbeddingBagCollection(tables=cfg.tables()))
        self.dense_arch = DenseArch(cfg.num_dense, [*cfg.bottom, cfg.dim])
        self.interaction = InteractionArch(num_sparse_features=cfg.num_features)
        f = cfg.num_features
        layers: list[nn.Module] = []
        width = cfg.dim + f * (f + 1) // 2
        for size in cfg.top:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.top = nn.Sequential(*layers)
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, cfg.tower), nn.ReLU(), nn.Linear(cfg.tower, 1))
            for _ in range(num_tasks)
        )

    @property
    def ebc(self) -> EmbeddingBagCollection:
        return self.sparse_arch.embedding_bag_collection

    def forward(
        self, dense: torch.Tensor, sparse: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pooled = self.sparse_arch(sparse)  # (B, F, D), features in the config's order
        z = self.top(self.interaction(self.dense_arch(dense), pooled))
        return z, [tower(z).squeeze(-1) for tower in self.towers]

    def trunk_parameters(self) -> list[nn.Parameter]:
        """The dense shared parameters (bottom, top), for balancing at shared_parameters=
        (the fused tables never hold a gradient: their optimizer runs inside the backward)."""
        return [*self.dense_arch.parameters(), *self.top.parameters()]


# ----------------------------------------------------------------------------- data


@dataclass
class Batch:
    """``dense`` (B, num_dense), ``ids`` (F, B, max_ids), ``lengths`` (F, B) in 1..max_ids,
    ``labels`` (B, 3): click, conversion, watch time."""

    dense: torch.Tensor
    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def rows(self, rows: slice) -> Batch:
        return Batch(self.dense[rows], self.ids[:, rows], self.lengths[:, rows], self.labels[rows])

    def kjt(self, features: Sequence[str]) -> KeyedJaggedTensor:
        """The sparse features as a KeyedJaggedTensor (values key-major, then sample)."""
        mask = torch.arange(self.ids.shape[-1]) < self.lengths.unsqueeze(-1)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=list(features), values=self.ids[mask], lengths=self.lengths.reshape(-1)
        )


class SyntheticClicks:
    """Click logs from a fixed teacher: every id has a per-task affinity; a sample's score for
    task k is a linear function of its dense features plus the mean affinity of its ids.
    click ~ Bernoulli(sigmoid(s_0)), conversion ~ click * Bernoulli(sigmoid(s_1)), watch time
    = s_2 + noise (a squared error of a few units next to two logistic losses below 0.7). Batch ``step`` is the same on every rank (a generator seeded by the
    step); each rank takes its rows of the global batch."""

    def __init__(self, cfg: Config, seed: int = 0) -> None:
        self.cfg, self.seed = cfg, seed
        g = torch.Generator().manual_seed(10_000 + seed)
        k, f = len(TASKS), cfg.num_features
        shared = torch.randn(f, cfg.rows, generator=g)  # tasks share part of their signal
        self.affinity = 0.7 * shared + 0.7 * torch.randn(k, f, cfg.rows, generator=g)
        self.w_dense = torch.randn(k, cfg.num_dense, generator=g) / cfg.num_dense**0.5

    def batch(self, step: int, size: int) -> Batch:
        cfg = self.cfg
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        f = cfg.num_features
        dense = torch.randn(size, cfg.num_dense, generator=g)
        ids = torch.randint(0, cfg.rows, (f, size, cfg.max_ids), generator=g)
        lengths = torch.randint(1, cfg.max_ids + 1, (f, size), generator=g)
        mask = (torch.arange(cfg.max_ids) < lengths.unsqueeze(-1)).float()  # (F, B, L)
        aff = self.affinity[:, torch.arange(f)[:, None, None], ids]  # (K, F, B, L)
        pooled = ((aff * mask).sum(-1) / mask.sum(-1)).sum(1)  # (K, B)
        score = dense @ self.w_dense.T + pooled.T  # (B, K)
        click = torch.bernoulli(torch.sigmoid(score[:, 0]), generator=g)
        conversion = click * torch.bernoulli(torch.sigmoid(score[:, 1]), generator=g)
        watch = score[:, 2] + 0.5 * torch.randn(size, generator=g)
        return Batch(dense, ids, lengths, torch.stack([click, conversion, watch], dim=1))


def task_losses(outputs: Sequence[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
    """Mean losses: logistic for click and conversion, squared error for watch time."""
    return [
        F.binary_cross_entropy_with_logits(outputs[0], labels[:, 0]),
        F.binary_cross_entropy_with_logits(outputs[1], labels[:, 1]),
        F.mse_loss(outputs[2], labels[:, 2]),
    ]


# ----------------------------------------------------------------------------- sharding


def table_column_wise(ranks: list[int]) -> Callable[..., ParameterSharding]:
    """A table-column-wise generator for ``construct_module_sharding_plan`` (TorchRec 1.8
    ships none): the column shards of ``column_wise(ranks)`` under the table-column-wise
    sharding type."""
    column = column_wise(ranks=ranks)

    def generator(*args: Any) -> ParameterSharding:
        sharding = column(*args)
        sharding.sharding_type = ShardingType.TABLE_COLUMN_WISE.value
        return sharding

    return generator


def sharding_plan(model: MultiTaskDLRM, kind: str, world: int) -> ShardingPlan | None:
    """An explicit plan of one kind for every table (``mixed``: table-wise, column-wise and
    data-parallel tables side by side; ``planner``: None, TorchRec's planner decides)."""
    if kind == "planner":
        return None
    names = [t.name for t in model.ebc.embedding_bag_configs()]
    everyone = list(range(world))
    kinds: dict[str, Callable[[int], Any]] = {
        "table_wise": lambda i: table_wise(rank=i % world),
        "column_wise": lambda i: column_wise(ranks=everyone),
        "table_column_wise": lambda i: table_column_wise(everyone),
        "data_parallel": lambda i: data_parallel(),
        "mixed": lambda i: (
            table_wise(rank=world - 1),
            column_wise(ranks=everyone),
            data_parallel(),
        )[i % 3],
    }
    if kind not in kinds:
        raise ValueError(f"unknown sharding {kind!r}: choose from {', '.join(SHARDINGS)}")
    per_table = {name: kinds[kind](i) for i, name in enumerate(names)}
    module_plan = construct_module_sharding_plan(
        model.ebc, per_table, local_size=world, world_size=world, device_type="cpu"
    )
    return ShardingPlan({"sparse_arch.embedding_bag_collection": module_plan})


def shard(
    model: MultiTaskDLRM,
    kind: str,
    *,
    table_optimizer: type[torch.optim.Optimizer] | None = torch.optim.SGD,
    table_options: dict[str, Any] | None = None,
    data_parallel_wrapper: DataParallelWrapper | None = None,
) -> DistributedModelParallel:
    """The model under ``DistributedModelParallel``: the tables sharded by ``kind``, the rest
    in DMP's default data-parallel wrapper (``DistributedDataParallel(static_graph=True)``)
    unless ``data_parallel_wrapper`` says otherwise. The tables get ``table_optimizer`` fused
    into the backward (``None``: no fused optimizer; only data-parallel tables can then be
    trained, by the balancer's optimizer)."""
    if table_optimizer is not None:
        _apply_optimizer_in_backward(
            table_optimizer, model.ebc.parameters(), table_options or {"lr": 0.1}
        )
    plan = sharding_plan(model, kind, dist.get_world_size())
    return DistributedModelParallel(
        model,
        device=torch.device("cpu"),
        plan=plan,
        data_parallel_wrapper=data_parallel_wrapper,
    )


def load_full_state(dmp: DistributedModelParallel, state: dict[str, torch.Tensor]) -> None:
    """Copy an unsharded model's state into the sharded one (each rank fills its own shards).
    On the CPU, DistributedModelParallel re-initializes the tables it shards."""
    for name, target in dmp.state_dict().items():
        source = state[name]
        with torch.no_grad():
            if hasattr(target, "local_shards"):
                for part in target.local_shards():
                    index = tuple(
                        slice(o, o + n)
                        for o, n in zip(part.metadata.shard_offsets, part.metadata.shard_sizes)
                    )
                    part.tensor.copy_(source[index])
            else:
                target.copy_(source)


def full_state(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """Every parameter in full on every rank: the shards of a sharded table are placed in a
    zero tensor and summed over the ranks (disjoint shards: exact); replicated tensors are
    this rank's own copy."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in dmp.state_dict().items():
        if hasattr(tensor, "local_shards"):
            full = torch.zeros(tuple(tensor.size()), dtype=tensor.dtype)
            for part in tensor.local_shards():
                index = tuple(
                    slice(o, o + n)
                    for o, n in zip(part.metadata.shard_offsets, part.metadata.shard_sizes)
                )
                full[index] = part.tensor
            dist.all_reduce(full)
            out[name] = full
        else:
            out[name] = tensor.detach().clone()
    return out


def describe_plan(dmp: DistributedModelParallel) -> dict[str, str]:
    """Table name -> 'sharding_type on ranks ...'."""
    out = {}
    for module_plan in dmp.plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            out[table] = f"{ps.sharding_type} {ps.compute_kernel} ranks {ps.ranks}"
    return out


def dense_balancer(
    dmp: DistributedModelParallel,
    balancer: str,
    inner: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    **options: Any,
) -> BalancedOptimizer:
    """The balancer around ``inner`` over every parameter that has no fused optimizer: the
    dense arches, the towers and data-parallel tables trained without one."""
    params = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    return make_balancer(balancer, inner(params), len(TASKS), **options)


def train_step(
    dmp: nn.Module,
    opt: BalancedOptimizer,
    batch: Batch,
    features: Sequence[str],
    level: str = "representation",
    trunk: Sequence[nn.Parameter] = (),
) -> BalanceInfo:
    """One balanced step on this rank's batch (FAMO gets its closure: the losses of the same
    batch, re-run through the model after the update)."""
    kjt = batch.kjt(features)
    z, outputs = dmp(batch.dense, kjt)
    losses = task_losses(outputs, batch.labels)
    extra: dict[str, Any] = {}
    if opt.needs_closure and opt.closure_reruns_model:
        extra["closure"] = lambda: task_losses(dmp(batch.dense, kjt)[1], batch.labels)
    opt.zero_grad()
    if level == "representation":
        info = opt.backward(losses, representation=z, **extra)
    else:
        info = opt.backward(losses, shared_parameters=list(trunk), **extra)
    opt.step()
    return info


# ----------------------------------------------------------------------------- main


def _run(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cfg = Config()
    model = MultiTaskDLRM(cfg, seed=args.seed)
    dmp = shard(
        model,
        args.sharding,
        table_optimizer=torch.optim.Adagrad,
        table_options={"lr": args.lr},
        data_parallel_wrapper=(
            None if args.static_graph else DefaultDataParallelWrapper(static_graph=False)
        ),
    )
    opt = dense_balancer(
        dmp, args.balancer, lambda params: torch.optim.Adam(params, lr=args.lr / 10)
    )
    data = SyntheticClicks(cfg, seed=args.seed)
    rows = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
    history: list[torch.Tensor] = []
    info = None
    for step in range(args.steps):
        batch = data.batch(step, world * args.batch_size).rows(rows)
        info = train_step(dmp, opt, batch, cfg.features, args.level, model.trunk_parameters())
        history.append(info.losses)
    # the replicated parameters (everything DDP or a data-parallel table holds) on every rank
    diff = torch.zeros(1, dtype=torch.float64)
    for tensor in dmp.state_dict().values():
        if not hasattr(tensor, "local_shards"):
            reference = tensor.detach().clone()
            dist.broadcast(reference, src=0)
            diff = torch.maximum(diff, (tensor - reference).abs().max().double().reshape(1))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if rank == 0 and info is not None:
        window = max(1, min(10, len(history) // 2))
        first = torch.stack(history[:window]).mean(0).tolist()
        last = torch.stack(history[-window:]).mean(0).tolist()
        print(f"world={world} balancer={args.balancer} level={args.level} steps={args.steps}")
        for table, where in describe_plan(dmp).items():
            print(f"  {table}: {where}")
        print(f"losses {TASKS}: first {window} steps {[round(v, 4) for v in first]}")
        print(f"losses {TASKS}: last {window} steps {[round(v, 4) for v in last]}")
        print(f"last weights {[round(float(w), 4) for w in info.weights.reshape(-1)]}")
        print(f"max difference of replicated parameters across ranks: {float(diff):.3g}")


def _finish() -> NoReturn:
    """End a rank once every rank is done. The process exits without the interpreter's
    teardown: on this CPU set-up (gloo, FBGEMM's CPU kernels) it aborted about one run in six
    with "terminate called without an active exception" after the work was done."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawned(rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    _run(args)
    _finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--balancer", default="mgda", help="e.g. mgda, multibalance, equal")
    parser.add_argument("--sharding", choices=SHARDINGS, default="table_wise")
    parser.add_argument(
        "--level", choices=["representation", "parameters"], default="representation"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05, help="tables (Adagrad); dense: lr/10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-static-graph",
        dest="static_graph",
        action="store_false",
        help="DefaultDataParallelWrapper(static_graph=False) instead of DMP's default (True)",
    )
    parser.add_argument(
        "--nproc", type=int, default=2, help="processes to spawn (without torchrun)"
    )
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # torchrun: RANK, WORLD_SIZE, MASTER_ADDR/PORT are set
        dist.init_process_group("gloo")
        _run(args)
        _finish()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _spawned,
            args=(args.nproc, os.path.join(tmp, "init"), args),
            nprocs=args.nproc,
            start_method="spawn",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
