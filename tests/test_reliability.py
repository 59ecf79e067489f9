"""Faults never corrupt a step (issue 16, rows 1-4, 7, 9, 10).

Non-finite gradients anywhere the step writes (heads, the trunk below the balance point) are
caught; a skip leaves parameters, optimizer and balancer state as they were; a raise leaves
``.grad`` as it was; a skip costs no dense gradient; a failed call or load changes nothing;
``backward`` works inside ``torch.autocast``; under DDP a skip is collective.
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from balancers import MGDA, EqualWeight, MultiBalance
from balancers.registry import make_balancer
from mtl import NonFiniteError

K = 3
LEVELS = ("representation", "parameters")


class PoisonNet(nn.Module):
    """Trunk + heads whose ``poison`` parameter is finite forward and NaN backward.

    ``torch.where(all_false, (w - w).sqrt(), w)`` returns ``w`` but its gradient goes through
    ``sqrt'(0) * 0 = inf * 0 = NaN`` (the issue's reproducer).
    """

    def __init__(self, where: str = "none", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.where = where
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(K))
        self.scale = nn.Parameter(torch.ones(8))

    def _poisoned(self, w: torch.Tensor, on: bool) -> torch.Tensor:
        if not on:
            return w
        mask = torch.zeros_like(w, dtype=torch.bool)
        return torch.where(mask, (w - w).sqrt(), w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x) * self._poisoned(self.scale, self.where == "trunk")
        outs = []
        for k, h in enumerate(self.heads):
            w = self._poisoned(h.weight, self.where == "head" and k == 0)
            outs.append(nn.functional.linear(z, w, h.bias).squeeze(-1))
        return z, outs


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g), torch.randn(16, K, generator=g)


def _backward(opt: Any, model: PoisonNet, level: str, seed: int = 0) -> Any:
    x, y = _batch(seed)
    z, outs = model(x)
    losses = [nn.functional.mse_loss(o, y[:, k]) for k, o in enumerate(outs)]
    if level == "representation":
        return opt.backward(losses, representation=z)
    return opt.backward(losses, shared_parameters=[*model.trunk.parameters(), model.scale])


def _snapshot(model: nn.Module, opt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        copy.deepcopy(opt.state_dict()),
    )


def _assert_same_state(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same_state(u, v)
    else:
        assert a == b


def _make(name: str, model: nn.Module, **kwargs: Any) -> Any:
    return make_balancer(name, torch.optim.Adam(model.parameters(), lr=1e-2), K, **kwargs)


# -- row 2: non-finite gradients beyond the Gram ----------------------------------------------
@pytest.mark.parametrize("where", ["head", "trunk"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", ["mgda", "multibalance", "pcgrad", "gradops", "equal"])
def test_nonfinite_gradient_beyond_the_gram_is_skipped(name: str, level: str, where: str) -> None:
    if where == "trunk" and level == "parameters":
        pytest.skip("below the balance point there is nothing at the parameter level")
    model = PoisonNet()
    opt = _make(name, model, on_nonfinite="skip")
    for s in range(2):  # some optimizer and balancer state to protect
        opt.zero_grad()
        _backward(opt, model, level, seed=s)
        opt.step()
    params, sd = _snapshot(model, opt)
    model.where = where
    opt.zero_grad()
    _backward(opt, model, level, seed=5)
    assert opt.step() is None
    assert opt.num_skipped == 1
    after_params, after_sd = _snapshot(model, opt)
    _assert_same_state(after_params, params)
    sd["balancer"]["num_skipped"] = 1
    _assert_same_state(after_sd, sd)  # Adam moments, balancer state, counters
    model.where = "none"  # the next good step trains
    opt.zero_grad()
    _backward(opt, model, level, seed=6)
    opt.step()
    assert any(not torch.equal(params[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("where", ["head", "trunk"])
@pytest.mark.parametrize("name", ["mgda", "equal"])
def test_nonfinite_gradient_raise_leaves_grad_as_it_was(name: str, where: str) -> None:
    model = PoisonNet(where=where)
    opt = _make(name, model)
    opt.zero_grad()
    with pytest.raises(NonFiniteError, match="non-finite gradient"):
        _backward(opt, model, "representation")
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert opt.num_steps == 0


def test_equal_weight_nan_loss_raise_leaves_grad_as_it_was() -> None:
    model = PoisonNet()
    opt = EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1), K)
    x, y = _batch(0)
    z, outs = model(x)
    losses = [nn.functional.mse_loss(o, y[:, k]) for k, o in enumerate(outs)]
    losses[1] = losses[1] * float("nan")
    with pytest.raises(NonFiniteError, match="loss"):
        opt.backward(losses, representation=z)
    assert all(p.grad is None for p in model.parameters())


# -- row 3: a skip costs no dense gradient -----------------------------------------------------
class TableNet(nn.Module):
    def __init__(self, rows: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(rows, 8, sparse=True)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(K))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.table(ids).sum(1)
        return z, [h(z).squeeze(-1) for h in self.heads]


@pytest.mark.parametrize("level", LEVELS)
def test_skip_allocates_no_dense_table_gradient(level: str) -> None:
    model = TableNet(200_000)
    opt = MGDA(torch.optim.SGD(model.parameters(), lr=0.1), K, on_nonfinite="skip")
    z, outs = model(torch.randint(0, 200_000, (16, 3)))
    losses = [o.square().mean() for o in outs]
    losses[0] = losses[0] * float("nan")
    source: dict[str, Any] = (
        {"representation": z}
        if level == "representation"
        else {"shared_parameters": [model.table.weight]}
    )
    info = opt.backward(losses, **source)
    assert info.skipped
    assert model.table.weight.grad is None  # no 200k x 8 NaN tensor
    nan = [p for p in model.parameters() if p.grad is not None]
    assert len(nan) == 1 and nan[0].numel() == 1  # the smallest parameter carries the marker
    assert bool(torch.isnan(nan[0].grad).all())


# -- row 4 (engine part) and rows 9, 10: state ------------------------------------------------
def test_failed_first_call_does_not_fix_num_tasks() -> None:
    model = PoisonNet()
    opt = MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _batch(0)
    z, outs = model(x)
    losses = [nn.functional.mse_loss(o, y[:, k]) for k, o in enumerate(outs)]
    with pytest.raises(ValueError):
        opt.backward(losses, representation=z.detach())
    assert opt.num_tasks is None
    opt.backward(losses[:2], representation=z)  # a 2-task call is still accepted
    assert opt.num_tasks == 2


def _trained(name: str, **kwargs: Any) -> tuple[PoisonNet, Any]:
    model = PoisonNet()
    opt = _make(name, model, **kwargs)
    for s in range(2):
        opt.zero_grad()
        _backward(opt, model, "representation", seed=s)
        opt.step()
    return model, opt


def test_load_state_dict_missing_keys_are_named() -> None:
    _, opt = _trained("mgda")
    sd = opt.state_dict()
    del sd["balancer"]["num_steps"], sd["balancer"]["state"]
    with pytest.raises(ValueError, match=r"num_steps.*state|state.*num_steps"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize(
    "name, corrupt",
    [
        ("pcgrad", lambda st: st.update(generator="not a generator state")),
        ("multibalance", lambda st: st.update({k: torch.zeros(7, 2) for k in st})),
    ],
    ids=["pcgrad-generator", "multibalance-shapes"],
)
def test_failed_load_changes_nothing(name: str, corrupt: Any) -> None:
    _, source = _trained(name)
    sd = source.state_dict()
    sd["balancer"]["num_steps"] = 99
    corrupt(sd["balancer"]["state"])
    model, opt = _trained(name)
    before = copy.deepcopy(opt.state_dict())
    before_lr = opt.param_groups[0]["lr"]
    sd["param_groups"][0]["lr"] = 123.0
    with pytest.raises((ValueError, TypeError, RuntimeError, KeyError)):
        opt.load_state_dict(sd)
    _assert_same_state(opt.state_dict(), before)
    assert opt.param_groups[0]["lr"] == before_lr
    opt.zero_grad()  # and it still trains
    _backward(opt, model, "representation", seed=9)
    opt.step()


# -- row 7: autocast --------------------------------------------------------------------------
@pytest.mark.parametrize("level", LEVELS)
def test_backward_inside_autocast(level: str) -> None:
    model = PoisonNet()
    ref = copy.deepcopy(model)
    opt = MGDA(torch.optim.SGD(model.parameters(), lr=0.1), K)
    x, y = _batch(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        info = _backward(opt, model, level, seed=3)
    # the Gram matrix of the bf16 gradients is computed in float32 (at least), accumulated in
    # float64: compare with the float64 Gram of the same bf16 gradients
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, outs = ref(x)
        losses = [nn.functional.mse_loss(o, y[:, k]) for k, o in enumerate(outs)]
    target = z if level == "representation" else [*ref.trunk.parameters(), ref.scale]
    inputs = [target] if isinstance(target, torch.Tensor) else target
    rows = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, inputs, retain_graph=True)])
            for loss in losses
        ]
    ).to(torch.float64)
    torch.testing.assert_close(info.gram, rows @ rows.T, rtol=1e-6, atol=0.0)
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype


# -- row 1: DDP, a skip is collective ----------------------------------------------------------
def _ddp_worker(rank: int, init_file: str, out_dir: str, where: str, level: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        model = nn.parallel.DistributedDataParallel(PoisonNet())
        core: PoisonNet = model.module
        opt = MGDA(torch.optim.SGD(model.parameters(), lr=0.1), K, on_nonfinite="skip")
        for step in range(5):
            core.where = where if (rank == 1 and step == 1 and where != "loss") else "none"
            x, y = _batch(10 * step + rank)
            z, outs = model(x)
            losses = [nn.functional.mse_loss(o, y[:, k]) for k, o in enumerate(outs)]
            if where == "loss" and rank == 1 and step == 1:
                losses[0] = losses[0] * float("nan")
            opt.zero_grad()
            if level == "representation":
                opt.backward(losses, representation=z)
            else:
                opt.backward(losses, shared_parameters=[*core.trunk.parameters(), core.scale])
            opt.step()
        params = {n: p.detach().clone() for n, p in core.named_parameters()}
        torch.save((params, opt.num_skipped, opt.num_steps), os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # both ranks finished every step and wrote their results
    except BaseException:
        Path(out_dir, f"{rank}.err").write_text(traceback.format_exc())
        raise
    # gloo's teardown (destroy_process_group, interpreter exit) can abort or stall on some torch
    # versions after the work is done; what is tested happened above, so leave at once
    os._exit(0)


@pytest.mark.parametrize(
    "where, level",
    [
        ("loss", "representation"),
        ("head", "representation"),
        ("trunk", "representation"),
        ("loss", "parameters"),
        ("head", "parameters"),
    ],
)
def test_ddp_skip_is_collective(tmp_path: Path, where: str, level: str) -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.start_processes(
        _ddp_worker,
        args=(str(tmp_path / "init"), str(tmp_path), where, level),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    for proc in ctx.processes:
        proc.join(timeout=120)
    hung = [p for p in ctx.processes if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    errors = [f.read_text() for f in sorted(tmp_path.glob("*.err"))]
    assert not errors, errors
    assert all(p.exitcode == 0 for p in ctx.processes), [p.exitcode for p in ctx.processes]
    (p0, s0, n0), (p1, s1, n1) = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    assert (s0, n0) == (s1, n1) == (1, 4)  # both ranks skipped step 1, and only it
    for n in p0:
        assert torch.equal(p0[n], p1[n]), n


# -- MARIGOLD: skipped steps draw nothing, lam is validated, the closure under autocast --------
def test_marigold_gaussian_skip_leaves_the_generator() -> None:
    model = PoisonNet()
    opt = make_balancer(
        "marigold",
        torch.optim.SGD(model.parameters(), lr=0.1),
        K,
        estimator="gaussian",
        on_nonfinite="skip",
    )
    _backward(opt, model, "representation", seed=0)
    opt.step()
    before = copy.deepcopy(opt.state_dict()["balancer"])
    x, y = _batch(1)
    z, outs = model(x)
    losses = [nn.functional.mse_loss(o, y[:, k]) for k, o in enumerate(outs)]
    losses[2] = losses[2] * float("nan")
    opt.zero_grad()
    assert opt.backward(losses, representation=z).skipped
    after = opt.state_dict()["balancer"]
    assert after["state"]["rng_state"] == before["state"]["rng_state"]
    before["num_skipped"], before["skip_next_step"] = 1, True
    _assert_same_state(after, before)


@pytest.mark.parametrize("where", ["head", "trunk"])
def test_marigold_nonfinite_gradient_beyond_its_estimate_is_skipped(where: str) -> None:
    model = PoisonNet()
    opt = make_balancer(
        "marigold",
        torch.optim.Adam(model.parameters(), lr=0.1),
        K,
        estimator="amortized",
        on_nonfinite="skip",
    )
    for s in range(2):
        opt.zero_grad()
        _backward(opt, model, "representation", seed=s)
        opt.step()
    params, sd = _snapshot(model, opt)
    model.where = where
    opt.zero_grad()
    _backward(opt, model, "representation", seed=5)
    assert opt.step() is None
    after_params, after_sd = _snapshot(model, opt)
    _assert_same_state(after_params, params)
    sd["balancer"]["num_skipped"] = 1
    _assert_same_state(after_sd, sd)


@pytest.mark.parametrize(
    "parametrization, weights, logits",
    [
        ("simplex", [float("nan"), 0.5, 0.5], None),
        ("simplex", [-0.2, 0.6, 0.6], None),
        ("simplex", [0.5, 0.5, 0.5], None),
        ("simplex", [0.5, 0.5], None),
        ("softmax", [0.2, 0.3, 0.5], [0.0, 0.0, 0.0]),
        ("softmax", [1 / 3, 1 / 3, 1 / 3], [0.0, float("nan"), 0.0]),
    ],
    ids=["nan", "negative", "off-simplex", "wrong-length", "not-softmax", "nan-logit"],
)
def test_marigold_rejects_lam_off_its_domain(
    parametrization: str, weights: list[float], logits: list[float] | None
) -> None:
    _, opt = _trained("marigold", parametrization=parametrization, estimator="amortized")
    sd = opt.state_dict()
    sd["balancer"]["state"]["weights"] = torch.tensor(weights, dtype=torch.float64)
    if logits is not None:
        sd["balancer"]["state"]["logits"] = torch.tensor(logits, dtype=torch.float64)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="weights|logits"):
        opt.load_state_dict(sd)
    _assert_same_state(opt.state_dict(), before)


def test_marigold_closure_after_an_autocast_forward() -> None:
    """The forward under autocast, backward outside it (as torch.amp recommends): the closure
    re-runs the heads at the bfloat16 representation under the same autocast."""
    model = PoisonNet()
    opt = make_balancer("marigold", torch.optim.SGD(model.parameters(), lr=0.1), K, estimator="fd")
    x, y = _batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.trunk(x)
        losses = [
            nn.functional.mse_loss(h(z).squeeze(-1).float(), y[:, k])
            for k, h in enumerate(model.heads)
        ]
    assert z.dtype == torch.bfloat16

    def closure(zz: torch.Tensor) -> list[torch.Tensor]:
        return [
            nn.functional.mse_loss(h(zz).squeeze(-1).float(), y[:, k])
            for k, h in enumerate(model.heads)
        ]

    info = opt.backward(losses, representation=z, closure=closure)
    assert torch.isfinite(info.extras["h_hat"]).all()
    opt.step()


# -- the found_inf read: ONE synchronization per step with a fused optimizer --------------------
def _fused_adam(model: nn.Module) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    except (RuntimeError, TypeError) as exc:  # pragma: no cover - a torch without CPU fused
        pytest.skip(f"fused Adam is not available on the CPU here: {exc}")


@pytest.mark.parametrize("level", LEVELS)
def test_fused_optimizer_skips_on_the_device_and_settles_at_the_next_backward(level: str) -> None:
    model = PoisonNet()
    opt = MultiBalance(_fused_adam(model), K, on_nonfinite="skip")
    for s in range(2):
        opt.zero_grad()
        _backward(opt, model, level, seed=s)
        opt.step()
    params, sd = _snapshot(model, opt)
    model.where = "head"
    opt.zero_grad()
    _backward(opt, model, level, seed=5)
    opt.step()  # fused: skipped on the device, nothing read
    _assert_same_state({n: p.detach() for n, p in model.named_parameters()}, params)
    sd["balancer"]["num_skipped"] = 1
    _assert_same_state(opt.state_dict(), sd)  # settled (state_dict reads the flag)
    model.where = "none"
    opt.zero_grad()
    _backward(opt, model, level, seed=6)
    opt.step()
    assert opt.num_skipped == 1 and opt.num_steps == 3


def test_fused_skip_is_settled_by_the_next_transfer() -> None:
    model = PoisonNet(where="trunk")
    opt = MGDA(_fused_adam(model), K, on_nonfinite="skip")
    _backward(opt, model, "representation", seed=0)
    opt.step()
    assert opt.num_skipped == 0 and opt._unsettled is not None
    model.where = "none"
    opt.zero_grad()
    _backward(opt, model, "representation", seed=1)  # the transfer carries the old flag
    assert opt.num_skipped == 1 and opt.num_steps == 1


@pytest.mark.parametrize("fused, expected", [(True, 1), (False, 2)], ids=["fused", "foreach"])
def test_host_reads_per_balanced_step(fused: bool, expected: int) -> None:
    from _sync_count import SyncCounter

    model = PoisonNet()
    # (plain SGD: CPU Adam reads its step counters with item(), host tensors on a GPU too)
    inner = _fused_adam(model) if fused else torch.optim.SGD(model.parameters(), lr=1e-2)
    opt = MGDA(inner, K)
    for s in range(3):
        opt.zero_grad()
        counter = SyncCounter() if s == 2 else None
        if counter is None:
            _backward(opt, model, "representation", seed=s)
            opt.step()
            continue
        with counter:
            _backward(opt, model, "representation", seed=s)
            opt.step()
        assert counter.count == expected, counter.calls
