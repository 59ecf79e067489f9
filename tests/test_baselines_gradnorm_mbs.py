"""Tests for balancers.gradnorm (GradNorm, Chen et al. ICML 2018) and balancers.multibalance_s
(MultiBalance as a third-party summary describes it [S]): hand-derived steps, invariants
(sum w = K, lam on the simplex), checkpointing, skipped steps, both levels through the public
API, zero task gradients."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from balancers.gradnorm import GradNorm, _gradnorm_step_np, gradnorm_step
from balancers.multibalance_s import MultiBalanceS, _multibalance_s_step_np, multibalance_s_step
from mtl import BalancedOptimizer

sys.path.insert(0, str(Path(__file__).parent))
from _models import TinyNet, batch, flat  # noqa: E402
from _sync_count import SyncCounter  # noqa: E402

F64 = torch.float64
CLASSES: list[type[BalancedOptimizer]] = [GradNorm, MultiBalanceS]
LEVELS = ("representation", "parameters")


# ---------------------------------------------------------------------- helpers
def _step(
    opt: BalancedOptimizer,
    model: TinyNet,
    seed: int,
    level: str = "representation",
    scales: list[float] | None = None,
) -> Any:
    x, y = batch(model.num_tasks, seed=seed)
    losses, z = model.losses(x, y, scales)
    opt.zero_grad()
    if level == "representation":
        info = opt.backward(losses, representation=z)
    else:
        info = opt.backward(losses, shared_parameters=model.shared_parameters())
    opt.step()
    return info


def _grads(params: list[nn.Parameter]) -> Tensor:
    """The parameters' ``.grad`` flattened and concatenated (all must be set)."""
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads)
    return flat(g for g in grads if g is not None)


def _weighted(weights: Tensor, losses: list[Tensor]) -> Tensor:
    """``sum_k c_k L_k`` with the coefficients as constants."""
    return (weights.to(losses[0].dtype) * torch.stack(losses)).sum()


def _state(opt: BalancedOptimizer) -> dict[str, Tensor]:
    """A copy of the balancer state as tensors (what ``state_dict()`` saves)."""
    return {key: torch.tensor(np.asarray(v)) for key, v in opt.balancer_state.items()}


def _assert_state_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------- GradNorm by hand
def test_gradnorm_one_step_by_hand() -> None:
    """Diagonal Gram M = diag(4, 1): ||g|| = (2, 1); w(0) = (1, 1); L = L(0) = (2, 1).

    r = (1, 1) (every loss at its initial value); G = w ||g|| = (2, 1), mean(G) = 1.5, so the
    targets are (1.5, 1.5); sign(G - T) = (+1, -1); dL_grad/dw = (+1 * 2, -1 * 1) = (2, -1);
    L_grad = |2 - 1.5| + |1 - 1.5| = 1.
    w' = w - 0.025 (2, -1) = (0.95, 1.025), sum 1.975; renormalised to sum K = 2:
    w(1) = (1.9, 2.05) / 1.975 = (0.9620253164556962, 1.0379746835443038).
    """
    out = _gradnorm_step_np(
        np.ones(2),
        np.array([2.0, 1.0]),
        np.array([2.0, 1.0]),
        np.zeros(2),  # not recorded: recorded now as (2, 1)
        lr=0.025,
        alpha=1.5,
        min_weight=1e-6,
    )
    np.testing.assert_array_equal(out["initial_losses"], [2.0, 1.0])
    np.testing.assert_allclose(out["loss_ratios"], [1.0, 1.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(out["gradnorms"], [2.0, 1.0])
    np.testing.assert_allclose(out["targets"], [1.5, 1.5], rtol=1e-15)
    np.testing.assert_allclose(out["weight_grad"], [2.0, -1.0])
    assert float(out["grad_loss"]) == pytest.approx(1.0, rel=1e-15)
    np.testing.assert_allclose(
        out["next_weights"], [0.9620253164556962, 1.0379746835443038], rtol=1e-14
    )
    # the public wrapper takes the Gram matrix itself
    w1 = gradnorm_step([1.0, 1.0], np.diag([4.0, 1.0]), [2.0, 1.0], [0.0, 0.0])
    np.testing.assert_allclose(w1.numpy(), out["next_weights"], rtol=1e-15)


def test_gradnorm_second_step_uses_loss_ratios_by_hand() -> None:
    """Second step from w(1) = (1.9, 2.05)/1.975 with L = (1, 1), L(0) = (2, 1).

    L~ = (0.5, 1), mean 0.75, r = (2/3, 4/3). G = w(1) (2, 1) = (3.8, 2.05)/1.975
    = (1.924051, 1.037975); mean(G) = 5.85/3.95 = 1.481013; targets = mean(G) r^1.5
    = (0.806151, 2.280164): G_1 > T_1, G_2 < T_2, so again dL_grad/dw = (2, -1).
    w' = w(1) - (0.05, -0.025), sum 2 - 0.025 = 1.975; w(2) = 2 w' / 1.975.
    """
    w1 = np.array([1.9, 2.05]) / 1.975
    out = _gradnorm_step_np(
        w1,
        np.array([2.0, 1.0]),
        np.array([1.0, 1.0]),
        np.array([2.0, 1.0]),
        lr=0.025,
        alpha=1.5,
        min_weight=1e-6,
    )
    np.testing.assert_allclose(out["loss_ratios"], [2 / 3, 4 / 3], rtol=1e-15)
    mean_g = 5.85 / 3.95
    np.testing.assert_allclose(
        out["targets"], [mean_g * (2 / 3) ** 1.5, mean_g * (4 / 3) ** 1.5], rtol=1e-14
    )
    np.testing.assert_allclose(out["weight_grad"], [2.0, -1.0])
    expected = 2 * (w1 + np.array([-0.05, 0.025])) / 1.975
    np.testing.assert_allclose(out["next_weights"], expected, rtol=1e-14)
    np.testing.assert_allclose(expected, [0.9235699407146290, 1.0764300592853710], rtol=1e-14)


def test_gradnorm_applies_the_pre_update_weights() -> None:
    """Paper (Algorithm 1) and LibMTL: step t scales the gradients with w(t); w(t+1) is
    stored for the next step."""
    model = TinyNet(2, seed=3)
    opt = GradNorm(torch.optim.SGD(model.parameters(), lr=1e-2))
    infos = [_step(opt, model, seed=s, scales=[1.0, 10.0]) for s in range(4)]
    np.testing.assert_array_equal(infos[0].weights.numpy(), [1.0, 1.0])
    for prev, cur in zip(infos, infos[1:]):
        assert torch.equal(cur.weights, prev.extras["next_weights"])
    assert torch.equal(opt.weights, infos[-1].extras["next_weights"])
    assert not torch.equal(infos[-1].weights, infos[0].weights)  # it learned something


def test_gradnorm_renormalises_to_k_and_floors() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(1, 7))
        w = rng.uniform(0.01, 3.0, k)
        w = k * w / w.sum()
        norms = np.exp(rng.uniform(-8, 8, k)) * (rng.random(k) > 0.1)  # some exact zeros
        losses = np.exp(rng.uniform(-3, 3, k)) * (rng.random(k) > 0.1)
        initial = np.exp(rng.uniform(-3, 3, k)) * (rng.random(k) > 0.2)
        lr = float(rng.choice([0.0, 0.025, 1.0, 100.0]))
        out = _gradnorm_step_np(w, norms, losses, initial, lr=lr, alpha=1.5, min_weight=1e-6)
        new = out["next_weights"]
        assert np.isfinite(new).all() and (new > 0).all()
        assert new.sum() == pytest.approx(k, rel=1e-12)
    # a step that would make a weight negative stops at the floor before the renormalisation:
    # w' = (max(1 - 0.025 * 100, 1e-6), 1 + 0.025 * 1) = (1e-6, 1.025)
    out = _gradnorm_step_np(
        np.ones(2),
        np.array([100.0, 1.0]),
        np.ones(2),
        np.ones(2),
        lr=0.025,
        alpha=1.5,
        min_weight=1e-6,
    )
    np.testing.assert_allclose(
        out["next_weights"], 2 * np.array([1e-6, 1.025]) / 1.025001, rtol=1e-14
    )


def test_gradnorm_initial_losses_recorded_once_and_option() -> None:
    # L(0) of a task whose first loss is 0 is recorded at its first positive loss
    out = _gradnorm_step_np(
        np.ones(2),
        np.ones(2),
        np.array([3.0, 0.0]),
        np.zeros(2),
        lr=0.025,
        alpha=1.5,
        min_weight=1e-6,
    )
    np.testing.assert_array_equal(out["initial_losses"], [3.0, 0.0])
    np.testing.assert_allclose(out["loss_ratios"], [1.0, 1.0])  # L~ = (1, 1 (unrecorded))
    out = _gradnorm_step_np(
        np.ones(2),
        np.ones(2),
        np.array([1.5, 4.0]),
        out["initial_losses"],
        lr=0.025,
        alpha=1.5,
        min_weight=1e-6,
    )
    np.testing.assert_array_equal(out["initial_losses"], [3.0, 4.0])  # the first is kept
    np.testing.assert_allclose(out["loss_ratios"], [2 / 3, 4 / 3])  # L~ = (0.5, 1)
    # the option replaces the first step's losses
    model = TinyNet(2, seed=1)
    opt = GradNorm(torch.optim.SGD(model.parameters(), lr=1e-2), initial_losses=[10.0, 20.0])
    assert opt.num_tasks == 2
    _step(opt, model, seed=0)
    np.testing.assert_array_equal(opt.balancer_state["initial_losses"], [10.0, 20.0])


def test_gradnorm_matches_pure_function_through_the_api() -> None:
    """Each step's w(t+1) is gradnorm_step(w(t), info.gram, info.losses, L(0)), and the trunk
    gets exactly grad sum_k w_k(t) L_k."""
    model = TinyNet(3, seed=2)
    opt = GradNorm(torch.optim.SGD(model.parameters(), lr=0.0), lr=0.1)
    initial = np.zeros(3)
    for s in range(3):
        x, y = batch(3, seed=10 + s)
        losses, z = model.losses(x, y, [1.0, 5.0, 0.3])
        opt.zero_grad()
        info = opt.backward(losses, representation=z)
        if s == 0:
            initial = info.losses.numpy().copy()
        assert info.gram is not None
        expected = gradnorm_step(info.weights, info.gram, info.losses, initial, lr=0.1)
        np.testing.assert_allclose(info.extras["next_weights"].numpy(), expected.numpy())
        losses2, _ = model.losses(x, y, [1.0, 5.0, 0.3])
        ref = torch.autograd.grad(_weighted(info.weights, losses2), model.shared_parameters())
        torch.testing.assert_close(
            _grads(model.shared_parameters()), flat(ref), rtol=1e-10, atol=1e-12
        )


# ---------------------------------------------------------------------- MultiBalanceS by hand
M2 = np.array([[4.0, -1.0], [-1.0, 1.0]])  # ||h|| = (2, 1), cos = -1/2


def test_multibalance_s_first_two_steps_by_hand() -> None:
    """M = [[4, -1], [-1, 1]], gamma = 0.01, beta = 1, rho = 0.1, u(0) = 0, lam(0) = (1/2, 1/2).

    Step 1: u = 0.01 (2, 1) = (0.02, 0.01); D = diag(0.02/2, 0.01/1) = 0.01 I;
    D M D = 1e-4 M; lam + rho lam_0 = (0.55, 0.55); (D M D)(0.55, 0.55) = 0.55e-4 (3, 0)
    = (1.65e-4, 0); lam - that = (0.499835, 0.5), sum 1 - 1.65e-4, so the projection adds
    tau = 8.25e-5 to both (no clipping): lam(1) = (0.4999175, 0.5000825);
    c = lam D = (0.004999175, 0.005000825).

    Step 2 (same M): u = 0.99 (0.02, 0.01) + 0.01 (2, 1) = (0.0398, 0.0199);
    D = 0.0199 I; D M D = 3.9601e-4 M; lam(1) + 0.05 = (0.5499175, 0.5500825);
    M (that) = (4 * 0.5499175 - 0.5500825, -0.5499175 + 0.5500825) = (1.6495875, 0.000165);
    times 3.9601e-4: (6.532531459e-4, 6.534165e-8); lam(1) - that =
    (0.4992642468541, 0.50008243465835), sum 0.99934668151245, tau = +3.26659243775e-4:
    lam(2) = (0.4995909060978750, 0.5004090939021250); c = 0.0199 lam(2)
    = (0.009941859031347711, 0.009958140968652289).
    """
    u, lam = np.zeros(2), np.full(2, 0.5)
    out = _multibalance_s_step_np(u, lam, M2, gamma=0.01, beta=1.0, rho=0.1)
    np.testing.assert_allclose(out["norms_ma"], [0.02, 0.01], rtol=1e-15)
    np.testing.assert_allclose(out["scales"], [0.01, 0.01], rtol=1e-15)
    np.testing.assert_allclose(out["rescaled_gram"], 1e-4 * M2, rtol=1e-14)
    np.testing.assert_allclose(out["lam"], [0.4999175, 0.5000825], rtol=1e-14)
    np.testing.assert_allclose(out["coefficients"], [0.004999175, 0.005000825], rtol=1e-13)
    out = _multibalance_s_step_np(out["norms_ma"], out["lam"], M2, gamma=0.01, beta=1.0, rho=0.1)
    np.testing.assert_allclose(out["norms_ma"], [0.0398, 0.0199], rtol=1e-14)
    np.testing.assert_allclose(out["scales"], [0.0199, 0.0199], rtol=1e-14)
    np.testing.assert_allclose(out["lam"], [0.4995909060978750, 0.5004090939021250], rtol=1e-12)
    np.testing.assert_allclose(
        out["coefficients"], [0.009941859031347711, 0.009958140968652289], rtol=1e-12
    )


def test_multibalance_s_projection_clips_by_hand() -> None:
    """gamma = 1: u = ||h|| = (2, 1), D = I, D M D = M; lam - M (0.55, 0.55) = (0.5 - 1.65,
    0.5 - 0) = (-1.15, 0.5); its simplex projection is (0, 1), so c = (0, 1)."""
    u, lam, c = multibalance_s_step([0.0, 0.0], [0.5, 0.5], M2, gamma=1.0)
    np.testing.assert_allclose(u.numpy(), [2.0, 1.0])
    np.testing.assert_allclose(lam.numpy(), [0.0, 1.0])
    np.testing.assert_allclose(c.numpy(), [0.0, 1.0])


def test_multibalance_s_lam_stays_on_the_simplex() -> None:
    rng = np.random.default_rng(1)
    for _ in range(100):
        k = int(rng.integers(1, 7))
        g = rng.normal(size=(k, 5)) * np.exp(rng.uniform(-6, 6, (k, 1)))
        g[rng.random(k) < 0.15] = 0.0  # zero task gradients
        u, lam = np.zeros(k), np.full(k, 1.0 / k)
        gamma = float(rng.choice([0.01, 0.5, 1.0]))
        for _ in range(5):
            out = _multibalance_s_step_np(u, lam, g @ g.T, gamma=gamma, beta=1.0, rho=0.1)
            u, lam = out["norms_ma"], out["lam"]
            assert (lam >= 0).all() and lam.sum() == pytest.approx(1.0, abs=1e-12)
            assert np.isfinite(out["coefficients"]).all() and (out["coefficients"] >= 0).all()
            # the rescaled gradients v_k have norm u_k: diag(D M D) = u^2 on nonzero tasks
            nz = np.linalg.norm(g, axis=1) > 0
            np.testing.assert_allclose(np.diag(out["rescaled_gram"])[nz], u[nz] ** 2, rtol=1e-12)


def test_multibalance_s_zero_gradient_keeps_u_and_gets_zero_coefficient() -> None:
    m = np.diag([4.0, 0.0])
    out = _multibalance_s_step_np(
        np.array([1.0, 0.5]), np.full(2, 0.5), m, gamma=0.5, beta=1.0, rho=0.1
    )
    np.testing.assert_array_equal(out["updated"], [True, False])
    np.testing.assert_allclose(out["norms_ma"], [1.5, 0.5])  # u_2 unchanged
    assert out["coefficients"][1] == 0.0 and out["scales"][1] == 0.0
    assert np.isfinite(out["lam"]).all()


# ---------------------------------------------------------------------- both classes
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("cls", CLASSES)
def test_public_api_both_levels_trains_and_is_loss_weighting(
    cls: type[BalancedOptimizer], level: str
) -> None:
    """A tiny trunk + heads model: ``backward(losses, representation=z)`` and
    ``shared_parameters=``; the trunk gets grad sum_k c_k L_k, the heads their own gradient."""
    model = TinyNet(3, seed=5)
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.0), 3)  # lr 0: compare gradients only
    for s in range(3):
        x, y = batch(3, seed=20 + s)
        losses, z = model.losses(x, y, [1.0, 4.0, 0.5])
        opt.zero_grad()
        if level == "representation":
            info = opt.backward(losses, representation=z)
        else:
            info = opt.backward(losses, shared_parameters=model.shared_parameters())
        assert info.level == level and info.weights.shape == (3,)
        assert torch.isfinite(info.weights).all() and info.gram is not None
        losses2, _ = model.losses(x, y, [1.0, 4.0, 0.5])
        ref_trunk = torch.autograd.grad(
            _weighted(info.weights, losses2), model.shared_parameters(), retain_graph=True
        )
        ref_heads = torch.autograd.grad(torch.stack(losses2).sum(), model.head_parameters())
        torch.testing.assert_close(
            _grads(model.shared_parameters()), flat(ref_trunk), rtol=1e-10, atol=1e-13
        )
        torch.testing.assert_close(
            _grads(model.head_parameters()), flat(ref_heads), rtol=1e-10, atol=1e-13
        )
        opt.step()
    assert opt.num_steps == 3


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_round_trip_continues_identically(cls: type[BalancedOptimizer]) -> None:
    model = TinyNet(3, seed=7)
    opt = cls(torch.optim.Adam(model.parameters(), lr=1e-2))
    for s in range(3):
        _step(opt, model, s, scales=[1.0, 8.0, 0.2])
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["balancer"]["state"]) == set(opt.balancer_state)
    a = [_step(opt, model, s, scales=[1.0, 8.0, 0.2]).weights for s in range(3, 6)]

    model_b = TinyNet(3, seed=99)
    model_b.load_state_dict(saved_model)
    opt_b = cls(torch.optim.Adam(model_b.parameters(), lr=1e-2))
    opt_b.load_state_dict(saved)
    b = [_step(opt_b, model_b, s, scales=[1.0, 8.0, 0.2]).weights for s in range(3, 6)]
    for wa, wb in zip(a, b):
        assert torch.equal(wa, wb)
    _assert_state_equal(_state(opt), _state(opt_b))
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", CLASSES)
def test_checkpoint_holds_cpu_float64_tensors_and_loads_weights_only(
    cls: type[BalancedOptimizer], tmp_path: Path
) -> None:
    model = TinyNet(2, seed=1)
    opt = cls(torch.optim.SGD(model.parameters(), lr=1e-2))
    _step(opt, model, 0)
    state = opt.state_dict()["balancer"]["state"]
    assert all(isinstance(v, Tensor) and v.dtype == F64 for v in state.values())
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt_b = cls(torch.optim.SGD(model.parameters(), lr=1e-2))
    opt_b.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    _assert_state_equal(_state(opt_b), _state(opt))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("cls", CLASSES)
def test_one_host_read_per_backward(cls: type[BalancedOptimizer], level: str) -> None:
    """The state is host NumPy: a steady-state backward makes the engine's one transfer only."""
    model = TinyNet(3, seed=2)
    opt = cls(torch.optim.Adam(model.parameters(), lr=1e-3))
    _step(opt, model, 0, level)  # warm-up: lazy state, buffers
    x, y = batch(3, seed=1)
    losses, z = model.losses(x, y)
    opt.zero_grad()
    with SyncCounter() as counter:
        if level == "representation":
            opt.backward(losses, representation=z)
        else:
            opt.backward(losses, shared_parameters=model.shared_parameters())
    assert counter.count <= 1, counter.calls


@pytest.mark.parametrize("cls", CLASSES)
def test_skipped_nan_loss_leaves_state_alone(cls: type[BalancedOptimizer]) -> None:
    model = TinyNet(2, seed=4)
    opt = cls(torch.optim.SGD(model.parameters(), lr=1e-2), on_nonfinite="skip")
    for s in range(2):
        _step(opt, model, s)
    before = _state(opt)
    x, y = batch(2, seed=9)
    losses, z = model.losses(x, y)
    opt.zero_grad()
    info = opt.backward([losses[0], losses[1] * float("nan")], representation=z)
    assert info.skipped and opt.num_skipped == 1
    assert opt.step() is None
    _assert_state_equal(_state(opt), before)
    _step(opt, model, 3)  # the next good step updates the state again
    after = _state(opt)
    assert any(not torch.equal(after[k], before[k]) for k in before)


class _PoisonHead(TinyNet):
    """TinyNet whose first head's gradient is NaN while its loss and h_k are finite:
    ``where(all_false, sqrt(w - w), w)`` is ``w`` forward, ``0 * inf`` backward."""

    poison = False

    def head_outputs(self, z: Tensor) -> list[Tensor]:
        outs = super().head_outputs(z)
        if self.poison:
            head = self.heads[0]
            assert isinstance(head, nn.Sequential)
            last = head[2]
            assert isinstance(last, nn.Linear)
            b = last.bias
            bad = torch.where(torch.zeros_like(b, dtype=torch.bool), (b - b).sqrt(), b)
            outs[0] = outs[0] + bad - b.detach()
        return outs


@pytest.mark.parametrize("cls", CLASSES)
def test_rejected_step_rolls_the_state_back(cls: type[BalancedOptimizer]) -> None:
    """A NaN head gradient is found at step(), after the weights were computed: the engine
    restores the snapshot through _load_balancer_state_dict."""
    model = _PoisonHead(2, seed=6)
    opt = cls(torch.optim.SGD(model.parameters(), lr=1e-2), on_nonfinite="skip")
    for s in range(2):
        _step(opt, model, s)
    before = _state(opt)
    model.poison = True
    _step(opt, model, 5)
    assert opt.num_skipped == 1
    _assert_state_equal(_state(opt), before)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("cls", CLASSES)
def test_zero_task_gradient_never_gives_nan(cls: type[BalancedOptimizer], level: str) -> None:
    model = TinyNet(3, seed=8)
    opt = cls(torch.optim.SGD(model.parameters(), lr=1e-2))
    for s in range(3):
        info = _step(opt, model, s, level, scales=[1.0, 0.0, 2.0])  # L_2 = 0 * mse: h_2 = 0
        assert info.gram[1, 1] == 0.0
        assert torch.isfinite(info.weights).all()
        for v in opt.balancer_state.values():
            assert np.isfinite(v).all()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    if cls is MultiBalanceS:
        assert info.weights[1] == 0.0 and opt.balancer_state["norms_ma"][1] == 0.0
        lam = opt.balancer_state["lam"]
        assert (lam >= 0).all() and float(lam.sum()) == pytest.approx(1.0, abs=1e-12)
    else:
        assert float(opt.balancer_state["weights"].sum()) == pytest.approx(3.0, rel=1e-12)


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("cls", "state", "key"),
    [
        (GradNorm, {"weights": torch.ones(2)}, "initial_losses"),
        (
            GradNorm,
            {"weights": torch.tensor([1.0, 2.0]), "initial_losses": torch.ones(2)},
            "weights",
        ),
        (GradNorm, {"weights": torch.ones(3), "initial_losses": torch.ones(3)}, "weights"),
        (GradNorm, {"weights": torch.ones(2), "initial_losses": -torch.ones(2)}, "initial_losses"),
        (GradNorm, {"weights": torch.ones(2), "initial_losses": torch.ones(2), "x": 1}, "x"),
        (MultiBalanceS, {"lam": torch.full((2,), 0.5)}, "norms_ma"),
        (MultiBalanceS, {"norms_ma": torch.zeros(2), "lam": torch.ones(2)}, "lam"),
        (MultiBalanceS, {"norms_ma": -torch.ones(2), "lam": torch.full((2,), 0.5)}, "norms_ma"),
        (
            MultiBalanceS,
            {"norms_ma": torch.tensor([1.0, float("nan")]), "lam": torch.full((2,), 0.5)},
            "norms_ma",
        ),
    ],
)
def test_bad_state_is_rejected_and_changes_nothing(
    cls: type[BalancedOptimizer], state: dict[str, Any], key: str
) -> None:
    model = TinyNet(2, seed=0)
    opt = cls(torch.optim.SGD(model.parameters(), lr=1e-2))
    _step(opt, model, 0)
    before = _state(opt)
    sd = opt.state_dict()
    sd["balancer"]["state"] = state
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(sd)
    _assert_state_equal(_state(opt), before)


@pytest.mark.parametrize(
    ("cls", "options", "error"),
    [
        (GradNorm, {"lr": -1.0}, ValueError),
        (GradNorm, {"lr": "0.1"}, TypeError),
        (GradNorm, {"alpha": float("nan")}, ValueError),
        (GradNorm, {"min_weight": 0.0}, ValueError),
        (GradNorm, {"min_weight": 2.0}, ValueError),
        (GradNorm, {"initial_losses": [1.0, 0.0]}, ValueError),
        (GradNorm, {"initial_losses": [1.0, 1.0, 1.0]}, ValueError),  # num_tasks = 2
        (MultiBalanceS, {"gamma": 0.0}, ValueError),
        (MultiBalanceS, {"gamma": 1.5}, ValueError),
        (MultiBalanceS, {"beta": -1.0}, ValueError),
        (MultiBalanceS, {"rho": True}, TypeError),
    ],
)
def test_bad_options_raise(
    cls: type[BalancedOptimizer], options: dict[str, Any], error: type[Exception]
) -> None:
    p = nn.Parameter(torch.zeros(1))
    with pytest.raises(error):
        cls(torch.optim.SGD([p], lr=0.1), 2, **options)


def test_repr_names_the_options() -> None:
    p = nn.Parameter(torch.zeros(1))
    assert "alpha=1.5" in repr(GradNorm(torch.optim.SGD([p], lr=0.1), 2))
    assert "gamma=0.01" in repr(MultiBalanceS(torch.optim.SGD([p], lr=0.1), 2))
