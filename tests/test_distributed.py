"""DDP: two gloo processes on CPU agree on the weights and match one process on the global batch."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from balancers.registry import BALANCERS, make_balancer

WORLD = 2
K = 3
B_LOCAL = 8
LEVELS = ("representation", "parameters")


def _available() -> list[str]:
    names = []
    for name, target in BALANCERS.items():
        module = target.split(":")[0]
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        names.append(name)
    return names


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(K))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [h(z).squeeze(-1) for h in self.heads]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * B_LOCAL, 5, generator=g, dtype=torch.float64)
    y = torch.randn(WORLD * B_LOCAL, K, generator=g, dtype=torch.float64)
    return x, y


def _options(name: str) -> dict[str, Any]:
    return {"estimator": "amortized"} if name == "marigold" else {}


def _run(model: nn.Module, name: str, level: str, x: torch.Tensor, y: torch.Tensor, steps: int):
    """A few SGD steps; returns (weights per step, final parameters)."""
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = make_balancer(name, torch.optim.SGD(model.parameters(), lr=0.1), K, **_options(name))
    weights = []
    for _ in range(steps):
        z, outs = model(x)
        losses = [nn.functional.mse_loss(o, y[:, k]) for k, o in enumerate(outs)]
        opt.zero_grad()
        extra: dict[str, Any] = {}
        if opt.needs_closure and opt.closure_reruns_model:  # FAMO: the losses after the update
            extra["closure"] = lambda: [
                nn.functional.mse_loss(o, y[:, k]) for k, o in enumerate(model(x)[1])
            ]
        if level == "representation":
            info = opt.backward(losses, representation=z, **extra)
        else:
            info = opt.backward(losses, shared_parameters=list(core.trunk.parameters()), **extra)
        opt.step()
        weights.append(info.weights.clone())
    params = {n: p.detach().clone() for n, p in core.named_parameters()}
    return weights, params


def _worker(rank: int, init_file: str, out_dir: str, names: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        x, y = _data()
        xs, ys = x[rank * B_LOCAL : (rank + 1) * B_LOCAL], y[rank * B_LOCAL : (rank + 1) * B_LOCAL]
        results = {}
        for name in names:
            for level in LEVELS:
                model = nn.parallel.DistributedDataParallel(Net().double())
                results[(name, level)] = _run(model, name, level, xs, ys, steps=3)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[dict]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available on this platform")
    names = _available()
    tmp = tmp_path_factory.mktemp("ddp")
    init_file = str(tmp / "init")
    # the spawned children import this module by path
    sys.path.insert(0, str(Path(__file__).parent))
    mp.spawn(_worker, args=(init_file, str(tmp), names), nprocs=WORLD, join=True)
    return names, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_weights_identical_on_every_rank(ddp_results: tuple[list[str], list[dict]]) -> None:
    names, (r0, r1) = ddp_results
    for name in names:
        for level in LEVELS:
            w0, p0 = r0[(name, level)]
            w1, p1 = r1[(name, level)]
            for a, b in zip(w0, w1):
                assert torch.equal(a, b), (name, level)
            for n in p0:
                assert torch.equal(p0[n], p1[n]), (name, level, n)


@pytest.mark.parametrize("level", LEVELS)
def test_ddp_step_equals_single_process_global_batch(
    ddp_results: tuple[list[str], list[dict]], level: str
) -> None:
    names, (r0, _) = ddp_results
    x, y = _data()
    for name in names:
        w_single, p_single = _run(Net().double(), name, level, x, y, steps=3)
        w_ddp, p_ddp = r0[(name, level)]
        for a, b in zip(w_ddp, w_single):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"{name} {level}")
        for n in p_single:
            torch.testing.assert_close(
                p_ddp[n], p_single[n], rtol=1e-9, atol=1e-10, msg=f"{name} {level} {n}"
            )
