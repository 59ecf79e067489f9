"""PyTorch Lightning (mtl.lightning): manual optimization under strategy="ddp", two gloo processes.

One spawn of two CPU processes runs every scenario (Lightning's import and the process group are
the slow part): routed balanced steps at both levels (the mixin's ``opt.backward`` and the
``balanced_manual_backward`` helper), a checkpoint written mid-run and resumed in a new Trainer,
and the bypasses. The parent compares the ranks with each other and with one process on the
global batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

L = pytest.importorskip("lightning")

from balancers.registry import make_balancer  # noqa: E402
from mtl.lightning import (  # noqa: E402
    BYPASS_ERROR,
    BalancedLightningModule,
    balanced_manual_backward,
    unwrap_optimizer,
)

WORLD = 2
K = 3
B_LOCAL = 8
STEPS = 4
LR = 0.1


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of one step (float64); rank r trains on rows r*B_LOCAL..(r+1)*B_LOCAL."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * B_LOCAL, 5, generator=g, dtype=torch.float64)
    y = torch.randn(WORLD * B_LOCAL, K, generator=g, dtype=torch.float64)
    return x, y


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(K))
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [h(z).squeeze(-1) for h in self.heads]


def _losses(outs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    return [nn.functional.mse_loss(o, y[:, k]) for k, o in enumerate(outs)]


def _point(net: Net, z: torch.Tensor, level: str) -> dict[str, Any]:
    if level == "representation":
        return {"representation": z}
    return {"shared_parameters": list(net.trunk.parameters())}


class _Steps:
    """What both LightningModules share: the step's shard, the optimizer, the records."""

    net: Net
    method: str
    level: str
    mode: str
    weights: list[torch.Tensor]
    restored: dict[str, Any] | None
    options: dict[str, Any] = {}
    hooks = 0  # on_before_backward + on_after_backward calls

    def _shard(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _batch(int(self.global_step))  # type: ignore[attr-defined]
        r = int(self.global_rank)  # type: ignore[attr-defined]
        dtype = self.net.trunk[0].weight.dtype
        x, y = x.to(dtype), y.to(dtype)
        return x[r * B_LOCAL : (r + 1) * B_LOCAL], y[r * B_LOCAL : (r + 1) * B_LOCAL]

    def configure_optimizers(self) -> Any:
        inner = torch.optim.SGD(self.net.parameters(), lr=LR)
        return make_balancer(self.method, inner, K, **self.options)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.hooks += 1

    def on_after_backward(self) -> None:
        self.hooks += 1

    def train_dataloader(self) -> Any:
        data = torch.utils.data.TensorDataset(torch.arange(2 * STEPS))
        return torch.utils.data.DataLoader(data, batch_size=1)

    def on_train_start(self) -> None:  # after a checkpoint's optimizer state was restored
        opt = self.trainer.optimizers[0]  # type: ignore[attr-defined]
        self.restored = opt.state_dict()["balancer"]


class Routed(_Steps, BalancedLightningModule, L.LightningModule):
    """The mixin: ``opt.backward`` on what ``self.optimizers()`` returns is routed."""

    def __init__(self, method: str, level: str, mode: str = "wrapper") -> None:
        super().__init__()
        self.net, self.method, self.level, self.mode = Net(), method, level, mode
        self.weights, self.restored = [], None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self._shard()
        opt = self.optimizers()
        opt.zero_grad()
        if self.mode == "accumulate":  # two micro-batches, DDP's all-reduce on the last one
            half = B_LOCAL // 2
            with opt.toggle_model(sync_grad=False):
                z, outs = self.net(x[:half])
                opt.backward(_losses(outs, y[:half]), **_point(self.net, z, self.level))
            x, y = x[half:], y[half:]
        z, outs = self.net(x)
        losses = _losses(outs, y)
        if self.mode == "bypass":  # the BalancedOptimizer itself: not routed
            info = self.trainer.optimizers[0].backward(losses, **_point(self.net, z, self.level))
        else:
            info = opt.backward(losses, **_point(self.net, z, self.level))
        opt.step()
        self.weights.append(info.weights.clone())


class Plain(_Steps, L.LightningModule):
    """A plain LightningModule: ``balanced_manual_backward`` (mode "helper"), or the
    optimizer's own ``backward`` on Lightning's wrapper (mode "unrouted")."""

    def __init__(self, method: str, level: str, mode: str = "helper") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net, self.method, self.level, self.mode = Net(), method, level, mode
        self.weights, self.restored = [], None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self._shard()
        z, outs = self.net(x)
        losses = _losses(outs, y)
        opt = self.optimizers()
        opt.zero_grad()
        if self.mode == "helper":
            info = balanced_manual_backward(self, opt, losses, **_point(self.net, z, self.level))
        else:
            info = opt.backward(losses, **_point(self.net, z, self.level))
        opt.step()
        self.weights.append(info.weights.clone())


def _trainer(max_steps: int, **ddp: Any) -> Any:
    from lightning.pytorch.strategies import DDPStrategy

    return L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=DDPStrategy(timeout=timedelta(seconds=60), **ddp),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )


def _params(module: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.net.named_parameters()}


def _record(module: Any, trainer: Any) -> dict[str, Any]:
    inner = unwrap_optimizer(trainer.optimizers[0])
    return {
        "params": _params(module),
        "weights": module.weights,
        "balancer": inner.state_dict()["balancer"],
        "restored": module.restored,
        "hooks": module.hooks,
    }


def _fit_error(module: Any, trainer: Any) -> dict[str, Any]:
    try:
        trainer.fit(module)
    except RuntimeError as exc:
        return {"error": str(exc), "params": _params(module)}
    return {"error": None, "params": _params(module)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out: dict[str, Any] = {}
    ckpt = os.path.join(out_dir, "half.ckpt")

    # routed steps: the mixin at the representation, the helper at the shared parameters
    m = Routed("multibalance", "representation")
    t = _trainer(STEPS)
    t.fit(m)
    out["mixin"] = _record(m, t)
    m = Plain("mgda", "parameters")
    t = _trainer(STEPS)
    t.fit(m)
    out["helper"] = _record(m, t)
    m = Routed("mgda", "representation")
    t = _trainer(STEPS, find_unused_parameters=True)
    t.fit(m)
    out["find_unused"] = _record(m, t)
    m = Routed("mgda", "representation")
    t = _trainer(STEPS, static_graph=True)
    t.fit(m)
    out["static_graph"] = _record(m, t)
    m = Routed("multibalance", "representation", mode="accumulate")
    t = _trainer(STEPS)
    t.fit(m)
    out["accumulate"] = _record(m, t)

    # a checkpoint after STEPS // 2 steps, resumed in a new Trainer up to STEPS
    m = Routed("multibalance", "representation")
    t = _trainer(STEPS // 2)
    t.fit(m)
    t.save_checkpoint(ckpt)
    out["half"] = _record(m, t)
    m = Routed("multibalance", "representation")
    t = _trainer(STEPS)
    t.fit(m, ckpt_path=ckpt)
    out["resumed"] = _record(m, t)

    # bypasses: the BalancedOptimizer itself under the mixin; the wrapper's own backward
    out["bypass"] = _fit_error(Routed("mgda", "representation", mode="bypass"), _trainer(1))
    out["unrouted"] = _fit_error(Plain("mgda", "representation", mode="unrouted"), _trainer(2))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available on this platform")
    tmp = tmp_path_factory.mktemp("lightning")
    sys.path.insert(0, str(Path(__file__).parent))  # the children import this module by name
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single(
    method: str, level: str, steps: int = STEPS, micro: int = 1
) -> tuple[list[torch.Tensor], Net]:
    """The reference: one process, the global batch (in ``micro`` micro-batches, each the
    union of the ranks' micro-batches), a plain loop."""
    net = Net()
    opt = make_balancer(method, torch.optim.SGD(net.parameters(), lr=LR), K)
    weights = []
    size = B_LOCAL // micro
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        for j in range(micro):
            rows = torch.cat(
                [
                    torch.arange(r * B_LOCAL + j * size, r * B_LOCAL + (j + 1) * size)
                    for r in range(WORLD)
                ]
            )
            z, outs = net(x[rows])
            info = opt.backward(_losses(outs, y[rows]), **_point(net, z, level))
        opt.step()
        weights.append(info.weights.clone())
    return weights, net


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same(u, v, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif hasattr(a, "shape"):  # numpy
        assert a.shape == b.shape and (a == b).all(), where
    else:
        assert a == b, where


ROUTED = {  # case: (method, level, micro-batches)
    "mixin": ("multibalance", "representation", 1),
    "helper": ("mgda", "parameters", 1),
    "find_unused": ("mgda", "representation", 1),
    "static_graph": ("mgda", "representation", 1),
    "accumulate": ("multibalance", "representation", 2),
}


@pytest.mark.parametrize("case", sorted(ROUTED))
def test_ranks_identical_and_equal_to_one_process(ranks: list[dict[str, Any]], case: str) -> None:
    r0, r1 = ranks[0][case], ranks[1][case]
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), (case, n)
    for a, b in zip(r0["weights"], r1["weights"]):
        assert torch.equal(a, b), case
    assert len(r0["weights"]) == STEPS
    method, level, micro = ROUTED[case]
    # on_before_backward and on_after_backward once per balanced backward
    assert r0["hooks"] == 2 * micro * STEPS
    _assert_same(r0["balancer"], r1["balancer"], case)
    weights, net = _single(method, level, micro=micro)
    for a, b in zip(r0["weights"], weights):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=case)
    for n, p in net.named_parameters():
        torch.testing.assert_close(r0["params"][n], p.detach(), rtol=1e-9, atol=1e-10, msg=n)
    # the parameters moved: the gradients were not zero
    assert not torch.equal(r0["params"]["trunk.0.weight"], Net().trunk[0].weight.detach())


def test_checkpoint_restores_balancer_state(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        half, resumed, full = rank["half"], rank["resumed"], rank["mixin"]
        assert half["balancer"]["num_steps"] == STEPS // 2
        assert half["balancer"]["state"], "MultiBalance keeps moving averages"
        # the new Trainer's optimizer held the saved balancer state before its first step
        _assert_same(resumed["restored"], half["balancer"], "restored")
        # and training went on exactly as without the interruption
        assert resumed["balancer"]["num_steps"] == STEPS
        _assert_same(resumed["balancer"], full["balancer"], "resumed")
        for n in full["params"]:
            assert torch.equal(resumed["params"][n], full["params"][n]), n


def test_bypass_under_ddp_raises_with_the_fix(ranks: list[dict[str, Any]]) -> None:
    init = {n: p.detach() for n, p in Net().named_parameters()}
    for rank in ranks:
        error = rank["bypass"]["error"]
        assert error == BYPASS_ERROR
        assert "balanced_manual_backward" in error and "self.optimizers()" in error
        for n, p in rank["bypass"]["params"].items():  # nothing was stepped
            assert torch.equal(p, init[n]), n


def test_unrouted_wrapper_backward_never_drifts_silently(ranks: list[dict[str, Any]]) -> None:
    """``opt.backward`` on Lightning's wrapper without the mixin or the helper: either the
    step refuses (the engine sees gradients that differ across ranks), or it was routed."""
    r0, r1 = ranks[0]["unrouted"], ranks[1]["unrouted"]
    if r0["error"] is not None:
        assert r0["error"] == r1["error"]
        assert "differ across ranks" in r0["error"]
    else:
        assert r1["error"] is None
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n


# ---------------------------------------------------------------------- one device, in process
def _single_trainer(max_steps: int, **kwargs: Any) -> Any:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_one_device_state_lives_in_the_balanced_optimizer() -> None:
    """``opt.backward`` on Lightning's wrapper updates the BalancedOptimizer that Lightning
    checkpoints (not a copy on the wrapper), and the result is the plain loop's."""
    module = Routed("multibalance", "representation")
    trainer = _single_trainer(STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    inner = unwrap_optimizer(trainer.optimizers[0])
    assert inner.num_steps == STEPS and module.hooks == 2 * STEPS
    assert "_window" not in vars(module.optimizers()) and "num_steps" not in vars(
        module.optimizers()
    )
    net = Net()
    opt = make_balancer("multibalance", torch.optim.SGD(net.parameters(), lr=LR), K)
    for step in range(STEPS):  # the shard of rank 0 of a one-process world: the first rows
        x, y = _batch(step)
        z, outs = net(x[:B_LOCAL])
        opt.zero_grad()
        opt.backward(_losses(outs, y[:B_LOCAL]), representation=z)
        opt.step()
    _assert_same(inner.state_dict()["balancer"], opt.state_dict()["balancer"], "balancer")
    for n, p in net.named_parameters():
        torch.testing.assert_close(module.net.get_parameter(n), p, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_gradscaler_scales_every_task_loss(on_nonfinite: str) -> None:
    """``16-mixed`` (Lightning's GradScaler, here on CPU): the task losses are scaled, and the
    balancer must skip non-finite steps so that the scaler can back off."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = Routed("mgda", "representation")
    module.net = Net(torch.float32)
    module.options = {"on_nonfinite": on_nonfinite}
    plugin = MixedPrecision("16-mixed", "cpu")
    trainer = _single_trainer(3, plugins=[plugin])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if on_nonfinite == "raise":
            with pytest.raises(ValueError, match="on_nonfinite='skip'"):
                trainer.fit(module)
            return
        trainer.fit(module)
    assert len(module.weights) == 3
    assert plugin.scaler is not None and plugin.scaler.get_scale() > 1
    for p in module.net.parameters():
        assert torch.isfinite(p).all()


def test_automatic_optimization_is_refused() -> None:
    module = Plain("mgda", "representation")
    module.automatic_optimization = True
    module._trainer = object()  # attached to something: the check comes first
    with pytest.raises(RuntimeError, match="manual optimization"):
        balanced_manual_backward(
            module,
            make_balancer("mgda", torch.optim.SGD(module.net.parameters(), lr=LR), K),
            [torch.zeros((), requires_grad=True)] * K,
            representation=torch.zeros(1, requires_grad=True),
        )


def test_mixin_must_come_before_lightning_module() -> None:
    with pytest.raises(TypeError, match="before LightningModule"):

        class Wrong(L.LightningModule, BalancedLightningModule):  # type: ignore[misc]
            pass


def test_example_runs_under_strategy_ddp() -> None:
    """``python -m experiments.lightning_example``: Lightning launches the second process
    itself (strategy="ddp"), and both ranks end with the same parameters."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-m", "experiments.lightning_example", "--steps", "4"]
        + ["--batch-size", "64", "--balancer", "multibalance"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world=2 steps=4" in done.stdout, done.stdout
    assert "max|param difference across ranks|=0" in done.stdout, done.stdout
