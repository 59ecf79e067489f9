"""BalancedOptimizer plumbing: exact gradient identities, the optimizer contract, bad input.

Identities (float64, atol 1e-10), reference/methods.md Sec. 1.1: after
``opt.backward(losses, representation=z)`` the trunk's ``.grad`` equals the gradient of
``sum_k c_k L_k`` with ``c = info.weights`` held constant, and each head's ``.grad`` equals the
gradient of its own unweighted loss (``c_k``-weighted with ``weight_heads=True``). The same holds at
parameter level with ``shared_parameters=``.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from balancers import MGDA, EqualWeight
from mtl import BalancedOptimizer, BalanceInfo, CombinedOptimizer, NonFiniteError

sys.path.insert(0, str(Path(__file__).parent))
from _models import BlocksNet, NeckNet, checkpoint_copy  # noqa: E402

F64 = torch.float64
ATOL = 1e-10
K = 3
SCALES = (1.0, 4.0, 0.3)  # different task scales: MGDA weights are far from uniform


# ---------------------------------------------------------------------- a tiny multi-task model
def make_batch(seed: int, n: int = 8, k: int = K, dtype: torch.dtype = F64) -> tuple:
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, 4, generator=gen).to(dtype)
    ys = [torch.randn(n, generator=gen).to(dtype) * (k_ + 1) for k_ in range(k)]
    return x, ys


def task_losses(outs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [SCALES[k] * F.mse_loss(o, y) for k, (o, y) in enumerate(zip(outs, ys))]


def balanced_backward(
    opt: BalancedOptimizer,
    model: BlocksNet,
    x: torch.Tensor,
    ys: Sequence[torch.Tensor],
    level: str,
) -> BalanceInfo:
    blocks, outs = model(x)
    losses = task_losses(outs, ys)
    if level == "representation":
        rep = blocks[0] if len(blocks) == 1 else blocks
        return opt.backward(losses, representation=rep)
    return opt.backward(losses, shared_parameters=model.shared_parameters())


def expected_grads(
    model: BlocksNet,
    x: torch.Tensor,
    ys: Sequence[torch.Tensor],
    c: torch.Tensor,
    weight_heads: bool = False,
) -> dict[str, torch.Tensor]:
    """Gradient of sum_k c_k L_k on the trunk; own (optionally c_k-weighted) loss on each head."""
    _, outs = model(x)
    losses = task_losses(outs, ys)
    c = c.detach()
    shared = model.shared_parameters()
    weighted = sum(float(c[k]) * losses[k] for k in range(len(losses)))
    grads = torch.autograd.grad(weighted, shared, retain_graph=True)
    ids = {id(p): g for p, g in zip(shared, grads)}
    for k, head in enumerate(model.heads):
        params = list(head.parameters())
        scale = float(c[k]) if weight_heads else 1.0
        for p, g in zip(params, torch.autograd.grad(scale * losses[k], params, retain_graph=True)):
            ids[id(p)] = g
    return {n: ids[id(p)] for n, p in model.named_parameters()}


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads(model: nn.Module, expected: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    actual = grads_of(model)
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for name, exp in expected.items():
        diff = float((actual[name] - exp).abs().max())
        assert diff <= atol, f"{name}: max |diff| = {diff:.3e}"


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert set(a) == set(b)
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            assert float((a[name] - b[name]).abs().max()) <= atol, name


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


METHODS: dict[str, Callable[..., BalancedOptimizer]] = {
    "mgda": lambda opt, **kw: MGDA(opt, num_tasks=K, **kw),
    "mgda_l2": lambda opt, **kw: MGDA(opt, num_tasks=K, normalization="l2", **kw),
    "mgda_loss+_nu": lambda opt, **kw: MGDA(
        opt, num_tasks=K, normalization="loss+", normalized_update=True, **kw
    ),
    "equal_weighted": lambda opt, **kw: EqualWeight(opt, weights=(2.0, 0.5, 1.5), **kw),
    "equal": lambda opt, **kw: EqualWeight(opt, **kw),
    "base": lambda opt, **kw: BalancedOptimizer(opt, **kw),
}
LEVELS = ["representation", "parameters"]


def setup(
    method: str = "mgda", seed: int = 0, two_blocks: bool = False, lr: float = 0.05, **kw: Any
) -> tuple[BlocksNet, BalancedOptimizer]:
    model = BlocksNet(seed=seed, two_blocks=two_blocks)
    opt = METHODS[method](torch.optim.SGD(model.parameters(), lr=lr), **kw)
    return model, opt


# ====================================================================== 3. gradient identities
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("weight_heads", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_balanced_gradient_identity(method: str, weight_heads: bool, level: str) -> None:
    model, opt = setup(method, weight_heads=weight_heads)
    x, ys = make_batch(0)
    opt.zero_grad()
    info = balanced_backward(opt, model, x, ys, level)
    assert info.level == level
    assert info.weights.shape == (K,) and info.weights.dtype == F64
    assert info.losses.shape == (K,) and not info.losses.requires_grad
    if method.startswith("mgda"):
        assert float(info.weights.max() - info.weights.min()) > 1e-3  # a non-trivial test
    assert_grads(model, expected_grads(model, x, ys, info.weights, weight_heads))


@pytest.mark.parametrize("grad_mode", ["loop", "batched"])
def test_blocks_identity(grad_mode: str) -> None:
    """A representation given as a tuple of two tensors (blocks)."""
    model, opt = setup("mgda", two_blocks=True, grad_mode=grad_mode)
    x, ys = make_batch(1)
    opt.zero_grad()
    blocks, outs = model(x)
    losses = task_losses(outs, ys)
    hs = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, blocks, retain_graph=True)])
        for loss in losses
    ]
    info = opt.backward(losses, representation=blocks)
    h = torch.stack(hs)
    assert info.block_grams is not None and info.block_grams.shape == (2, K, K)
    assert float((info.gram - h @ h.T).abs().max()) < 1e-12
    assert float((info.block_grams.sum(0) - info.gram).abs().max()) < 1e-12
    assert_grads(model, expected_grads(model, x, ys, info.weights))


@pytest.mark.parametrize("weight_heads", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_heads_shared_above_the_representation(gated: bool, weight_heads: bool) -> None:
    """Parameters above z that several tasks share (a neck) get the sum of those tasks' gradients,
    on the trunk-only path (heads disjoint from the trunk) and on the hook path (a gate reads a
    trunk activation, so part of the graph above z is also below it)."""
    model = NeckNet(gated)
    opt = MGDA(torch.optim.SGD(model.parameters(), lr=0.1), K, weight_heads=weight_heads)
    x, ys = make_batch(5)
    z, outs = model(x)
    losses = task_losses(outs, ys)
    heads = opt._heads_above(losses, [z])
    if gated:
        assert heads is None
    else:
        assert heads is not None
        neck = {id(q) for q in model.neck.parameters()}
        assert all(neck <= {id(q) for q in hs} for hs in heads)  # every task reaches the neck
    opt.zero_grad()
    info = opt.backward(losses, representation=z)
    c = [float(w) for w in info.weights]
    assert max(c) - min(c) > 1e-3
    # the oracle: backward of sum_k s_k L_k (s = 1, or c with weight_heads), with z's gradient
    # corrected from sum_k s_k dL_k/dz to sum_k c_k dL_k/dz (gates reaching the trunk below z
    # keep their own s-weighted gradient, as documented for MMoE)
    z, outs = model(x)
    ls = task_losses(outs, ys)
    s = c if weight_heads else [1.0] * K
    gz = [torch.autograd.grad(lk, z, retain_graph=True)[0] for lk in ls]
    correction = sum((ck - sk) * g for ck, sk, g in zip(c, s, gz))
    params = list(model.parameters())
    base = torch.autograd.grad(
        sum(sk * lk for sk, lk in zip(s, ls)), params, retain_graph=True, allow_unused=True
    )
    fix = torch.autograd.grad(z, model.trunk(), grad_outputs=correction)
    expected = {id(q): torch.zeros_like(q) if g is None else g for q, g in zip(params, base)}
    for q, g in zip(model.trunk(), fix):
        expected[id(q)] = expected[id(q)] + g
    for q in model.parameters():
        if q.grad is None:
            assert float(expected[id(q)].abs().max()) == 0.0  # a gate of the ungated model
            continue
        assert float((q.grad - expected[id(q)]).abs().max()) <= ATOL


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("method", ["mgda", "equal_weighted"])
def test_gradient_accumulation(method: str, level: str) -> None:
    """Two backward calls without zero_grad accumulate, each with its own weights."""
    model, opt = setup(method)
    (x1, ys1), (x2, ys2) = make_batch(2), make_batch(3)
    opt.zero_grad()
    info1 = balanced_backward(opt, model, x1, ys1, level)
    info2 = balanced_backward(opt, model, x2, ys2, level)
    e1 = expected_grads(model, x1, ys1, info1.weights)
    e2 = expected_grads(model, x2, ys2, info2.weights)
    assert_grads(model, {n: e1[n] + e2[n] for n in e1})
    if method == "mgda":
        assert not torch.allclose(info1.weights, info2.weights)


@pytest.mark.parametrize("two_blocks", [False, True])
@pytest.mark.parametrize("weight_heads", [False, True])
def test_batched_equals_loop(two_blocks: bool, weight_heads: bool) -> None:
    x, ys = make_batch(4)
    results = []
    for mode in ("loop", "batched"):
        model, opt = setup("mgda", two_blocks=two_blocks, grad_mode=mode, weight_heads=weight_heads)
        opt.zero_grad()
        info = balanced_backward(opt, model, x, ys, "representation")
        results.append((info, grads_of(model)))
    (i1, g1), (i2, g2) = results
    assert float((i1.weights - i2.weights).abs().max()) <= ATOL
    assert float((i1.gram - i2.gram).abs().max()) <= ATOL
    assert_same(g1, g2, atol=ATOL)


def test_losses_as_1d_tensor() -> None:
    x, ys = make_batch(5)
    results = []
    for as_tensor in (False, True):
        model, opt = setup("mgda")
        opt.zero_grad()
        blocks, outs = model(x)
        losses = task_losses(outs, ys)
        info = opt.backward(torch.stack(losses) if as_tensor else losses, representation=blocks[0])
        results.append((info.weights, grads_of(model)))
    assert torch.equal(results[0][0], results[1][0])
    assert_same(results[0][1], results[1][1], atol=ATOL)


def test_mgda_ub_weights_are_min_norm_of_representation_grads() -> None:
    from balancers import min_norm_weights

    model, opt = setup("mgda")
    x, ys = make_batch(6)
    blocks, outs = model(x)
    losses = task_losses(outs, ys)
    h = torch.stack(
        [torch.autograd.grad(loss, blocks[0], retain_graph=True)[0].reshape(-1) for loss in losses]
    )
    info = opt.backward(losses, representation=blocks[0])
    assert float((info.gram - h @ h.T).abs().max()) < 1e-12
    assert float((info.weights - min_norm_weights(h @ h.T)).abs().max()) < 1e-12
    assert info.extras["alpha"].shape == (K,)


# ---------------------------------------------------------------------- EqualWeight
def _plain_sum_grads(seed: int, level_losses: Callable[[list[torch.Tensor]], torch.Tensor]) -> dict:
    model = BlocksNet(seed=seed)
    x, ys = make_batch(seed)
    _, outs = model(x)
    level_losses(task_losses(outs, ys)).backward()
    return grads_of(model)


def test_equal_weight_ones_is_plain_sum_bit_for_bit() -> None:
    reference = _plain_sum_grads(7, lambda ls: sum(ls))  # type: ignore[arg-type, return-value]
    for weights in (None, (1.0, 1.0, 1.0)):
        model = BlocksNet(seed=7)
        opt = EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1), weights=weights)
        x, ys = make_batch(7)
        opt.zero_grad()
        info = balanced_backward(opt, model, x, ys, "representation")
        assert_same(grads_of(model), reference)  # torch.equal
        assert info.gram is None
        assert torch.equal(info.weights, torch.ones(K, dtype=F64))


def test_equal_weight_ones_parameter_level_is_plain_sum() -> None:
    reference = _plain_sum_grads(7, lambda ls: sum(ls))  # type: ignore[arg-type, return-value]
    model = BlocksNet(seed=7)
    opt = EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1))
    x, ys = make_batch(7)
    balanced_backward(opt, model, x, ys, "parameters")
    assert_same(grads_of(model), reference, atol=1e-12)


@pytest.mark.parametrize("level", LEVELS)
def test_equal_weight_weights_scale_trunk_only(level: str) -> None:
    model = BlocksNet(k=2, seed=8)
    opt = EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1), weights=(2.0, 0.5))
    x, ys = make_batch(8, k=2)
    info = balanced_backward(opt, model, x, ys, level)
    assert torch.equal(info.weights, torch.tensor([2.0, 0.5], dtype=F64))
    assert_grads(model, expected_grads(model, x, ys, info.weights))
    # trunk: gradient of 2 L_1 + 0.5 L_2; heads: unweighted (differs from the weighted sum)
    _, outs = model(x)
    l1, l2 = task_losses(outs, ys)
    head0 = list(model.heads[0].parameters())
    weighted = torch.autograd.grad(2.0 * l1, head0)
    assert not torch.allclose(model.heads[0][0].weight.grad, weighted[0])


def test_equal_weight_weight_heads_is_weighted_sum() -> None:
    model = BlocksNet(k=2, seed=9)
    opt = EqualWeight(
        torch.optim.SGD(model.parameters(), lr=0.1), weights=(2.0, 0.5), weight_heads=True
    )
    x, ys = make_batch(9, k=2)
    info = balanced_backward(opt, model, x, ys, "representation")
    assert info.gram is None
    reference = BlocksNet(k=2, seed=9)
    _, outs = reference(x)
    l1, l2 = task_losses(outs, ys)
    (2.0 * l1 + 0.5 * l2).backward()
    assert_same(grads_of(model), grads_of(reference), atol=1e-12)


def test_equal_weight_gram_only_on_request() -> None:
    x, ys = make_batch(10)
    model = BlocksNet(seed=10)
    info = balanced_backward(
        EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1)), model, x, ys, "representation"
    )
    assert info.gram is None
    model = BlocksNet(seed=10)
    opt = EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1), compute_gram=True)
    blocks, outs = model(x)
    losses = task_losses(outs, ys)
    h = torch.stack(
        [torch.autograd.grad(loss, blocks[0], retain_graph=True)[0].reshape(-1) for loss in losses]
    )
    info = opt.backward(losses, representation=blocks[0])
    assert info.gram is not None and info.gram.dtype == F64
    assert float((info.gram - h @ h.T).abs().max()) < 1e-12
    assert_grads(model, expected_grads(model, x, ys, torch.ones(K, dtype=F64)))
    # MGDA always reports it
    model, opt = setup("mgda")
    assert balanced_backward(opt, model, x, ys, "representation").gram is not None


# ====================================================================== 4. optimizer contract
def train(
    model: BlocksNet,
    opt: BalancedOptimizer,
    level: str,
    steps: int,
    first: int = 0,
    scheduler: Any = None,
) -> list[BalanceInfo]:
    infos = []
    for s in range(first, first + steps):
        x, ys = make_batch(s)
        opt.zero_grad()
        infos.append(balanced_backward(opt, model, x, ys, level))
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return infos


def test_is_an_optimizer_that_forwards_to_the_inner_one() -> None:
    model = BlocksNet()
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = MGDA(inner, num_tasks=K)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is inner
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    train(model, opt, "representation", 2)
    assert len(opt.state) == len(list(model.parameters()))
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert opt.param_groups is inner.param_groups  # inner.load_state_dict replaced the list
    assert opt.state is inner.state
    opt.param_groups[0]["lr"] = 0.123
    assert inner.param_groups[0]["lr"] == 0.123
    extra = nn.Parameter(torch.zeros(2, dtype=F64))
    opt.add_param_group({"params": [extra]})
    assert inner.param_groups[-1]["params"][0] is extra


def test_combined_optimizer_add_param_group() -> None:
    """The group lands in the inner optimizer that is named (or the only one), with that
    optimizer's defaults, shows in ``param_groups`` (also through a balancer) and is stepped;
    an ambiguous or wrong target, or a parameter another optimizer has, is a clear error."""
    model = BlocksNet()
    trunk, heads = model.shared_parameters(), list(model.heads.parameters())
    sgd = torch.optim.SGD(trunk, lr=0.1)
    adam = torch.optim.Adam(heads, lr=1e-3)
    combined = CombinedOptimizer([sgd, adam])
    opt = MGDA(combined, num_tasks=K)
    extra = nn.Parameter(torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match=r"2 optimizers \(0: SGD, 1: Adam\).*optimizer="):
        opt.add_param_group({"params": [extra]})  # through the balancer: no target given
    for bad in (2, -1, True, torch.optim.SGD([extra], lr=0.1)):
        with pytest.raises(ValueError, match="is not one of its optimizers"):
            combined.add_param_group({"params": [extra]}, optimizer=bad)
    with pytest.raises(ValueError, match="more than one parameter group"):
        combined.add_param_group({"params": [trunk[0]]}, optimizer=adam)
    assert [len(g["params"]) for g in combined.param_groups] == [len(trunk), len(heads)]

    combined.add_param_group({"params": iter([extra])}, optimizer=1)  # any iterable, as torch
    group = combined.param_groups[-1]
    assert group is adam.param_groups[-1] and group["params"] == [extra]
    assert group["lr"] == 1e-3 and group["betas"] == adam.defaults["betas"]
    assert opt.param_groups[-1] is group and len(sgd.param_groups) == 1
    extra.grad = torch.ones_like(extra)
    combined.step()
    assert torch.all(extra < 1) and extra in combined.state  # stepped by Adam
    sgd.zero_grad()
    train(model, opt, "representation", 1)  # the balancer sees the new parameter as managed

    single = CombinedOptimizer([torch.optim.SGD(trunk, lr=0.1)])
    MGDA(single, num_tasks=K).add_param_group({"params": [extra], "lr": 0.5})
    assert single.param_groups[-1]["params"] == [extra]
    assert single.param_groups[-1]["lr"] == 0.5


@pytest.mark.parametrize(
    ("make_scheduler", "expected"),
    [
        (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5), 0.1 * 0.25),
        (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)), 0.1 / 5),
    ],
    ids=["StepLR", "LambdaLR"],
)
def test_lr_scheduler_on_the_wrapper(make_scheduler: Callable, expected: float) -> None:
    model, opt = setup("mgda", lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler = make_scheduler(opt)
        train(model, opt, "representation", 4, scheduler=scheduler)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert scheduler.get_last_lr()[0] == pytest.approx(expected)


def test_grad_scaler_and_autocast_bfloat16() -> None:
    torch.manual_seed(0)
    model = BlocksNet(k=2, seed=11, dtype=torch.float32)
    opt = MGDA(torch.optim.Adam(model.parameters(), lr=2e-2), num_tasks=2)
    scaler = torch.amp.GradScaler("cpu")
    x, ys = make_batch(11, n=32, k=2, dtype=torch.float32)
    history = []
    for _ in range(40):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            blocks, outs = model(x)
            losses = [F.mse_loss(o.float(), y) for o, y in zip(outs, ys)]
        info = opt.backward([scaler.scale(loss) for loss in losses], representation=blocks[0])
        assert not info.skipped
        scaler.step(opt)
        scaler.update()
        history.append([float(loss.detach()) for loss in losses])
    assert all(math.isfinite(v) for row in history for v in row)
    assert sum(history[-1]) < 0.8 * sum(history[0])


def test_clip_grad_norm_after_backward() -> None:
    model, opt = setup("mgda")
    x, ys = make_batch(12)
    balanced_backward(opt, model, x, ys, "representation")
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    assert float(total) > 1e-3
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(norm) <= 1e-3 * (1 + 1e-6)
    before = params_of(model)
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("method", ["mgda", "equal_weighted", "equal"])
def test_save_load_round_trip_continues_bit_identically(method: str, level: str) -> None:
    def make(seed: int) -> tuple[BlocksNet, BalancedOptimizer]:
        model = BlocksNet(seed=seed)
        return model, METHODS[method](torch.optim.Adam(model.parameters(), lr=1e-2))

    model_a, opt_a = make(0)
    train(model_a, opt_a, level, 3)
    # weights_only: the state dict holds no arbitrary objects
    checkpoint = checkpoint_copy({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    model_b, opt_b = make(123)
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["opt"])
    assert opt_b.num_steps == opt_a.num_steps == 3
    assert opt_b.num_tasks == K
    assert opt_b.param_groups is opt_b.optimizer.param_groups
    infos_a = train(model_a, opt_a, level, 4, first=10)
    infos_b = train(model_b, opt_b, level, 4, first=10)
    for ia, ib in zip(infos_a, infos_b):
        assert torch.equal(ia.weights, ib.weights)
    assert_same(params_of(model_a), params_of(model_b))
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["balancer"] == sb["balancer"]
    for key in sa["state"]:
        for name, value in sa["state"][key].items():
            assert torch.equal(value, sb["state"][key][name]), (key, name)


def test_state_dict_is_a_copy_of_the_balancer_state() -> None:
    model, opt = setup("mgda")
    train(model, opt, "representation", 1)
    opt.balancer_state["counter"] = torch.zeros(1)
    sd = opt.state_dict()
    sd["balancer"]["state"]["counter"] += 1
    assert float(opt.balancer_state["counter"]) == 0.0
    assert sd["balancer"]["method"] == "MGDA" and sd["balancer"]["num_steps"] == 1


def test_load_state_dict_errors() -> None:
    model, mgda = setup("mgda")
    train(model, mgda, "representation", 1)
    sd = mgda.state_dict()
    other = BlocksNet()
    equal = EqualWeight(torch.optim.SGD(other.parameters(), lr=0.05))
    with pytest.raises(ValueError, match="saved by MGDA.*EqualWeight"):
        equal.load_state_dict(sd)
    two = MGDA(torch.optim.SGD(BlocksNet().parameters(), lr=0.05), num_tasks=2)
    with pytest.raises(ValueError, match="num_tasks=3.*num_tasks=2"):
        two.load_state_dict(sd)
    with pytest.raises(TypeError, match="must be a dict"):
        mgda.load_state_dict([1, 2])  # type: ignore[arg-type]
    # a plain inner-optimizer state dict is accepted
    fresh = MGDA(torch.optim.SGD(BlocksNet().parameters(), lr=0.05), num_tasks=K)
    fresh.load_state_dict(mgda.optimizer.state_dict())
    assert fresh.num_steps == 0


def test_step_hooks_fire() -> None:
    model, opt = setup("mgda")
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre") if o is opt else None)
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post") if o is opt else None)
    train(model, opt, "representation", 2)
    assert calls == ["pre", "post", "pre", "post"]


def test_step_with_closure() -> None:
    model, opt = setup("mgda")
    x, ys = make_batch(13)

    def closure() -> float:
        opt.zero_grad()
        info = balanced_backward(opt, model, x, ys, "representation")
        return float(info.losses.sum())

    value = opt.step(closure)
    assert value is not None and math.isfinite(value)


def test_repr_and_options() -> None:
    model, opt = setup("mgda", task_names=["ctr", "cvr", "watch"])
    text = repr(opt)
    assert text.startswith("MGDA(num_tasks=3")
    assert "SGD" in text
    assert "EqualWeight" in repr(EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1)))
    assert "weights=[2.0, 0.5]" in repr(
        EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1), weights=(2.0, 0.5))
    )
    assert opt.task_names == ["ctr", "cvr", "watch"]


def test_num_tasks_inferred_from_first_call_and_task_names() -> None:
    model = BlocksNet()
    opt = MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    assert opt.num_tasks is None
    train(model, opt, "representation", 1)
    assert opt.num_tasks == K
    opt = MGDA(torch.optim.SGD(model.parameters(), lr=0.1), task_names=("a", "b", "c"))
    assert opt.num_tasks == 3


# ====================================================================== 5. bad input
def _rep_losses(
    seed: int = 14,
) -> tuple[BlocksNet, BalancedOptimizer, torch.Tensor, list[torch.Tensor]]:
    model, opt = setup("mgda", seed=seed)
    x, ys = make_batch(seed)
    blocks, outs = model(x)
    return model, opt, blocks[0], task_losses(outs, ys)


def test_wrong_number_of_losses() -> None:
    _, opt, z, losses = _rep_losses()
    with pytest.raises(ValueError, match="expected 3 losses.*got 2"):
        opt.backward(losses[:2], representation=z)


def test_non_scalar_loss() -> None:
    _, opt, z, losses = _rep_losses()
    losses[1] = losses[1].reshape(1).expand(2)
    with pytest.raises(ValueError, match=r"task 1.*must be a scalar.*shape \(2,\)"):
        opt.backward(losses, representation=z)


def test_loss_without_grad() -> None:
    _, opt, z, losses = _rep_losses()
    losses[2] = losses[2].detach()
    with pytest.raises(ValueError, match="task 2 does not require grad"):
        opt.backward(losses, representation=z)


@pytest.mark.parametrize(
    ("make_losses", "exc", "match"),
    [
        (lambda ls: (loss for loss in ls), TypeError, "sequence of scalar tensors"),
        (lambda ls: {i: loss for i, loss in enumerate(ls)}, TypeError, "sequence"),
        (lambda ls: ls[0], ValueError, "1-D"),
        (lambda ls: torch.stack(ls).reshape(1, 3), ValueError, "1-D"),
        (lambda ls: [], ValueError, "empty"),
        (lambda ls: [*ls[:2], 3.0], TypeError, "task 2.*not a Tensor"),
    ],
    ids=["generator", "dict", "scalar", "2d", "empty", "float"],
)
def test_losses_not_a_sequence(make_losses: Callable, exc: type, match: str) -> None:
    _, opt, z, losses = _rep_losses()
    with pytest.raises(exc, match=match):
        opt.backward(make_losses(losses), representation=z)


def test_both_or_neither_gradient_source() -> None:
    model, opt, z, losses = _rep_losses()
    with pytest.raises(ValueError, match="exactly one.*both"):
        opt.backward(losses, representation=z, shared_parameters=model.shared_parameters())
    with pytest.raises(ValueError, match="exactly one.*neither"):
        opt.backward(losses)


def test_representation_without_grad() -> None:
    model, opt = setup("mgda")
    x, ys = make_batch(15)
    z = model.trunk(x).detach()
    losses = task_losses([h(z).squeeze(-1) for h in model.heads], ys)
    with pytest.raises(ValueError, match="representation does not require grad"):
        opt.backward(losses, representation=z)


def test_leaf_representation() -> None:
    model, opt = setup("mgda")
    x, ys = make_batch(15)
    z = torch.randn(8, 5, dtype=F64, requires_grad=True)
    losses = task_losses([h(z).squeeze(-1) for h in model.heads], ys)
    with pytest.raises(ValueError, match="leaf tensor"):
        opt.backward(losses, representation=z)


def test_representation_bad_type() -> None:
    _, opt, z, losses = _rep_losses()
    with pytest.raises(TypeError, match="representation must be a tensor"):
        opt.backward(losses, representation=[])
    with pytest.raises(TypeError, match="block 1 is a int"):
        opt.backward(losses, representation=(z, 3))


@pytest.mark.parametrize("grad_mode", ["loop", "batched"])
@pytest.mark.parametrize("names", [None, ("ctr", "cvr", "watch")])
def test_loss_not_depending_on_representation(grad_mode: str, names: tuple | None) -> None:
    model, opt = setup("mgda", grad_mode=grad_mode, task_names=names)
    x, ys = make_batch(16)
    blocks, outs = model(x)
    other = model.trunk(x)  # a second forward: not the tensor the heads consumed
    outs[1] = model.heads[1](other).squeeze(-1)
    losses = task_losses(outs, ys)
    match = "task 1 \\('cvr'\\)" if names else "task 1 does not depend"
    with pytest.raises(ValueError, match=match) as err:
        opt.backward(losses, representation=blocks[0])
    assert "does not depend on the representation" in str(err.value)
    assert model.trunk[0].weight.grad is None  # nothing was written


@pytest.mark.parametrize("grad_mode", ["loop", "batched"])
@pytest.mark.parametrize("method", ["mgda", "equal", "equal_weighted"])
def test_numerically_zero_gradient_is_legal(method: str, grad_mode: str) -> None:
    model, opt = setup(method, grad_mode=grad_mode)
    x, ys = make_batch(17)
    blocks, outs = model(x)
    losses = task_losses(outs, ys)
    losses[0] = 0.0 * outs[0].sum()  # depends on z, gradient exactly zero
    info = opt.backward(losses, representation=blocks[0])
    assert bool(torch.isfinite(info.weights).all())
    assert not info.skipped
    assert_grads(model, expected_grads_zero_task(model, x, ys, info.weights))
    if method == "mgda":  # the zero gradient is the min-norm point
        assert float(info.weights[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["mgda", "equal"])
def test_zero_times_representation_is_legal(method: str) -> None:
    model, opt = setup(method)
    x, ys = make_batch(17)
    blocks, outs = model(x)
    losses = task_losses(outs, ys)
    losses[2] = 0 * blocks[0].sum()  # the loss IS 0 * z: depends on z, zero gradient
    info = opt.backward(losses, representation=blocks[0])
    assert bool(torch.isfinite(info.weights).all()) and not info.skipped
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.trunk.parameters())


def expected_grads_zero_task(
    model: BlocksNet, x: torch.Tensor, ys: Sequence, c: torch.Tensor
) -> dict:
    _, outs = model(x)
    losses = task_losses(outs, ys)
    losses[0] = 0.0 * outs[0].sum()
    shared = model.shared_parameters()
    weighted = sum(float(c[k]) * losses[k] for k in range(K))
    grads = torch.autograd.grad(weighted, shared, retain_graph=True)
    ids = {id(p): g for p, g in zip(shared, grads)}
    for k, head in enumerate(model.heads):
        params = list(head.parameters())
        for p, g in zip(params, torch.autograd.grad(losses[k], params, retain_graph=True)):
            ids[id(p)] = g
    return {n: ids[id(p)] for n, p in model.named_parameters()}


def test_shared_parameters_errors() -> None:
    model, opt, _, losses = _rep_losses()
    shared = model.shared_parameters()
    stranger = nn.Parameter(torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=r"shared_parameters\[1\].*not managed by the inner"):
        opt.backward(losses, shared_parameters=[shared[0], stranger])
    with pytest.raises(ValueError, match=r"shared_parameters\[2\] appears twice"):
        opt.backward(losses, shared_parameters=[shared[0], shared[1], shared[0]])
    with pytest.raises(TypeError, match="single tensor"):
        opt.backward(losses, shared_parameters=shared[0])
    with pytest.raises(ValueError, match="shared_parameters is empty"):
        opt.backward(losses, shared_parameters=[])
    with pytest.raises(TypeError, match=r"shared_parameters\[0\] is a str"):
        opt.backward(losses, shared_parameters=["w"])


def test_task_reaching_no_shared_parameter() -> None:
    model, opt = setup("mgda", task_names=["ctr", "cvr", "watch"])
    x, ys = make_batch(18)
    blocks, outs = model(x)
    outs[2] = model.heads[2](blocks[0].detach()).squeeze(-1)
    losses = task_losses(outs, ys)
    with pytest.raises(ValueError, match=r"task 2 \('watch'\) does not depend on any"):
        opt.backward(losses, shared_parameters=model.shared_parameters())


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda inner: MGDA(MGDA(inner)), TypeError, "already a BalancedOptimizer"),
        (
            lambda inner: MGDA([p for g in inner.param_groups for p in g["params"]]),
            TypeError,
            "must be a torch.optim.Optimizer",
        ),
        (lambda inner: MGDA(inner, num_tasks=0), ValueError, "num_tasks must be a positive int"),
        (lambda inner: MGDA(inner, num_tasks=-2), ValueError, "num_tasks"),
        (lambda inner: MGDA(inner, num_tasks=2.0), ValueError, "num_tasks"),
        (lambda inner: MGDA(inner, num_tasks=True), ValueError, "num_tasks"),
        (
            lambda inner: MGDA(inner, num_tasks=2, task_names=["a"]),
            ValueError,
            "task_names has 1 names but num_tasks=2",
        ),
        (lambda inner: MGDA(inner, on_nonfinite="ignore"), ValueError, "on_nonfinite must be"),
        (lambda inner: MGDA(inner, grad_mode="vmap"), ValueError, "grad_mode must be"),
        (lambda inner: MGDA(inner, normalization="max"), ValueError, "normalization must be"),
        (
            lambda inner: EqualWeight(inner, weights=(1.0, -1.0)),
            ValueError,
            "finite and non-negative",
        ),
        (
            lambda inner: EqualWeight(inner, weights=(1.0, float("nan"))),
            ValueError,
            "finite and non-negative",
        ),
        (
            lambda inner: EqualWeight(inner, num_tasks=3, weights=(1.0, 1.0)),
            ValueError,
            "weights has 2 entries but num_tasks=3",
        ),
        (lambda inner: EqualWeight(inner, weights=[[1.0, 2.0]]), ValueError, "1-D"),
        (lambda inner: EqualWeight(inner, weights=[]), ValueError, "non-empty"),
    ],
)
def test_constructor_errors(make: Callable, exc: type, match: str) -> None:
    inner = torch.optim.SGD(BlocksNet().parameters(), lr=0.1)
    with pytest.raises(exc, match=match):
        make(inner)


def test_equal_weight_wrong_number_of_losses() -> None:
    model = BlocksNet()
    opt = EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1), weights=(1.0, 2.0))
    x, ys = make_batch(19)
    with pytest.raises(ValueError, match="expected 2 losses"):
        balanced_backward(opt, model, x, ys, "representation")


# ---------------------------------------------------------------------- non-finite values
def _nan_losses(model: BlocksNet, x: torch.Tensor, ys: Sequence, task: int = 1) -> tuple:
    blocks, outs = model(x)
    losses = task_losses(outs, ys)
    losses[task] = losses[task] * float("nan")
    return blocks, losses


def _inf_grad_losses(model: BlocksNet, x: torch.Tensor, ys: Sequence, task: int = 2) -> tuple:
    """A finite loss whose gradient is infinite: sqrt at zero."""
    blocks, outs = model(x)
    losses = task_losses(outs, ys)
    z = blocks[0]
    losses[task] = losses[task] + torch.sqrt(z - z.detach()).sum()
    assert math.isfinite(float(losses[task].detach()))
    return blocks, losses


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(
    ("make_losses", "task", "what"),
    [(_nan_losses, 1, "loss"), (_inf_grad_losses, 2, "gradient")],
    ids=["nan_loss", "inf_grad"],
)
def test_nonfinite_raises_naming_the_task(
    make_losses: Callable, task: int, what: str, level: str
) -> None:
    model, opt = setup("mgda", task_names=["ctr", "cvr", "watch"])
    x, ys = make_batch(20)
    blocks, losses = make_losses(model, x, ys, task)
    name = ["ctr", "cvr", "watch"][task]
    source = (
        {"representation": blocks[0]}
        if level == "representation"
        else {"shared_parameters": model.shared_parameters()}
    )
    with pytest.raises(NonFiniteError, match=f"non-finite {what} for task {task} \\('{name}'\\)"):
        opt.backward(losses, **source)
    assert issubclass(NonFiniteError, ValueError)
    assert opt.num_steps == 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("make_losses", [_nan_losses, _inf_grad_losses], ids=["nan", "inf_grad"])
def test_nonfinite_skip(make_losses: Callable, level: str) -> None:
    model = BlocksNet(seed=21)
    opt = MGDA(torch.optim.Adam(model.parameters(), lr=1e-2), num_tasks=K, on_nonfinite="skip")
    train(model, opt, level, 2)  # some optimizer state to protect
    before = params_of(model)
    sd_before = opt.state_dict()
    x, ys = make_batch(21)
    opt.zero_grad()
    balanced_backward(opt, model, *make_batch(40), level)  # a good micro-batch first
    good = grads_of(model)
    blocks, losses = make_losses(model, x, ys)  # then a bad one in the same window
    source = (
        {"representation": blocks[0]}
        if level == "representation"
        else {"shared_parameters": model.shared_parameters()}
    )
    info = opt.backward(losses, **source)
    assert info.skipped
    assert "non-finite" in info.extras["reason"]
    assert info.weights.shape == (K,)
    # the whole window is rejected: the good micro-batch's balancer update is undone too
    assert opt.num_steps == 2
    # one NaN marker (the smallest parameter) so that a GradScaler sees the overflow; the
    # step below is skipped whatever the gradients hold
    assert set(grads_of(model)) == set(good)
    nan = [n for n, g in grads_of(model).items() if bool(torch.isnan(g).any())]
    assert len(nan) == 1
    assert min(model.named_parameters(), key=lambda q: q[1].numel())[0] == nan[0]
    opt.step()  # skipped: the window contains a bad micro-batch
    assert_same(params_of(model), before)  # parameters unchanged
    assert opt.num_steps == 2 and opt.num_skipped == 1
    sd_after = opt.state_dict()
    assert sd_after["balancer"]["num_skipped"] == 1
    assert sd_after["balancer"]["state"] == sd_before["balancer"]["state"]
    for key, st in sd_before["state"].items():  # Adam moments and step untouched
        for name, value in st.items():
            assert torch.equal(value, sd_after["state"][key][name])
    # the next normal step works
    infos = train(model, opt, level, 1, first=30)
    assert not infos[0].skipped
    assert opt.num_steps == 3 and opt.num_skipped == 1
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_skip_then_zero_grad_does_not_swallow_the_next_step() -> None:
    """A user who checks ``info.skipped`` and moves on without calling step()."""
    model = BlocksNet(seed=22)
    opt = MGDA(torch.optim.SGD(model.parameters(), lr=0.1), num_tasks=K, on_nonfinite="skip")
    x, ys = make_batch(22)
    opt.zero_grad()
    blocks, losses = _nan_losses(model, x, ys)
    assert opt.backward(losses, representation=blocks[0]).skipped
    before = params_of(model)
    train(model, opt, "representation", 1)  # zero_grad, backward, step
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_nonfinite_gradient_detected_by_equal_weight_with_gram() -> None:
    model = BlocksNet(seed=23)
    opt = EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1), compute_gram=True)
    x, ys = make_batch(23)
    blocks, losses = _inf_grad_losses(model, x, ys)
    with pytest.raises(NonFiniteError, match="non-finite gradient for task 2"):
        opt.backward(losses, representation=blocks[0])


# ---------------------------------------------------------------------- gaps found by review, now closed
def test_equal_weight_fast_path_catches_nonfinite_gradient() -> None:
    model = BlocksNet(seed=24)
    opt = EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1))
    x, ys = make_batch(24)
    blocks, losses = _inf_grad_losses(model, x, ys)
    with pytest.raises(NonFiniteError):
        opt.backward(losses, representation=blocks[0])


def test_equal_weight_parameter_level_skips_the_gram() -> None:
    model = BlocksNet(seed=25)
    opt = EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1))
    x, ys = make_batch(25)
    assert balanced_backward(opt, model, x, ys, "parameters").gram is None


def test_grad_scaler_backs_off_after_overflow() -> None:
    model = BlocksNet(k=2, seed=26, dtype=torch.float32)
    opt = MGDA(torch.optim.SGD(model.parameters(), lr=0.01), num_tasks=2, on_nonfinite="skip")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126)  # the first steps overflow
    x, ys = make_batch(26, k=2, dtype=torch.float32)
    for _ in range(8):
        opt.zero_grad()
        blocks, outs = model(x)
        losses = [8.0 * F.mse_loss(o, y) for o, y in zip(outs, ys)]
        opt.backward([scaler.scale(loss) for loss in losses], representation=blocks[0])
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() < 2.0**126
    assert opt.num_skipped < 8


def test_representation_reaching_no_trunk_parameter_raises() -> None:
    model, opt = setup("mgda")
    x, ys = make_batch(27)
    z = model.trunk(x).detach().requires_grad_() * 1.0  # non-leaf, cut from the trunk
    losses = task_losses([h(z).squeeze(-1) for h in model.heads], ys)
    with pytest.raises(ValueError):
        opt.backward(losses, representation=z)


def test_row_buffer_reused_resized_and_not_pickled() -> None:
    """The (K, numel) gradient buffer is kept across steps, re-made when the batch size changes,
    never leaks a previous step's rows, and is not part of a pickled or deep-copied optimizer."""
    import copy
    import pickle

    model, opt = setup("mgda")
    for n in (8, 8, 5, 8):  # same size twice (reuse), then a smaller and a larger batch
        x, ys = make_batch(n, n=n)
        blocks, outs = model(x)
        losses = task_losses(outs, ys)
        h = torch.stack(
            [
                torch.autograd.grad(loss, blocks[0], retain_graph=True)[0].reshape(-1)
                for loss in losses
            ]
        )
        opt.zero_grad()
        info = opt.backward(losses, representation=blocks[0])
        assert float((info.gram - h @ h.T).abs().max()) < 1e-12
        assert opt._rows_cache is not None and opt._rows_cache[1][0].shape == (K, blocks[0].numel())
        assert_grads(model, expected_grads(model, x, ys, info.weights))
        opt.step()
    assert pickle.loads(pickle.dumps(opt))._rows_cache is None
    assert copy.deepcopy(opt)._rows_cache is None


class _InverseLoss(BalancedOptimizer):
    """A loss-level toy method: c_k = 1 / L_k."""

    uses_gradients = False
    requires_gram = False

    def _compute_weights(self, gram, losses, block_grams):  # type: ignore[no-untyped-def]
        return 1.0 / losses, {"inverse": 1.0 / losses}


@pytest.mark.parametrize("level", LEVELS)
def test_loss_level_method_is_one_weighted_backward(level: str) -> None:
    """Loss-level methods: c from the host losses, ONE backward of sum_k c_k L_k (heads
    included), no per-task gradient, one host transfer."""
    from _sync_count import SyncCounter

    model = BlocksNet(seed=31)
    opt = _InverseLoss(torch.optim.SGD(model.parameters(), lr=0.1), num_tasks=K)
    x, ys = make_batch(31)
    _, outs = model(x)
    values = torch.stack([loss.detach() for loss in task_losses(outs, ys)])
    opt.zero_grad()
    with SyncCounter() as counter:
        info = balanced_backward(opt, model, x, ys, level)
    assert counter.count == 1, counter.calls
    assert info.gram is None
    torch.testing.assert_close(info.weights, 1.0 / values.double())
    torch.testing.assert_close(info.extras["inverse"], 1.0 / values.double())
    assert_grads(model, expected_grads(model, x, ys, 1.0 / values, weight_heads=True))
