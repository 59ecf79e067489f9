"""Tests for balancers.multibalance: MetaBalance-verified numbers, gating, plumbing identities,
the empty-task rule, per-block weights, parameter-level MetaBalance parity, checkpointing."""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from balancers.equal import EqualWeight
from balancers.mgda import MGDA, mgda_weights
from balancers.multibalance import (
    MultiBalance,
    MultiBalanceClampWarning,
    multibalance_weights,
    update_norm_averages,
)

sys.path.insert(0, str(Path(__file__).parent))
from _models import TinyNet, mlp_net  # noqa: E402

F64 = torch.float64


# ---------------------------------------------------------------------- helpers
class _Controlled:
    """A trunk ``z = x W`` whose task gradients at ``z`` have prescribed norms.

    ``L_k = a_k <z, u_k>`` with unit directions ``u_k``, so ``h_k = a_k u_k`` and ``|h_k| = a_k``.
    """

    def __init__(self, k: int, dim: int = 4) -> None:
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(dim, dim, dtype=F64))
        self.x = torch.randn(3, dim, dtype=F64)
        u = torch.randn(k, 3, dim, dtype=F64)
        self.u = u / u.flatten(1).norm(dim=1)[:, None, None]

    def losses(self, norms: list[float]) -> tuple[Tensor, list[Tensor]]:
        z = self.x @ self.w
        return z, [a * (z * u).sum() for a, u in zip(norms, self.u)]


def _mlp_losses(model: TinyNet, x: Tensor, ys: Tensor, scales: list[float]):
    """``(z, losses)``; ``ys`` is ``(K, B)``."""
    losses, z = model.losses(x, ys.T, scales)
    return z, losses


def _data(k: int, n: int = 16, dtype: torch.dtype = F64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(k, n, generator=g, dtype=dtype)


# ---------------------------------------------------------------------- sanity numbers (2.C)
def test_pure_function_sanity_numbers() -> None:
    w = multibalance_weights(torch.tensor([1.0, 4.0]), relax_factor=0.7, anchor=0)
    assert w.tolist() == pytest.approx([1.0, 0.475], abs=1e-12)
    assert 4.0 * float(w[1]) == pytest.approx(1.9)
    w1 = multibalance_weights(torch.tensor([1.0, 4.0]), relax_factor=1.0, anchor=0)
    assert 4.0 * float(w1[1]) == pytest.approx(1.0)
    w0 = multibalance_weights(torch.tensor([1.0, 4.0]), relax_factor=0.0, anchor=0)
    assert w0.tolist() == [1.0, 1.0]
    assert 4.0 * float(w0[1]) == 4.0


def test_moving_average_sanity_numbers() -> None:
    m, upd = update_norm_averages(torch.zeros(2, dtype=F64), torch.tensor([1.0, 4.0]), beta=0.9)
    assert m.tolist() == pytest.approx([0.1, 0.4]) and upd.all()
    assert float(multibalance_weights(m, anchor=0)[1]) == pytest.approx(0.475, abs=1e-12)
    m, _ = update_norm_averages(m, torch.tensor([1.0, 2.0]), beta=0.9)
    assert m.tolist() == pytest.approx([0.19, 0.56])
    w = multibalance_weights(m, anchor=0)
    assert float(m[0] / m[1]) == pytest.approx(0.339286, abs=1e-6)
    assert float(w[1]) == pytest.approx(0.5375, abs=1e-12)
    assert 2.0 * float(w[1]) == pytest.approx(1.075, abs=1e-12)


def test_optimizer_reproduces_sanity_numbers() -> None:
    c = _Controlled(2)
    opt = MultiBalance(torch.optim.SGD([c.w], lr=0.1), anchor=0)
    for norms, expected, ma in (
        ([1.0, 4.0], 0.475, [0.1, 0.4]),
        ([1.0, 2.0], 0.5375, [0.19, 0.56]),
    ):
        opt.zero_grad()
        z, losses = c.losses(norms)
        info = opt.backward(losses, representation=z)
        assert info.weights.shape == (2,)
        assert info.weights.tolist() == pytest.approx([1.0, expected], abs=1e-12)
        assert info.extras["norms"].tolist() == pytest.approx(norms)
        assert info.extras["norms_ma"].tolist() == pytest.approx(ma)
        assert float(info.extras["reference"]) == pytest.approx(ma[0])
        # the trunk got exactly sum_k w_k h_k
        h = torch.stack([a * u for a, u in zip(norms, c.u)])
        expected_grad = c.x.T @ torch.einsum("k,kbd->bd", info.weights, h)
        torch.testing.assert_close(c.w.grad, expected_grad, rtol=1e-12, atol=1e-14)
        opt.step()
    assert opt.balancer_state["norms_ma"].shape == (1, 2)


def test_symmetric_anchor_default_is_mean() -> None:
    m = torch.tensor([0.1, 0.4], dtype=F64)
    w = multibalance_weights(m)  # anchor=None
    ref = 0.25
    assert w.tolist() == pytest.approx([0.7 * ref / 0.1 + 0.3, 0.7 * ref / 0.4 + 0.3])
    assert torch.equal(w, multibalance_weights(m, anchor="mean"))
    wmax = multibalance_weights(m, anchor="max")
    assert wmax.tolist() == pytest.approx([0.7 * 4 + 0.3, 1.0])
    wmin = multibalance_weights(m, anchor="min")
    assert wmin.tolist() == pytest.approx([1.0, 0.475])


# ---------------------------------------------------------------------- strategies
def test_strategy_gating() -> None:
    dominating = torch.tensor([1.0, 4.0], dtype=F64)  # aux above the anchor
    weak = torch.tensor([1.0, 0.5], dtype=F64)  # aux below the anchor
    assert multibalance_weights(dominating, strategy="A", anchor=0).tolist() == pytest.approx(
        [1.0, 0.475]
    )
    assert multibalance_weights(weak, strategy="A", anchor=0).tolist() == [1.0, 1.0]
    assert multibalance_weights(dominating, strategy="B", anchor=0).tolist() == [1.0, 1.0]
    assert multibalance_weights(weak, strategy="B", anchor=0).tolist() == pytest.approx(
        [1.0, 0.7 * 2 + 0.3]
    )
    both = multibalance_weights(torch.stack([dominating, weak]), strategy="C", anchor=0)
    torch.testing.assert_close(both, torch.tensor([[1.0, 0.475], [1.0, 1.7]], dtype=F64))
    # nothing is above the max / below the min
    m = torch.tensor([0.3, 1.0, 2.0], dtype=F64)
    assert multibalance_weights(m, strategy="A", anchor="max").tolist() == [1.0, 1.0, 1.0]
    assert multibalance_weights(m, strategy="B", anchor="min").tolist() == [1.0, 1.0, 1.0]


def test_clamp_bounds_weights() -> None:
    m = torch.tensor([1.0, 1e-4, 1e4], dtype=F64)
    w = multibalance_weights(m, anchor=0, relax_factor=1.0, clamp=(0.1, 10.0))
    assert w.tolist() == [1.0, 10.0, 0.1]
    w = multibalance_weights(m, anchor=0, relax_factor=1.0)  # default: unbounded
    assert w.tolist() == pytest.approx([1.0, 1e4, 1e-4])


def _gap_run(gap: float, steps: int = 5, **options: Any) -> tuple[list[np.ndarray], Any]:
    """Two tasks on one representation whose gradients differ in norm by ``gap``."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 3, dtype=F64)
    heads = [torch.nn.Linear(3, 1, dtype=F64) for _ in range(2)]
    params = [*trunk.parameters(), *(p for h in heads for p in h.parameters())]
    opt = MultiBalance(torch.optim.SGD(params, lr=0.0), **options)
    x = torch.randn(16, 4, dtype=F64)
    infos = []
    for _ in range(steps):
        opt.zero_grad()
        z = trunk(x)
        losses = [heads[0](z).square().mean(), gap * heads[1](z).square().mean()]
        infos.append(opt.backward(losses, representation=z))
        opt.step()
    return [np.asarray(i.weights) for i in infos], infos[-1]


def test_default_balances_a_1000x_norm_gap() -> None:
    """Issue 18: at a 1000x gradient-norm gap the default weights move by far more than 10x
    (the old clamp capped them at 10x, silently)."""
    weights, info = _gap_run(1000.0)
    w = weights[-1]
    assert w[0] / w[1] > 100.0
    assert "clamped" not in info.extras
    n = np.asarray(info.extras["norms"])
    # balanced: the weighted norms agree to within the relaxation (r = 0.7)
    assert (w * n).max() / (w * n).min() < 3.0


def test_clamp_that_binds_warns_once_and_marks_extras() -> None:
    with pytest.warns(MultiBalanceClampWarning, match="capped its weights") as rec:
        weights, info = _gap_run(1000.0, clamp=(0.1, 10.0))
    assert len([r for r in rec if r.category is MultiBalanceClampWarning]) == 1
    assert np.asarray(info.extras["clamped"]).tolist() == [True, False]
    assert weights[-1][0] == 10.0


def test_clamp_that_does_not_bind_is_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", MultiBalanceClampWarning)
        _, info = _gap_run(1.5, clamp=(0.1, 10.0))
    assert not np.asarray(info.extras["clamped"]).any()


# ---------------------------------------------------------------------- plumbing identities
def test_relax_factor_zero_is_the_plain_sum_bitwise() -> None:
    model_a = mlp_net(2, torch.float32)
    model_b = copy.deepcopy(model_a)
    opt_a = MultiBalance(torch.optim.SGD(model_a.parameters(), lr=0.05), relax_factor=0.0)
    opt_b = EqualWeight(torch.optim.SGD(model_b.parameters(), lr=0.05))
    for step in range(3):
        x, ys = _data(2, dtype=torch.float32, seed=step)
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            z, losses = _mlp_losses(model, x, ys, [1.0, 30.0])
            info = opt.backward(losses, representation=z)
            assert info.weights.tolist() == [1.0, 1.0]
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(pa.grad, pb.grad)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("anchor", [None, 0, "max"])
def test_representation_level_equals_loss_weighting(anchor) -> None:
    model = mlp_net(3)
    opt = MultiBalance(torch.optim.SGD(model.parameters(), lr=0.05), anchor=anchor)
    trunk = list(model.trunk.parameters())
    heads = list(model.heads.parameters())
    for step in range(4):
        x, ys = _data(3, seed=step)
        opt.zero_grad()
        z, losses = _mlp_losses(model, x, ys, [1.0, 20.0, 0.05])
        info = opt.backward(losses, representation=z)
        w = info.weights
        assert w.shape == (3,) and not torch.equal(w, torch.ones(3, dtype=F64))
        _, ref_losses = _mlp_losses(model, x, ys, [1.0, 20.0, 0.05])
        weighted = sum(float(wk) * lk for wk, lk in zip(w, ref_losses))
        g_trunk = torch.autograd.grad(weighted, trunk, retain_graph=True)
        g_heads = torch.autograd.grad(sum(ref_losses), heads)
        for p, g in zip(trunk, g_trunk):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-10)
        for p, g in zip(heads, g_heads):  # heads: their own unweighted loss
            torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-10)
        opt.step()


# ---------------------------------------------------------------------- empty tasks
@pytest.mark.parametrize("kind", ["times_zero", "constant", "tiny"])
def test_zero_gradient_task_keeps_weights_finite_and_ma_clean(kind: str) -> None:
    c = _Controlled(3)
    opt = MultiBalance(torch.optim.SGD([c.w], lr=0.0))
    ref = MultiBalance(torch.optim.SGD([c.w], lr=0.0))  # the same two tasks without the third
    for _ in range(3):
        z, losses = c.losses([1.0, 2.0, 1e-9 if kind == "tiny" else 0.0])
        if kind == "times_zero":
            losses[2] = (0 * z).sum()
        elif kind == "constant":
            losses[2] = ((z * 0).sum() + 1.0) ** 2
        opt.zero_grad()
        info = opt.backward(losses, representation=z)
        assert bool(torch.isfinite(info.weights).all())
        assert float(info.weights[2]) == 1.0
        assert not bool(info.extras["updated"][2])
        assert float(opt.balancer_state["norms_ma"][0, 2]) == 0.0
        assert int(opt.balancer_state["num_updates"][0, 2]) == 0
        z2, losses2 = c.losses([1.0, 2.0])
        info2 = ref.backward(losses2[:2], representation=z2)
        assert torch.equal(info.weights[:2], info2.weights)  # the mean ignores the empty task
        assert torch.equal(info.extras["norms_ma"][:2], info2.extras["norms_ma"])
    # the task comes back: its late start is not mistaken for a small gradient
    z, losses = c.losses([1.0, 2.0, 3.0])
    info = opt.backward(losses, representation=z)
    assert int(opt.balancer_state["num_updates"][0, 2]) == 1
    assert float(info.extras["norms_ma"][2]) == pytest.approx(0.3)
    expected = multibalance_weights(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    torch.testing.assert_close(info.weights, expected, rtol=1e-10, atol=0)


def test_all_zero_task_at_step_one_and_never_updated_ma() -> None:
    # every entry updated (skip_empty=None): an all-zero task still gets weight 1, finite.
    c = _Controlled(2)
    opt = MultiBalance(torch.optim.SGD([c.w], lr=0.0), anchor=0, skip_empty=None, clamp=None)
    z, losses = c.losses([1.0, 0.0])
    info = opt.backward(losses, representation=z)
    assert info.weights.tolist() == [1.0, 1.0]
    # the anchor itself empty: m_ref = 0 -> all ones
    opt = MultiBalance(torch.optim.SGD([c.w], lr=0.0), anchor=0)
    z, losses = c.losses([0.0, 5.0])
    info = opt.backward(losses, representation=z)
    assert info.weights.tolist() == [1.0, 1.0]
    assert update_norm_averages(torch.zeros(2), torch.zeros(2))[1].tolist() == [False, False]


def test_relative_threshold_of_the_empty_rule() -> None:
    m0 = torch.zeros(3, dtype=F64)
    n = torch.tensor([1.0, 1e-7, 1e-5], dtype=F64)
    assert update_norm_averages(m0, n)[1].tolist() == [True, False, True]
    assert update_norm_averages(m0, n, skip_empty=0.0)[1].tolist() == [True, True, True]
    zero = torch.tensor([1.0, 0.0, 0.0])
    assert update_norm_averages(m0, zero, skip_empty=0.0)[1].tolist() == [True, False, False]
    assert update_norm_averages(m0, n, skip_empty=None)[1].all()


# ---------------------------------------------------------------------- blocks
class _TwoBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(5, 4).double()
        self.b = nn.Linear(5, 4).double()
        self.heads = nn.ModuleList(nn.Linear(8, 1).double() for _ in range(2))

    def forward(self, x: Tensor, ys: Tensor):
        z1, z2 = torch.tanh(self.a(x)), torch.tanh(self.b(x))
        # task 0 leans on block 1, task 1 on block 2: different magnitude ratios per block
        feats = [torch.cat([10 * z1, z2], -1), torch.cat([z1, 10 * z2], -1)]
        losses = [((h(f).squeeze(-1) - y) ** 2).mean() for h, f, y in zip(self.heads, feats, ys)]
        return (z1, z2), losses


def test_per_block_weights_with_two_representation_tensors() -> None:
    model = _TwoBlock()
    opt = MultiBalance(torch.optim.SGD(model.parameters(), lr=0.01), anchor=0)
    x, ys = _data(2, seed=5)
    blocks, losses = model(x, ys)
    h = [torch.autograd.grad(loss, blocks, retain_graph=True) for loss in losses]
    info = opt.backward(losses, representation=blocks)
    assert info.weights.shape == (2, 2)
    assert info.block_grams is not None and info.block_grams.shape == (2, 2, 2)
    assert info.weights[:, 0].tolist() == [1.0, 1.0]
    assert float(info.weights[0, 1]) > 1.0 > float(info.weights[1, 1])  # enlarge / shrink
    norms = torch.tensor([[float(h[k][b].norm()) for k in range(2)] for b in range(2)], dtype=F64)
    expected = multibalance_weights(norms, anchor=0)
    torch.testing.assert_close(info.weights, expected, rtol=1e-9, atol=0)
    # each block's trunk receives its own weighting: check block a's weight gradient
    combined = sum(float(info.weights[0, k]) * h[k][0] for k in range(2))
    (g_ref,) = torch.autograd.grad(torch.tanh(model.a(x)), model.a.weight, combined)
    torch.testing.assert_close(model.a.weight.grad, g_ref, rtol=1e-12, atol=1e-14)
    # a different partition is refused
    opt.zero_grad()
    (z1, _), losses = model(x, ys)
    with pytest.raises(ValueError, match="block"):
        opt.backward(losses, representation=z1)
    opt.reset_state()
    assert opt.backward(losses, representation=z1).weights.shape == (2,)


# ---------------------------------------------------------------------- parameter level
class _ParamModel(nn.Module):
    """Shared: two linear layers plus an extra tensor only task 0 reaches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.l1 = nn.Linear(5, 8).double()
        self.l2 = nn.Linear(8, 6).double()
        self.only0 = nn.Parameter(torch.randn(6, dtype=F64))
        self.heads = nn.ModuleList(nn.Linear(6, 1).double() for _ in range(2))

    def shared(self) -> list[nn.Parameter]:
        return [*self.l1.parameters(), *self.l2.parameters(), self.only0]

    def losses(self, x: Tensor, ys: Tensor) -> list[Tensor]:
        z = torch.tanh(self.l2(torch.tanh(self.l1(x))))
        out0 = self.heads[0](z * self.only0).squeeze(-1)
        out1 = self.heads[1](z).squeeze(-1)
        return [((out0 - ys[0]) ** 2).mean(), 5.0 * ((out1 - ys[1]) ** 2).mean()]


def _reference_metabalance(model: _ParamModel, opt, batches, r=0.7, beta=0.9, eps=1e-12):
    """Straightforward MetaBalance (Algorithm 2, strategy C, first loss = target) per tensor."""
    shared = model.shared()
    ids = {id(p) for p in shared}
    heads = [p for p in model.parameters() if id(p) not in ids]
    norms = [[0.0, 0.0] for _ in shared]
    history = []
    for x, ys in batches:
        opt.zero_grad()
        losses = model.losses(x, ys)
        grads = []
        for loss in losses:
            gs = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, shared)])
        ws = []
        for i, p in enumerate(shared):
            total = torch.zeros_like(p)
            row = []
            for k in range(2):
                norms[i][k] = beta * norms[i][k] + (1 - beta) * float(grads[k][i].norm())
                w = 1.0 if k == 0 else r * norms[i][0] / (norms[i][k] + eps) + (1 - r)
                row.append(w)
                total = total + w * grads[k][i]
            p.grad = total
            ws.append(row)
        sum(losses).backward(inputs=heads)
        opt.step()
        history.append(([p.detach().clone() for p in model.parameters()], ws))
    return history


@pytest.mark.parametrize("skip_empty", [None, 1e-6])
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_parameter_level_matches_metabalance(skip_empty, inner) -> None:
    def make(params):
        if inner == "adam":
            return torch.optim.Adam(params, lr=1e-2)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    model = _ParamModel()
    ref_model = copy.deepcopy(model)
    batches = [_data(2, seed=20 + s) for s in range(5)]
    history = _reference_metabalance(ref_model, make(ref_model.parameters()), batches)
    opt = MultiBalance(make(model.parameters()), anchor=0, clamp=None, skip_empty=skip_empty)
    for (x, ys), (params, ws) in zip(batches, history):
        opt.zero_grad()
        info = opt.backward(model.losses(x, ys), shared_parameters=model.shared())
        assert info.level == "parameters" and info.weights.shape == (5, 2)
        assert bool(torch.isfinite(info.weights).all())
        # the tensor task 1 never reaches: zero gradient, weight 1, no NaN
        assert float(info.block_grams[4, 1, 1]) == 0.0 and float(info.weights[4, 1]) == 1.0
        torch.testing.assert_close(
            info.weights[:4], torch.tensor(ws[:4], dtype=F64), rtol=1e-12, atol=0
        )
        opt.step()
        for p, q in zip(model.parameters(), params):
            torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-12)
    assert len(set(info.weights[:4, 1].tolist())) == 4  # different weights per tensor


# ---------------------------------------------------------------------- checkpointing
def test_state_dict_round_trip_continues_identically() -> None:
    model = mlp_net(3)
    opt = MultiBalance(torch.optim.Adam(model.parameters(), lr=1e-2), anchor=1)
    batches = [_data(3, seed=40 + s) for s in range(6)]

    def run(m, o, bs):
        out = []
        for x, ys in bs:
            o.zero_grad()
            z, losses = _mlp_losses(m, x, ys, [1.0, 8.0, 0.2])
            out.append(o.backward(losses, representation=z).weights)
            o.step()
        return out

    run(model, opt, batches[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    assert saved["balancer"]["method"] == "MultiBalance"
    assert saved["balancer"]["state"]["norms_ma"].shape == (1, 3)
    w_a = run(model, opt, batches[3:])

    model_b = mlp_net(3, seed=99)
    model_b.load_state_dict(saved_model)
    opt_b = MultiBalance(torch.optim.Adam(model_b.parameters(), lr=1e-2), anchor=1)
    opt_b.load_state_dict(saved)
    w_b = run(model_b, opt_b, batches[3:])
    for a, b in zip(w_a, w_b):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_nonfinite_loss_is_skipped_without_touching_state() -> None:
    c = _Controlled(2)
    opt = MultiBalance(torch.optim.SGD([c.w], lr=0.1), on_nonfinite="skip")
    z, losses = c.losses([1.0, 2.0])
    opt.backward(losses, representation=z)
    opt.step()
    before = copy.deepcopy(opt.balancer_state)
    opt.zero_grad()  # a new step (accumulation window): a skip rolls back to its start
    z, losses = c.losses([1.0, 2.0])
    info = opt.backward([losses[0], losses[1] * float("nan")], representation=z)
    assert info.skipped
    for key, value in before.items():
        assert torch.equal(opt.balancer_state[key], value)


# ---------------------------------------------------------------------- MGDA rule
def test_mgda_rule_matches_mgda_and_ema() -> None:
    model = mlp_net(3)
    model_b = copy.deepcopy(model)
    opt = MultiBalance(torch.optim.SGD(model.parameters(), lr=0.0), rule="mgda", mgda_ema=True)
    ref = MGDA(torch.optim.SGD(model_b.parameters(), lr=0.0))
    alphas, weights = [], []
    for step in range(2):
        x, ys = _data(3, seed=step)
        z, losses = _mlp_losses(model, x, ys, [1.0, 20.0, 0.05])
        info = opt.backward(losses, representation=z)
        z, losses = _mlp_losses(model_b, x, ys, [1.0, 20.0, 0.05])
        info_ref = ref.backward(losses, representation=z)
        torch.testing.assert_close(info.extras["alpha"], info_ref.weights, rtol=0, atol=1e-12)
        alphas.append(info_ref.weights)
        weights.append(info.weights)
    torch.testing.assert_close(weights[0], alphas[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(weights[1], 0.9 * alphas[0] + 0.1 * alphas[1], rtol=0, atol=1e-12)
    assert float(weights[1].sum()) == pytest.approx(1.0)


def test_mgda_rule_excludes_empty_tasks() -> None:
    c = _Controlled(3)
    opt = MultiBalance(torch.optim.SGD([c.w], lr=0.0), rule="mgda")
    z, losses = c.losses([1.0, 2.0, 0.0])
    info = opt.backward(losses, representation=z)
    gram = info.gram
    expected, _ = mgda_weights(gram[:2, :2])
    assert float(info.weights[2]) == 0.0
    torch.testing.assert_close(info.weights[:2], expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- validation
def _sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)


@pytest.mark.parametrize(
    "options",
    [
        {"relax_factor": -0.1},
        {"relax_factor": 1.1},
        {"relax_factor": math.nan},
        {"beta": 1.0},
        {"beta": -0.1},
        {"strategy": "D"},
        {"anchor": 2},
        {"anchor": -1},
        {"anchor": "median"},
        {"anchor": True},
        {"eps": -1.0},
        {"clamp": (2.0, 10.0)},
        {"clamp": (0.1, 0.5)},
        {"clamp": 3.0},
        {"skip_empty": 1.0},
        {"rule": "loss"},
    ],
)
def test_bad_options_raise(options) -> None:
    with pytest.raises(ValueError):
        MultiBalance(_sgd(), 2, **options)


def test_anchor_checked_at_first_backward_when_k_unknown() -> None:
    c = _Controlled(2)
    opt = MultiBalance(torch.optim.SGD([c.w], lr=0.1), anchor=5)
    z, losses = c.losses([1.0, 2.0])
    with pytest.raises(ValueError, match="anchor"):
        opt.backward(losses, representation=z)
    with pytest.raises(ValueError, match="anchor"):
        multibalance_weights(torch.ones(2), anchor=2)
    with pytest.raises(ValueError, match="norms_ma"):
        multibalance_weights(torch.tensor([1.0, -1.0]))


def test_repr_names_the_options() -> None:
    text = repr(MultiBalance(_sgd(), 2, anchor=0))
    assert "relax_factor=0.7" in text and "strategy='C'" in text and "anchor=0" in text


# ---------------------------------------------------------------------- properties
_norms = st.lists(st.floats(min_value=1e-3, max_value=1e3, allow_nan=False), min_size=2, max_size=6)
_anchors = st.sampled_from([0, "mean", "max", "min", None])


@settings(deadline=None)
@given(_norms, _anchors)
def test_property_full_relaxation_equalises_magnitudes(norms, anchor) -> None:
    m = torch.tensor(norms, dtype=F64)
    w = multibalance_weights(m, relax_factor=1.0, strategy="C", anchor=anchor, eps=0.0, clamp=None)
    ref = {0: m[0], "max": m.max(), "min": m.min()}.get(anchor, m.mean())
    torch.testing.assert_close(w * m, ref.expand_as(m), rtol=1e-12, atol=0)


@settings(deadline=None)
@given(_norms, _anchors, st.floats(min_value=0.0, max_value=1.0), st.floats(0.01, 100.0))
def test_property_gating_direction_and_scale_invariance(norms, anchor, r, scale) -> None:
    m = torch.tensor(norms, dtype=F64)
    kw = {"relax_factor": r, "anchor": anchor, "eps": 0.0, "clamp": None}
    w_a = multibalance_weights(m, strategy="A", **kw)
    w_b = multibalance_weights(m, strategy="B", **kw)
    w_c = multibalance_weights(m, strategy="C", **kw)
    assert bool((w_a <= 1 + 1e-12).all()) and bool((w_b >= 1 - 1e-12).all())
    one = torch.ones_like(w_c)  # A takes C's weights below 1, B those above 1
    torch.testing.assert_close(torch.minimum(w_a, w_b), torch.minimum(w_c, one))
    torch.testing.assert_close(torch.maximum(w_a, w_b), torch.maximum(w_c, one))
    torch.testing.assert_close(multibalance_weights(m * scale, strategy="C", **kw), w_c)


@settings(deadline=None)
@given(_norms, st.sampled_from(["mean", "max", "min"]), st.randoms(use_true_random=False))
def test_property_symmetric_anchor_is_permutation_equivariant(norms, anchor, rnd) -> None:
    m = torch.tensor(norms, dtype=F64)
    perm = list(range(len(norms)))
    rnd.shuffle(perm)
    perm_t = torch.tensor(perm)
    w = multibalance_weights(m, anchor=anchor)
    torch.testing.assert_close(multibalance_weights(m[perm_t], anchor=anchor), w[perm_t])
