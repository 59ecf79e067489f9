"""MGDA / MGDA-UB: the hand-derived cases of reference/methods.md Sec. 6.10 at every level.

* pure functions: ``min_norm_weights`` and ``mgda_weights``;
* the wrapper at parameter level: linear losses ``L_k = w_k (g_k . theta) + l_k`` with a shared
  parameter ``theta`` and head parameters ``w`` (initialised to one), so ``dL_k/dtheta = g_k``;
* the wrapper at representation level: ``z = x + b`` with batch size one and a shared bias ``b``,
  so ``dZ/db = I`` and MGDA-UB coincides with MGDA.

In both wrapper set-ups the shared parameter must receive ``sum_k c_k g_k`` and head ``w_k`` its own
unweighted gradient ``g_k . theta``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from balancers import MGDA, EqualWeight, mgda_weights, min_norm_weights
from mtl import BalancedOptimizer

sys.path.insert(0, str(Path(__file__).parent))
from _asserts import assert_min_norm_kkt, exact_min_norm  # noqa: E402

F64 = torch.float64
ATOL = 1e-9

# (gradients, exact alpha, d = sum alpha_k g_k)
SANITY = [
    ([[1, 0], [0, 1]], [0.5, 0.5], [0.5, 0.5]),
    ([[1, 0], [-1, 1]], [0.6, 0.4], [0.2, 0.4]),
    ([[1, 0], [2, 0]], [1.0, 0.0], [1.0, 0.0]),
    ([[1, 0], [-1, 0]], [0.5, 0.5], [0.0, 0.0]),
    ([[1, 0], [0, 1], [1, 1]], [0.5, 0.5, 0.0], [0.5, 0.5]),
    ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [1 / 3] * 3, [1 / 3] * 3),
]
IDS = ["orthogonal", "obtuse", "parallel", "opposite", "face", "e123"]


def close(
    actual: torch.Tensor, expected: Sequence[float] | torch.Tensor, atol: float = ATOL
) -> None:
    exp = torch.as_tensor(expected, dtype=F64)
    act = actual.detach().to(F64).reshape(exp.shape)
    assert bool(torch.allclose(act, exp, atol=atol, rtol=0)), f"{act.tolist()} != {exp.tolist()}"


# ---------------------------------------------------------------------- linear toy models
class Linear(nn.Module):
    """Task k: ``L_k = w_k * (g_k . theta) + l_k``; ``theta`` shared, ``w`` heads (all one)."""

    def __init__(self, g: torch.Tensor, theta0: torch.Tensor, offsets: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("g", g)
        self.register_buffer("offsets", offsets)
        self.theta = nn.Parameter(theta0.clone())
        self.w = nn.Parameter(torch.ones(g.shape[0], dtype=F64))

    def losses(self) -> list[torch.Tensor]:
        return [self.w[k] * (self.g[k] @ self.theta) + self.offsets[k] for k in range(len(self.g))]


class Bias(nn.Module):
    """``z = x + b`` (batch one), task k: ``L_k = w_k * (g_k . z_0) + l_k``; ``b`` shared."""

    def __init__(self, g: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("g", g)
        self.register_buffer("x", x.reshape(1, -1))
        self.register_buffer("offsets", offsets)
        self.b = nn.Parameter(torch.zeros(g.shape[1], dtype=F64))
        self.w = nn.Parameter(torch.ones(g.shape[0], dtype=F64))

    def forward(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.x + self.b
        losses = [self.w[k] * (self.g[k] @ z[0]) + self.offsets[k] for k in range(len(self.g))]
        return z, losses


def run_parameter_level(
    g: torch.Tensor, offsets: torch.Tensor | None = None, **options: object
) -> tuple[Linear, object]:
    k, d = g.shape
    theta0 = torch.linspace(-1.0, 2.0, d, dtype=F64)
    offsets = torch.ones(k, dtype=F64) if offsets is None else offsets
    model = Linear(g, theta0, offsets - g @ theta0)  # loss values = offsets at theta0
    opt = MGDA(torch.optim.SGD(model.parameters(), lr=0.1), num_tasks=k, **options)
    opt.zero_grad()
    info = opt.backward(model.losses(), shared_parameters=[model.theta])
    return model, info


def run_representation_level(
    g: torch.Tensor, offsets: torch.Tensor | None = None, **options: object
) -> tuple[Bias, torch.Tensor, object]:
    k, d = g.shape
    x = torch.linspace(0.5, -1.5, d, dtype=F64)
    offsets = torch.ones(k, dtype=F64) if offsets is None else offsets
    model = Bias(g, x, offsets - g @ x)  # loss values = offsets at b = 0
    opt = MGDA(torch.optim.SGD(model.parameters(), lr=0.1), num_tasks=k, **options)
    opt.zero_grad()
    z, losses = model()
    info = opt.backward(losses, representation=z)
    return model, z.detach(), info


# ---------------------------------------------------------------------- pure functions
@pytest.mark.parametrize(("rows", "alpha", "d"), SANITY, ids=IDS)
def test_sanity_pure_functions(rows: list[list[float]], alpha: list[float], d: list[float]) -> None:
    g = torch.tensor(rows, dtype=F64)
    m = g @ g.T
    close(min_norm_weights(m), alpha)
    c, a = mgda_weights(m)
    close(a, alpha)
    close(c, alpha)  # normalization "none": coefficients are the simplex weights
    close(a @ g, d)
    # KKT: g_i . d >= |d|^2, equality on the support (relative, exact arithmetic)
    assert_min_norm_kkt(m.numpy(), a.numpy())


def test_sanity_obtuse_matches_eq4() -> None:
    # Eq. 4: alpha_1 = ((g2 - g1) . g2) / |g1 - g2|^2 clipped to [0, 1]
    g1, g2 = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([-1.0, 1.0], dtype=F64)
    a1 = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))
    assert a1 == pytest.approx(0.6)
    close(min_norm_weights(torch.stack([g1, g2]) @ torch.stack([g1, g2]).T), [a1, 1 - a1])


def test_normalization_semantics_pure() -> None:
    """g1 = (2,0), g2 = (0,1), l2: alpha = (.5,.5); update (1,.5) by default, (.5,.5) normalised."""
    g = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)
    m = g @ g.T
    c, a = mgda_weights(m, normalization="l2")
    close(a, [0.5, 0.5])
    close(c, [0.5, 0.5])
    close(c @ g, [1.0, 0.5])
    c, a = mgda_weights(m, normalization="l2", normalized_update=True)
    close(a, [0.5, 0.5])
    close(c, [0.25, 0.5])
    close(c @ g, [0.5, 0.5])
    # without normalisation the smaller gradient dominates
    _, a = mgda_weights(m)
    close(a, [0.2, 0.8])


# loss: s = L = (1, 2): scaled gradients (2,0), (0,.5): alpha = (1/17, 16/17)
# loss+: s = L |g| = (2, 2): scaled gradients (1,0), (0,.5): alpha = (.2, .8)
LOSS_CASES = [
    ("none", [0.2, 0.8], [0.2, 0.8]),
    ("l2", [0.5, 0.5], [0.25, 0.5]),
    ("loss", [1 / 17, 16 / 17], [1 / 17, 8 / 17]),
    ("loss+", [0.2, 0.8], [0.1, 0.4]),
]


@pytest.mark.parametrize(("normalization", "alpha", "c_normalized"), LOSS_CASES)
def test_loss_normalizations_pure(
    normalization: str, alpha: list[float], c_normalized: list[float]
) -> None:
    g = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)
    losses = torch.tensor([1.0, 2.0], dtype=F64)
    c, a = mgda_weights(g @ g.T, losses, normalization=normalization)  # type: ignore[arg-type]
    close(a, alpha)
    close(c, alpha)
    c, a = mgda_weights(
        g @ g.T,
        losses,
        normalization=normalization,
        normalized_update=True,  # type: ignore[arg-type]
    )
    close(a, alpha)
    close(c, c_normalized)


def test_normalization_with_zero_gradient_or_loss_stays_finite() -> None:
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]], dtype=F64)
    losses = torch.tensor([1.0, 0.0, 2.0], dtype=F64)
    for normalization in ("l2", "loss", "loss+"):
        for nu in (False, True):
            c, a = mgda_weights(g @ g.T, losses, normalization=normalization, normalized_update=nu)
            assert bool(torch.isfinite(c).all()) and bool(torch.isfinite(a).all())
            assert abs(float(a.sum()) - 1.0) < 1e-12


def test_mgda_weights_errors() -> None:
    m = torch.eye(2, dtype=F64)
    with pytest.raises(ValueError, match="normalization must be one of"):
        mgda_weights(m, normalization="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs the losses"):
        mgda_weights(m, normalization="loss")
    with pytest.raises(ValueError, match="non-negative losses"):
        mgda_weights(m, torch.tensor([1.0, -1.0]), normalization="loss+")


# ---------------------------------------------------------------------- through the wrapper
@pytest.mark.parametrize(("rows", "alpha", "d"), SANITY, ids=IDS)
def test_sanity_parameter_level(
    rows: list[list[float]], alpha: list[float], d: list[float]
) -> None:
    g = torch.tensor(rows, dtype=F64)
    model, info = run_parameter_level(g)
    assert info.level == "parameters"
    close(info.weights, alpha)
    close(info.extras["alpha"], alpha)
    close(info.gram, g @ g.T, atol=1e-12)
    close(info.losses, torch.ones(len(rows)))
    close(model.theta.grad, d)  # the shared parameter gets sum_k alpha_k g_k
    close(model.w.grad, g @ model.theta.detach(), atol=1e-12)  # heads: own, unweighted


@pytest.mark.parametrize("level", ["parameters", "representation"])
def test_wide_norm_ratios_through_the_wrapper(level: str) -> None:
    """Issue 16 row 5 at both levels: task gradient norms 1e-6, 1.6e6 and 0.5; the weights are
    the exact optimum (the old solver gave (0.503, 1.5e-7, 0.497), conflicting with task 0)."""
    g = torch.tensor([[5e-7, 1e-6, -1e-7], [-1.3e6, 8e5, 4e5], [0.3, -0.4, -0.1]], dtype=F64)
    if level == "parameters":
        model, info = run_parameter_level(g)
        d = model.theta.grad
    else:
        model, _, info = run_representation_level(g)
        d = model.b.grad
    m = info.gram.numpy()
    found = exact_min_norm(m)
    assert found is not None
    exact = np.array([float(a) for a in found[1]])
    np.testing.assert_allclose(info.weights.numpy(), exact, rtol=1e-9, atol=0)
    assert_min_norm_kkt(m, info.extras["alpha"].numpy())
    assert float(g[0] @ d) > 0  # the update decreases task 0 too


@pytest.mark.parametrize(("rows", "alpha", "d"), SANITY, ids=IDS)
def test_sanity_representation_level(
    rows: list[list[float]], alpha: list[float], d: list[float]
) -> None:
    """MGDA-UB == MGDA when dZ/dtheta = I (z = x + b, batch size one)."""
    g = torch.tensor(rows, dtype=F64)
    model, z, info = run_representation_level(g)
    assert info.level == "representation"
    close(info.weights, alpha)
    close(info.gram, g @ g.T, atol=1e-12)
    close(model.b.grad, d)
    close(model.w.grad, g @ z[0], atol=1e-12)
    # identical weights at parameter level
    _, info_p = run_parameter_level(g)
    close(info.weights, info_p.weights, atol=1e-12)


@pytest.mark.parametrize("level", ["parameters", "representation"])
@pytest.mark.parametrize(
    ("normalized_update", "weights", "update"),
    [(False, [0.5, 0.5], [1.0, 0.5]), (True, [0.25, 0.5], [0.5, 0.5])],
)
def test_normalization_semantics_wrapper(
    level: str, normalized_update: bool, weights: list[float], update: list[float]
) -> None:
    g = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)
    kw = {"normalization": "l2", "normalized_update": normalized_update}
    if level == "parameters":
        model, info = run_parameter_level(g, **kw)
        grad = model.theta.grad
    else:
        model, _, info = run_representation_level(g, **kw)
        grad = model.b.grad
    close(info.extras["alpha"], [0.5, 0.5])
    close(info.weights, weights)
    close(grad, update)


@pytest.mark.parametrize("level", ["parameters", "representation"])
@pytest.mark.parametrize(("normalization", "alpha", "c_normalized"), LOSS_CASES)
@pytest.mark.parametrize("normalized_update", [False, True])
def test_loss_normalizations_wrapper(
    level: str,
    normalization: str,
    alpha: list[float],
    c_normalized: list[float],
    normalized_update: bool,
) -> None:
    g = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)
    offsets = torch.tensor([1.0, 2.0], dtype=F64)  # the loss values
    kw = {"normalization": normalization, "normalized_update": normalized_update}
    if level == "parameters":
        model, info = run_parameter_level(g, offsets, **kw)
        grad = model.theta.grad
    else:
        model, _, info = run_representation_level(g, offsets, **kw)
        grad = model.b.grad
    close(info.losses, offsets, atol=1e-12)
    c = c_normalized if normalized_update else alpha
    close(info.extras["alpha"], alpha)
    close(info.weights, c)
    close(grad, torch.tensor(c, dtype=F64) @ g)


def test_mgda_ub_batch_representation_uses_full_batch_gram() -> None:
    """With a batch, the Gram matrix is over the full B x d gradient (not batch-summed)."""
    torch.manual_seed(0)
    trunk = nn.Linear(3, 4).double()
    heads = nn.ModuleList(nn.Linear(4, 1).double() for _ in range(2))
    opt = MGDA(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1))
    x = torch.randn(5, 3, dtype=F64)
    z = trunk(x)
    losses = [h(z).pow(2).mean() for h in heads]
    hs = [torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses]
    info = opt.backward(losses, representation=z)
    gram = torch.stack(hs) @ torch.stack(hs).T
    close(info.gram, gram, atol=1e-12)
    close(info.weights, min_norm_weights(gram), atol=1e-12)
    assert opt.num_tasks == 2  # inferred


def test_mgda_training_decreases_every_task() -> None:
    """Two conflicting quadratics: MGDA steps decrease both losses (Desideri's lemma)."""
    theta = nn.Parameter(torch.tensor([3.0, -2.0], dtype=F64))
    a = torch.tensor([1.0, 1.0], dtype=F64)
    b = torch.tensor([-1.0, 2.0], dtype=F64)
    opt = MGDA(torch.optim.SGD([theta], lr=0.05), num_tasks=2)
    prev = None
    for _ in range(30):
        losses = [(theta - a).pow(2).sum(), (theta - b).pow(2).sum()]
        now = torch.stack([loss.detach() for loss in losses])
        if prev is not None:
            assert bool((now <= prev + 1e-12).all())
        prev = now
        opt.zero_grad()
        info = opt.backward(losses, shared_parameters=[theta])
        opt.step()
    assert info.num_tasks == 2


def test_mgda_options_and_repr() -> None:
    p = nn.Parameter(torch.zeros(2))
    opt = MGDA(torch.optim.SGD([p], lr=0.1), num_tasks=2, normalization="loss+", max_iter=7)
    assert isinstance(opt, BalancedOptimizer)
    assert opt.normalization == "loss+"
    assert opt.max_iter == 7
    text = repr(opt)
    assert "MGDA" in text and "loss+" in text and "SGD" in text
    with pytest.raises(ValueError, match="normalization must be one of"):
        MGDA(torch.optim.SGD([p], lr=0.1), normalization="L2")  # type: ignore[arg-type]


def test_equal_weight_on_the_linear_toy() -> None:
    """Sanity of the toy itself: EqualWeight gives sum_k g_k at both levels."""
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    model = Linear(g, torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))
    opt = EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward(model.losses(), shared_parameters=[model.theta])
    close(model.theta.grad, [0.0, 1.0])
    bias = Bias(g, torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))
    opt = EqualWeight(torch.optim.SGD(bias.parameters(), lr=0.1))
    z, losses = bias()
    opt.backward(losses, representation=z)
    close(bias.b.grad, [0.0, 1.0])


def test_numpy_gradients_agree_with_torch() -> None:
    """The pure function on a random Gram matrix equals the wrapper's weights."""
    rng = np.random.default_rng(3)
    g = torch.from_numpy(rng.standard_normal((4, 6)))
    _, info = run_parameter_level(g)
    close(info.weights, mgda_weights(g @ g.T)[0], atol=1e-12)


# ------------------------------------------------------------------ collapse diagnostic (issue 18)
def _scale_run(gap: float, steps: int, **options: Any) -> tuple[MGDA, Any]:
    """Two tasks on one representation, the second loss ``gap`` times larger."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 3, dtype=torch.float64)
    heads = [torch.nn.Linear(3, 1, dtype=torch.float64) for _ in range(2)]
    params = [*trunk.parameters(), *(p for h in heads for p in h.parameters())]
    opt = MGDA(torch.optim.SGD(params, lr=0.0), task_names=["ctr", "watch_time"], **options)
    x = torch.randn(16, 4, dtype=torch.float64)
    info = None
    for _ in range(steps):
        opt.zero_grad()
        z = trunk(x)
        losses = [heads[0](z).square().mean(), gap * heads[1](z).square().mean()]
        info = opt.backward(losses, representation=z)
        opt.step()
    return opt, info


def test_collapsed_tasks_hand_case() -> None:
    from balancers.mgda import collapsed_tasks

    gram = np.diag([1.0, 1e6, 1e-4])
    c = np.array([1.0, 0.0, 0.0])  # |d| = 1
    # task 1: weight 0, gradient 1000 |d|, non-zero loss -> collapsed; task 2: small gradient
    flags = collapsed_tasks(c, gram, np.array([0.3, 80.0, 0.1]))
    assert flags.tolist() == [False, True, False]
    # a zero loss is never flagged; a gradient under 10 |d| is never flagged
    assert not collapsed_tasks(c, gram, np.array([0.3, 0.0, 0.1])).any()
    assert not collapsed_tasks(c, np.diag([1.0, 99.0, 1.0]), np.ones(3)).any()
    # a Pareto-stationary point (d = 0) is not a collapse
    assert not collapsed_tasks(
        np.array([0.5, 0.5]), np.ones((2, 2)) * [[1, -1], [-1, 1]], np.ones(2)
    ).any()


def test_collapse_on_mismatched_scales_warns_once_naming_the_task() -> None:
    from balancers.mgda import MGDACollapseWarning

    with pytest.warns(MGDACollapseWarning, match="watch_time.*normalization=") as rec:
        opt, info = _scale_run(1000.0, steps=25, collapse_steps=20)
    assert len([r for r in rec if r.category is MGDACollapseWarning]) == 1
    assert np.asarray(info.extras["collapsed"]).tolist() == [False, True]
    assert float(np.asarray(info.weights)[1]) < 1e-3


def test_no_collapse_warning_with_l2_normalization_or_balanced_scales() -> None:
    import warnings

    from balancers.mgda import MGDACollapseWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", MGDACollapseWarning)
        _, info = _scale_run(1000.0, steps=25, normalization="l2")
        assert not np.asarray(info.extras["collapsed"]).any()
        _scale_run(1.0, steps=25)
        _scale_run(1000.0, steps=25, collapse_steps=None)


def test_collapse_steps_is_validated() -> None:
    with pytest.raises(ValueError, match="collapse_steps"):
        MGDA(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), collapse_steps=0)
