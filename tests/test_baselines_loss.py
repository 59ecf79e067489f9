"""Loss-level baselines (UW, DWA, RLW, GLS, FAMO): hand-derived cases, the public API at both
levels, checkpoint round trips, skipped/rejected steps and the one-transfer budget."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from _models import TinyNet, batch, checkpoint_copy
from _sync_count import SyncCounter
from torch import Tensor

from balancers._learned import adam_step
from balancers._rng import pcg64
from balancers.dwa import DWA, dwa_weights
from balancers.famo import FAMO, famo_logit_gradient, famo_update, famo_weights
from balancers.gls import GLS, gls_weights
from balancers.rlw import RLW, rlw_weights
from balancers.uw import UW, uw_coefficients, uw_gradient
from mtl import BalancedOptimizer, NonFiniteError

K = 3
LEVELS = ("representation", "parameters")
F64 = torch.float64

#: every method with options that make each of its features show in a few steps
METHODS: dict[str, tuple[type[BalancedOptimizer], dict[str, Any]]] = {
    "uw": (UW, {"lr": 0.1}),
    "uw_adam": (
        UW,
        {"lr": 0.05, "update": "adam", "variant": ["regression", "classification"] * 2},
    ),
    "dwa": (DWA, {"window": 2}),
    "rlw": (RLW, {"seed": 3}),
    "gls": (GLS, {}),
    "famo": (FAMO, {"lr": 0.1}),
    "famo_sgd": (FAMO, {"lr": 0.5, "update": "sgd"}),
}


def _make(name: str, model: torch.nn.Module, k: int = K, **extra: Any) -> BalancedOptimizer:
    cls, options = METHODS[name]
    options = dict(options)
    if "variant" in options:
        options["variant"] = options["variant"][:k]
    return cls(torch.optim.SGD(model.parameters(), lr=0.05), num_tasks=k, **options, **extra)


def _target(model: TinyNet, z: Tensor, level: str) -> dict[str, Any]:
    if level == "representation":
        return {"representation": z}
    return {"shared_parameters": model.shared_parameters()}


def _backward_kwargs(
    opt: BalancedOptimizer, model: TinyNet, z: Tensor, x: Tensor, y: Tensor, level: str
) -> dict[str, Any]:
    """The keyword arguments of ``opt.backward`` on batch ``(x, y)``: the balance point, and
    FAMO's closure."""
    kwargs = _target(model, z, level)
    if isinstance(opt, FAMO):
        kwargs["closure"] = _rerun(model, x, y)
    return kwargs


def _train_step(
    opt: BalancedOptimizer,
    model: TinyNet,
    seed: int,
    level: str = "representation",
    *,
    poison: Callable[[list[Tensor], Tensor], list[Tensor]] | None = None,
) -> Any:
    """One step on batch ``seed``; ``poison`` may replace the losses (a NaN, a NaN gradient)."""
    x, y = batch(model.num_tasks, seed=seed)
    losses, z = model.losses(x, y)
    if poison is not None:
        losses = poison(losses, z)
    opt.zero_grad()
    kwargs = _backward_kwargs(opt, model, z, x, y, level)
    info = opt.backward(losses, **kwargs)
    opt.step()
    return info


def _rerun(model: TinyNet, x: Tensor, y: Tensor) -> Callable[[], list[Tensor]]:
    """FAMO's closure: the model re-run on the batch ``(x, y)``."""
    return lambda: model.losses(x, y)[0]


def _params(model: torch.nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a: list[Tensor], b: list[Tensor]) -> None:
    for p, q in zip(a, b):
        assert torch.equal(p, q), (p - q).abs().max()


def _settled_state(opt: BalancedOptimizer) -> Any:
    return copy.deepcopy(opt.state_dict()["balancer"]["state"])


def _nan_loss(losses: list[Tensor], z: Tensor) -> list[Tensor]:
    return [losses[0] * float("nan"), *losses[1:]]


def _nan_gradient(losses: list[Tensor], z: Tensor) -> list[Tensor]:
    # a finite loss (sqrt(0) = 0) whose gradient is NaN (d sqrt(u)/du = inf at 0, times 0)
    zero = (z - z.detach()).pow(2).sum()
    return [losses[0] + torch.sqrt(zero), *losses[1:]]


# ---------------------------------------------------------------------- UW
def test_uw_hand_step_from_zero() -> None:
    """s = 0, L = (1, 2, 0.5), lr = 0.1, regression (a = 1/2):
    c = 1/2 e^0 = (1/2, 1/2, 1/2); d/ds = 1/2 (1 - L) = (0, -1/2, 1/4);
    s1 = -0.1 d/ds = (0, 0.05, -0.025); the next step's c = 1/2 e^{-s1}."""
    losses = np.array([1.0, 2.0, 0.5])
    np.testing.assert_allclose(uw_coefficients(np.zeros(3)), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(uw_gradient(np.zeros(3), losses), [0.0, -0.5, 0.25])
    # classification (a = 1): c = e^{-s} = 1, d/ds = 1/2 - L = (-1/2, -3/2, 0)
    np.testing.assert_allclose(uw_gradient(np.zeros(3), losses, 1.0), [-0.5, -1.5, 0.0])

    opt = UW(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), K, lr=0.1)
    c, extras = opt._compute_weights(None, losses, None)
    np.testing.assert_allclose(c, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(extras["next_log_vars"], [0.0, 0.05, -0.025])
    c2, _ = opt._compute_weights(None, losses, None)
    np.testing.assert_allclose(c2, 0.5 * np.exp(-np.array([0.0, 0.05, -0.025])))


def test_uw_adam_first_step_moves_by_lr_times_sign() -> None:
    """Adam's first step from m = v = 0: m^ = g, v^ = g^2, so s1 = -lr g / (|g| + eps)
    = -lr sign(g) (g = 0 stays). With L = (1, 2, 0.5): g = (0, -1/2, 1/4), s1 = (0, lr, -lr)."""
    opt = UW(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), K, lr=0.01, update="adam"
    )
    _, extras = opt._compute_weights(None, np.array([1.0, 2.0, 0.5]), None)
    np.testing.assert_allclose(extras["next_log_vars"], [0.0, 0.01, -0.01], rtol=1e-6)


def test_adam_step_matches_torch_adam() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=F64))
    ref = torch.optim.Adam([p], lr=0.03, weight_decay=0.01)
    x, state = p.detach().numpy().copy(), None
    for _ in range(5):
        g = torch.randn(4, generator=gen, dtype=F64)
        p.grad = g.clone()
        ref.step()
        x, state = adam_step(x, g.numpy(), state, lr=0.03, weight_decay=0.01)
    np.testing.assert_allclose(x, p.detach().numpy(), rtol=1e-12, atol=1e-15)


def test_uw_fixed_point_is_sigma_squared_equals_loss() -> None:
    """d/ds = 1/2 (1 - e^{-s} L) = 0 at e^s = L: constant losses drive s to log L."""
    opt = UW(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 2, lr=1.0)
    losses = np.array([0.2, 3.0])
    for _ in range(200):
        opt._compute_weights(None, losses, None)
    assert opt.log_vars is not None
    np.testing.assert_allclose(opt.log_vars, np.log(losses), rtol=1e-8)


# ---------------------------------------------------------------------- DWA
def test_dwa_weights_from_a_given_history() -> None:
    """Lbar(t-2) = (2, 1, 4), Lbar(t-1) = (1, 1, 2): r = (1/2, 1, 1/2), r / T = (1/4, 1/2, 1/4),
    w = 3 e^{r/T} / sum e^{r/T} = 3 (e^.25, e^.5, e^.25) / (2 e^.25 + e^.5)."""
    e1, e2 = math.exp(0.25), math.exp(0.5)
    expected = 3 * np.array([e1, e2, e1]) / (2 * e1 + e2)
    np.testing.assert_allclose(dwa_weights([1, 1, 2], [2, 1, 4]), expected, rtol=1e-12)
    np.testing.assert_allclose(expected.sum(), 3.0)


def _constant_losses(values: list[float]) -> Callable[[list[Tensor], Tensor], list[Tensor]]:
    """Losses with the given values that still depend on the representation (zero gradient)."""

    def poison(losses: list[Tensor], z: Tensor) -> list[Tensor]:
        return [v + 0.0 * loss for v, loss in zip(values, losses)]

    return poison


def test_dwa_windows_through_the_optimizer() -> None:
    """window = 2, losses per step: (2,1,4), (2,1,4) | (1,1,2), (1,1,2) | ...: the first four
    steps (two windows) get w = 1; step 5 uses Lbar(1) = (2,1,4), Lbar(2) = (1,1,2)."""
    model = TinyNet(K)
    opt = DWA(torch.optim.SGD(model.parameters(), lr=0.0), K, window=2)
    history = [[2.0, 1.0, 4.0]] * 2 + [[1.0, 1.0, 2.0]] * 2 + [[1.0, 1.0, 1.0]]
    infos = [_train_step(opt, model, 0, poison=_constant_losses(v)) for v in history]
    for info in infos[:4]:
        torch.testing.assert_close(info.weights, torch.ones(K, dtype=F64))
        assert info.extras["ratios"] is None
    torch.testing.assert_close(
        infos[4].weights, torch.from_numpy(dwa_weights([1, 1, 2], [2, 1, 4]))
    )
    assert opt.balancer_state["num_windows"] == 2 and opt.balancer_state["count"] == 1


def test_dwa_manual_windows_and_zero_average() -> None:
    model = TinyNet(2)
    opt = DWA(
        torch.optim.SGD(model.parameters(), lr=0.0), 2, window=None, task_names=["ctr", "cvr"]
    )
    for v in ([1.0, 0.0], [1.0, 0.0]):
        _train_step(opt, model, 0, poison=_constant_losses(v))
        opt.end_window()
    opt.end_window()  # an empty window is ignored
    assert opt.balancer_state["num_windows"] == 2
    with pytest.raises(ValueError, match="'cvr'"):
        _train_step(opt, model, 0, poison=_constant_losses([1.0, 1.0]))


# ---------------------------------------------------------------------- RLW
def test_rlw_weights_are_softmax_of_the_generator_normals() -> None:
    model = TinyNet(K)
    opt = RLW(torch.optim.SGD(model.parameters(), lr=0.05), K, seed=7)
    ref = pcg64(7)
    for step in range(3):
        info = _train_step(opt, model, step)
        eps = ref.standard_normal(K)
        e = np.exp(eps)
        np.testing.assert_allclose(info.weights.numpy(), e / e.sum(), rtol=1e-12)
        np.testing.assert_allclose(info.extras["normals"].numpy(), eps)
    np.testing.assert_allclose(rlw_weights([0.0, 0.0]), [0.5, 0.5])


@pytest.mark.parametrize("poison", [_nan_loss, _nan_gradient], ids=["nan_loss", "nan_grad"])
def test_rlw_skipped_or_rejected_step_does_not_advance_the_generator(poison: Any) -> None:
    model = TinyNet(K)
    opt = RLW(torch.optim.SGD(model.parameters(), lr=0.05), K, seed=1, on_nonfinite="skip")
    _train_step(opt, model, 0)
    before = opt.generator.bit_generator.state
    _train_step(opt, model, 1, poison=poison)
    assert opt.num_skipped == 1
    assert opt.generator.bit_generator.state == before


# ---------------------------------------------------------------------- GLS
def test_gls_hand_case() -> None:
    """L = (1, 4, 2): GLS = 8^{1/3} = 2, c = (1/3) 2 / L = (2/3, 1/6, 1/3)."""
    c, value = gls_weights([1.0, 4.0, 2.0])
    assert value == pytest.approx(2.0)
    np.testing.assert_allclose(c, [2 / 3, 1 / 6, 1 / 3], rtol=1e-12)


@pytest.mark.parametrize("level", LEVELS)
def test_gls_gradient_is_the_gradient_of_the_geometric_mean(level: str) -> None:
    model = TinyNet(K, seed=4)
    ref = copy.deepcopy(model)
    opt = GLS(torch.optim.SGD(model.parameters(), lr=0.1), K)
    x, y = batch(K, seed=5)
    losses, z = model.losses(x, y)
    opt.zero_grad()
    opt.backward(losses, **_target(model, z, level))
    ref_losses, _ = ref.losses(x, y)
    torch.autograd.backward(torch.prod(torch.stack(ref_losses)).pow(1.0 / K))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)


def test_gls_non_positive_loss_names_the_task() -> None:
    model = TinyNet(2)
    opt = GLS(torch.optim.SGD(model.parameters(), lr=0.1), 2, task_names=["ctr", "watch"])
    with pytest.raises(ValueError, match=r"task 1 \('watch'\)"):
        _train_step(opt, model, 0, poison=_constant_losses([1.0, 0.0]))
    assert all(p.grad is None for p in model.parameters())  # nothing written
    shifted = GLS(torch.optim.SGD(model.parameters(), lr=0.1), 2, eps=1.0)
    info = _train_step(shifted, model, 0, poison=_constant_losses([1.0, 0.0]))
    # L + eps = (2, 1): GLS = sqrt(2), c = (1/2) sqrt(2) / (2, 1) = (sqrt(2)/4, sqrt(2)/2)
    np.testing.assert_allclose(info.weights.numpy(), [math.sqrt(2) / 4, math.sqrt(2) / 2])


# ---------------------------------------------------------------------- FAMO
def test_famo_hand_weights_and_logit_update() -> None:
    """K = 2, eps = 0, xi = 0: z = (1/2, 1/2).
    Weights at L = (1, 4): z / L = (1/2, 1/8), c = (4/5, 1/5).
    Update from L = (1, 1) to L' = (e^{-1}, 1): delta = log L - log L' = (1, 0), z . delta = 1/2,
    g = z (delta - 1/2) = (1/4, -1/4); sgd with beta = 0.1, gamma = 0.5 at xi = 0:
    xi1 = -0.1 (g + 0.5 * 0) = (-0.025, 0.025) (the task that fell less gains weight);
    adam: xi1 = -beta sign(g) = (-0.1, 0.1)."""
    np.testing.assert_allclose(famo_weights([0.0, 0.0], [1.0, 4.0], eps=0.0), [0.8, 0.2])
    g = famo_logit_gradient([0.0, 0.0], [1.0, 1.0], [math.exp(-1), 1.0], eps=0.0)
    np.testing.assert_allclose(g, [0.25, -0.25], rtol=1e-12)
    xi, _ = famo_update([0.0, 0.0], g, lr=0.1, weight_decay=0.5, update="sgd")
    np.testing.assert_allclose(xi, [-0.025, 0.025], rtol=1e-12)
    xi_adam, _ = famo_update([0.0, 0.0], g, lr=0.1, weight_decay=0.5, update="adam")
    np.testing.assert_allclose(xi_adam, [-0.1, 0.1], rtol=1e-6)
    # decay only: xi = (1, -1), g = 0: xi1 = xi - beta gamma xi = 0.95 xi
    xi2, _ = famo_update([1.0, -1.0], [0.0, 0.0], lr=0.1, weight_decay=0.5, update="sgd")
    np.testing.assert_allclose(xi2, [0.95, -0.95])


def test_famo_update_through_the_optimizer() -> None:
    """The same hand case end to end: the closure returns L' = (e^{-1}, 1) after a step at
    L = (1, 1); the update is applied at the next backward, whose weights use xi1."""
    model = TinyNet(2)
    opt = FAMO(
        torch.optim.SGD(model.parameters(), lr=0.0),
        2,
        lr=0.1,
        weight_decay=0.5,
        update="sgd",
        eps=0.0,
    )
    x, y = batch(2)
    after = torch.tensor([math.exp(-1), 1.0], dtype=F64)
    for step, values in enumerate(([1.0, 1.0], [1.0, 4.0])):
        losses, z = model.losses(x, y)
        losses = _constant_losses(values)(losses, z)
        opt.zero_grad()
        info = opt.backward(losses, representation=z, closure=lambda: after)
        opt.step()
        if step == 0:
            torch.testing.assert_close(info.weights, torch.tensor([0.5, 0.5], dtype=F64))
            assert not info.extras["logits_updated"]
    xi1 = np.array([-0.025, 0.025])
    z1 = np.exp(xi1) / np.exp(xi1).sum()
    r = z1 / np.array([1.0, 4.0])
    assert info.extras["logits_updated"]
    np.testing.assert_allclose(info.extras["logits"].numpy(), xi1, rtol=1e-12)
    np.testing.assert_allclose(info.weights.numpy(), r / r.sum(), rtol=1e-12)


def test_famo_closure_checks() -> None:
    model = TinyNet(K)
    opt = FAMO(torch.optim.SGD(model.parameters(), lr=0.1), K)
    x, y = batch(K)
    losses, z = model.losses(x, y)
    with pytest.raises(ValueError, match="closure="):
        opt.backward(losses, representation=z)
    with pytest.raises(TypeError, match="no argument"):
        opt.backward(losses, representation=z, closure=lambda rep: model.head_losses(rep, y))  # type: ignore[arg-type,misc]
    opt.zero_grad()
    opt.backward(losses, representation=z, closure=lambda: model.losses(x, y)[0][:2])
    with pytest.raises(ValueError, match="returned 2 losses"):
        opt.step()


def test_famo_closure_runs_only_after_a_taken_step() -> None:
    model = TinyNet(K)
    opt = FAMO(torch.optim.SGD(model.parameters(), lr=0.1), K, on_nonfinite="skip")
    x, y = batch(K)
    calls: list[int] = []

    def closure() -> list[Tensor]:
        calls.append(1)
        return model.losses(x, y)[0]

    for poison in (_nan_loss, _nan_gradient, None):
        losses, z = model.losses(x, y)
        opt.zero_grad()
        opt.backward(
            losses if poison is None else poison(losses, z), representation=z, closure=closure
        )
        opt.step()
    assert len(calls) == 1 and opt.num_skipped == 2
    losses, z = model.losses(x, y)
    opt.zero_grad()
    opt.backward(losses, representation=z, closure=closure)
    opt.zero_grad()  # the window is discarded: its closure must not run
    opt.step()
    assert len(calls) == 1


def test_famo_closure_leaves_the_random_stream_alone() -> None:
    model = TinyNet(K)
    opt = FAMO(torch.optim.SGD(model.parameters(), lr=0.1), K)
    x, y = batch(K)
    losses, z = model.losses(x, y)
    opt.backward(
        losses,
        representation=z,
        closure=lambda: [v + torch.rand(()) for v in model.losses(x, y)[0]],
    )
    state = torch.get_rng_state()
    opt.step()
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_famo_non_finite_reevaluated_loss(mode: str) -> None:
    model = TinyNet(K)
    opt = FAMO(torch.optim.SGD(model.parameters(), lr=0.1), K, on_nonfinite=mode)
    x, y = batch(K)
    bad = torch.tensor([1.0, float("nan"), 1.0], dtype=F64)
    losses, z = model.losses(x, y)
    opt.backward(losses, representation=z, closure=lambda: bad)
    opt.step()
    logits = opt.logits
    losses, z = model.losses(x, y)
    opt.zero_grad()
    if mode == "raise":
        with pytest.raises(NonFiniteError, match="task 1"):
            opt.backward(losses, representation=z, closure=lambda: bad)
        losses, z = model.losses(x, y)  # the next call goes on (the update was dropped)
    info = opt.backward(losses, representation=z, closure=lambda: bad)
    assert not info.skipped and not info.extras["logits_updated"]
    np.testing.assert_array_equal(opt.logits, logits)
    assert opt.balancer_state["num_dropped"] == 1


def test_famo_matches_the_official_update_rule_over_steps() -> None:
    """Adam on J^T delta with weight decay (the official code's rule) written with torch ops:
    the logits after each step agree with the optimizer's (settled by state_dict)."""
    model = TinyNet(K, seed=2)
    opt = FAMO(torch.optim.SGD(model.parameters(), lr=0.05), K, lr=0.05, weight_decay=0.01)
    w = torch.zeros(K, dtype=F64, requires_grad=True)
    w_opt = torch.optim.Adam([w], lr=0.05, weight_decay=0.01)
    for step in range(4):
        x, y = batch(K, seed=step)
        losses, z = model.losses(x, y)
        before = torch.stack([v.detach() for v in losses]) + 1e-8
        opt.zero_grad()
        opt.backward(losses, representation=z, closure=_rerun(model, x, y))
        opt.step()
        with torch.no_grad():
            after = torch.stack(model.losses(x, y)[0]) + 1e-8
        d = torch.autograd.grad(torch.softmax(w, 0), w, grad_outputs=before.log() - after.log())[0]
        w.grad = d
        w_opt.step()
        opt.state_dict()  # applies the pending update
        assert opt.logits is not None
        np.testing.assert_allclose(opt.logits, w.detach().numpy(), rtol=1e-10, atol=1e-14)


def test_famo_fused_optimizer_skip_drops_the_pending_update() -> None:
    """A fused Adam skips a non-finite step on the device: the closure's losses come from an
    unchanged model; the engine rolls the window back at the next transfer and FAMO ignores
    them (the logits are those before the bad step)."""
    model = TinyNet(K)
    opt = FAMO(torch.optim.Adam(model.parameters(), lr=0.01, fused=True), K, on_nonfinite="skip")
    _train_step(opt, model, 0)
    logits = _settled_state(opt)["logits"]
    _train_step(opt, model, 1, poison=_nan_gradient)
    info = _train_step(opt, model, 2)
    assert opt.num_skipped == 1
    assert not info.extras["logits_updated"]
    np.testing.assert_allclose(info.extras["logits"].numpy(), logits)


@pytest.mark.parametrize("seed", range(3))
def test_relabelling_the_tasks_relabels_the_weights(seed: int) -> None:
    """Every pure weight function is permutation-equivariant in the tasks."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(4)
    s, a, b = rng.normal(size=4), rng.uniform(0.1, 3, size=4), rng.uniform(0.1, 3, size=4)
    cases: list[Callable[..., np.ndarray]] = [
        lambda s, a, b: uw_coefficients(s, 0.5) * uw_gradient(s, a),
        lambda s, a, b: dwa_weights(a, b),
        lambda s, a, b: rlw_weights(s),
        lambda s, a, b: gls_weights(a)[0],
        lambda s, a, b: famo_weights(s, a) + famo_logit_gradient(s, a, b),
    ]
    for fn in cases:
        np.testing.assert_allclose(fn(s[perm], a[perm], b[perm]), fn(s, a, b)[perm], rtol=1e-12)


# ---------------------------------------------------------------------- all methods
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_public_api_one_weighted_backward(name: str, level: str) -> None:
    """Every gradient (trunk and heads) is that of sum_k c_k L_k with c = info.weights."""
    model = TinyNet(K, seed=1)
    opt = _make(name, model)
    for step in range(3):
        _train_step(opt, model, step, level)
    ref = copy.deepcopy(model)
    x, y = batch(K, seed=9)
    losses, z = model.losses(x, y)
    opt.zero_grad()
    kwargs = _backward_kwargs(opt, model, z, x, y, level)
    info = opt.backward(losses, **kwargs)
    assert info.gram is None and info.weights.shape == (K,) and not info.skipped
    ref_losses, _ = ref.losses(x, y)
    sum(c * v for c, v in zip(info.weights.tolist(), ref_losses)).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["uw", "famo"])
def test_compute_gram_gives_the_same_gradients(name: str) -> None:
    grads = []
    for compute_gram in (False, True):
        model = TinyNet(K, seed=1)
        opt = _make(name, model, compute_gram=compute_gram)
        info = _train_step(opt, model, 0)
        assert (info.gram is not None) == compute_gram
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    model = TinyNet(K, seed=2)
    opt = _make(name, model)
    for step in range(3):  # DWA: one step into its second window
        _train_step(opt, model, step, "parameters")
    saved = checkpoint_copy({"model": model.state_dict(), "opt": opt.state_dict()})
    for step in range(3, 7):
        first = _train_step(opt, model, step, "parameters")
    model2 = TinyNet(K, seed=99)
    model2.load_state_dict(saved["model"])
    opt2 = _make(name, model2)
    opt2.load_state_dict(saved["opt"])
    for step in range(3, 7):
        second = _train_step(opt2, model2, step, "parameters")
    _assert_same(_params(model), _params(model2))
    torch.testing.assert_close(first.weights, second.weights, rtol=0, atol=0)
    assert _settled_state(opt) == _settled_state(opt2)


@pytest.mark.parametrize("poison", [_nan_loss, _nan_gradient], ids=["nan_loss", "nan_grad"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_skipped_step_leaves_the_state_alone(name: str, poison: Any) -> None:
    """A NaN loss (skipped at backward) or a NaN gradient (rejected at step) changes nothing:
    the state is the same and training continues exactly as if the step never happened."""
    runs = []
    for bad in (False, True):
        model = TinyNet(K, seed=3)
        opt = _make(name, model, on_nonfinite="skip")
        for step in range(2):
            _train_step(opt, model, step)
        if bad:
            state = _settled_state(opt)
            params = _params(model)
            _train_step(opt, model, 2, poison=poison)
            assert opt.num_skipped == 1
            assert _settled_state(opt) == state
            _assert_same(_params(model), params)
        infos = [_train_step(opt, model, step) for step in range(3, 6)]
        runs.append((_params(model), [i.weights for i in infos], _settled_state(opt)))
    _assert_same(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert runs[0][2] == runs[1][2]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_host_transfer_per_backward(name: str, level: str) -> None:
    """Steady state: ONE read in backward (FAMO's re-evaluated losses ride along), and step()
    reads no more than the base class's one gradient-flag vector."""
    model = TinyNet(K)
    opt = _make(name, model)
    _train_step(opt, model, 0, level)
    x, y = batch(K, seed=1)
    losses, z = model.losses(x, y)
    opt.zero_grad()
    kwargs = _backward_kwargs(opt, model, z, x, y, level)
    with SyncCounter() as counter:
        info = opt.backward(losses, **kwargs)
    assert counter.count == 1, counter.calls
    if isinstance(opt, FAMO):
        assert info.extras["logits_updated"]
    with SyncCounter() as counter:
        opt.step()
    assert counter.count <= 1, counter.calls


# ---------------------------------------------------------------------- options and checkpoints
@pytest.mark.parametrize(
    ("cls", "kwargs", "error"),
    [
        (UW, {"lr": -1.0}, ValueError),
        (UW, {"update": "rmsprop"}, ValueError),
        (UW, {"variant": "ranking"}, ValueError),
        (UW, {"variant": ["regression"]}, ValueError),
        (DWA, {"window": 0}, ValueError),
        (DWA, {"window": 2.5}, TypeError),
        (DWA, {"temperature": 0.0}, ValueError),
        (RLW, {"seed": True}, TypeError),
        (RLW, {"seed": -1}, ValueError),
        (GLS, {"eps": -1.0}, ValueError),
        (FAMO, {"update": 1}, TypeError),
        (FAMO, {"min_losses": [0.0]}, ValueError),
        (FAMO, {"weight_decay": float("nan")}, ValueError),
        (GLS, {"weight_heads": False}, ValueError),
    ],
)
def test_bad_options_raise(
    cls: type[BalancedOptimizer], kwargs: dict[str, Any], error: type
) -> None:
    with pytest.raises(error):
        cls(torch.optim.SGD(TinyNet(K).parameters(), lr=0.1), K, **kwargs)


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("uw", "log_vars", [0.0, float("nan"), 0.0]),
        ("uw", "log_vars", [0.0, 0.0]),
        ("uw", "bogus", 1),
        ("dwa", "averages", [[1.0, 1.0, 1.0]] * 3),
        ("dwa", "count", -1),
        ("rlw", "generator", {"bit_generator": "MT19937"}),
        ("famo", "logits", "abc"),
        ("famo", "pending", torch.zeros(2)),
        ("famo_sgd", "adam", {"step": 1, "exp_avg": [0.0] * 3, "exp_avg_sq": [0.0] * 3}),
    ],
)
def test_bad_checkpoint_names_the_key_and_changes_nothing(name: str, key: str, value: Any) -> None:
    model = TinyNet(K)
    opt = _make(name, model)
    _train_step(opt, model, 0)
    sd = opt.state_dict()
    before = _settled_state(opt)
    sd["balancer"]["state"] = {**sd["balancer"]["state"], key: value}
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(sd)
    assert _settled_state(opt) == before


def test_peer_parity_with_torchjd() -> None:
    """Same trajectories as TorchJD 0.18's scalarizers (``bench`` extra): FAMO (Adam), UW (its
    log-variances in the same SGD), DWA (one "epoch" = 2 steps), GLS (GeometricMean)."""
    scal = pytest.importorskip("torchjd.scalarization")
    cases: list[tuple[str, dict[str, Any], Any]] = [
        ("famo", {"lr": 0.025, "weight_decay": 1e-3}, scal.FAMO(K).double()),
        ("uw", {"lr": 0.05}, scal.UW(K).double()),
        ("dwa", {"window": 2}, scal.DWA()),
        ("gls", {}, scal.GeometricMean()),
    ]
    for name, options, peer in cases:
        model = TinyNet(K, seed=6)
        ref = copy.deepcopy(model)
        cls = METHODS[name][0]
        opt = cls(torch.optim.SGD(model.parameters(), lr=0.05), K, **options)
        extra = list(peer.parameters()) if name == "uw" else []
        ref_opt = torch.optim.SGD([*ref.parameters(), *extra], lr=0.05)
        for step in range(6):
            _train_step(opt, model, step)
            x, y = batch(K, seed=step)
            ref_opt.zero_grad()
            peer(torch.stack(ref.losses(x, y)[0])).backward()
            ref_opt.step()
            if name == "famo":
                with torch.no_grad():
                    peer.update(torch.stack(ref.losses(x, y)[0]))
            if name == "dwa" and step % 2 == 1:
                peer.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
