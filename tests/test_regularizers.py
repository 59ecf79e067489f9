"""Tests for balancers.regularizers: SCR and LSPR (placeholder design [R], methods.md §5.B).

Covered: the pure functions (noise scale and law, symmetric Bernoulli KL, LSPR's auto ratio),
the exact SCR/LSPR formulas against hand computations with the same noise, the invariances
(epsilon = 0 / zero weight => bit-identical training with EqualWeight and MGDA, through the
shortcut of an inactive regularizer AND through the full formulas), gradients reaching the trunk through the perturbed
branch under BalancedOptimizer, finiteness for extreme epsilon and logits, every registered
balancer x regularizer x model, reproducibility, state_dict round trips, bad options.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from balancers.registry import BALANCERS, make_balancer
from balancers.regularizers import (
    LSPR,
    SCR,
    PerturbationRegularizer,
    consistency_divergence,
    draw_noise,
    lspr_auto_ratio,
    noise_scale,
    perturb,
    symmetric_bernoulli_kl,
    task_loss,
)
from mtl.models import PLE, Features, MMoE, ModelOutput, SharedBottom

B = 16
NUM = 4
LOSSES = ["binary", "regression"]


# ---------------------------------------------------------------------------- helpers
def make_data(seed: int = 0, n: int = B) -> tuple[Tensor, list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, NUM, generator=g)
    y0 = (torch.rand(n, generator=g) < 0.5).float()
    y1 = torch.randn(n, generator=g)
    return x, [y0, y1]


def build(name: str, **kwargs: Any) -> nn.Module:
    if name == "shared_bottom":
        return SharedBottom(
            num_numeric=NUM, num_tasks=2, bottom_dims=(8,), tower_dims=(4,), **kwargs
        )
    if name == "mmoe":
        return MMoE(num_numeric=NUM, num_tasks=2, num_experts=3, expert_dims=(6,), tower_dims=(4,))
    raise ValueError(name)


HeadsFn = Callable[[Any], list[Tensor]]


def forward_with_heads(model: nn.Module, x: Any) -> tuple[list[Tensor], Any, HeadsFn]:
    """(clean outputs, balance point, heads): the models' ``ModelOutput.heads`` hook."""
    out = model(x)
    assert out.heads is not None
    return out.task_outputs, out.representation, out.heads


def plain_losses(outputs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    return [
        F.binary_cross_entropy_with_logits(outputs[0], ys[0]),
        F.mse_loss(outputs[1], ys[1]),
    ]


def train(
    model_name: str,
    balancer: str,
    reg: PerturbationRegularizer | None,
    *,
    steps: int = 4,
    lr: float = 1e-2,
    model_seed: int = 0,
    model: nn.Module | None = None,
    opt: Any = None,
) -> tuple[nn.Module, Any]:
    if model is None:
        torch.manual_seed(model_seed)
        model = build(model_name)
    if opt is None:
        opt = make_balancer(balancer, torch.optim.Adam(model.parameters(), lr=lr), 2)
    x, ys = make_data()
    for _ in range(steps):
        outputs, rep, heads = forward_with_heads(model, x)
        if reg is None:
            losses = plain_losses(outputs, ys)
        else:
            losses = reg(rep, heads, ys, LOSSES, outputs=outputs)
        opt.zero_grad()
        if opt.needs_closure and opt.closure_reruns_model:  # FAMO: the losses after the update

            def closure() -> list[Tensor]:
                o, r, h = forward_with_heads(model, x)
                return plain_losses(o, ys) if reg is None else reg.replay(r, h, ys, LOSSES)

            opt.backward(losses, representation=rep, closure=closure)
        elif opt.needs_closure:  # MARIGOLD's "fd" estimator
            if reg is None:
                closure = lambda r, heads=heads: plain_losses(heads(r), ys)  # noqa: E731
            else:
                closure = reg.closure(heads, ys, LOSSES)
            opt.backward(losses, representation=rep, closure=closure)
        else:
            opt.backward(losses, representation=rep)
        opt.step()
    return model, opt


def params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def identical(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def expected_noise(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


class Linear2:
    """Two linear heads on a (B, d) representation; a tiny deterministic `heads` callable."""

    def __init__(self, d: int = 5, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(2, d, generator=g, dtype=torch.float64)

    def __call__(self, z: Tensor) -> list[Tensor]:
        return [z @ self.w[0], z @ self.w[1]]


def rep_and_targets(seed: int = 1, d: int = 5) -> tuple[Tensor, list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, d, generator=g, dtype=torch.float64)
    ys = [(torch.rand(B, generator=g) < 0.5).double(), torch.randn(B, generator=g).double()]
    return z.requires_grad_(), ys


# ---------------------------------------------------------------------------- pure functions
def test_helper_heads_reproduce_the_model_outputs_exactly() -> None:
    x, _ = make_data()
    xc = Features(x, torch.randint(0, 5, (B, 2)))
    models = [
        build("shared_bottom"),
        build("mmoe"),
        SharedBottom(num_numeric=NUM, cardinalities=(5, 5), num_tasks=2, balance_point="input"),
        PLE(num_numeric=NUM, num_tasks=2, expert_dims=(6,)),
        PLE(num_numeric=NUM, num_tasks=2, num_levels=2, expert_dims=(6,)),
        PLE(num_numeric=NUM, num_tasks=2, num_levels=2, num_task_experts=0, expert_dims=(6,)),
    ]
    for model in models:
        inp = xc if model.cardinalities else x
        out = model(inp)
        outputs, rep, heads = forward_with_heads(model, inp)
        assert rep.shape == out.representation.shape
        assert torch.equal(rep, out.representation)
        for a, b, c in zip(outputs, out.task_outputs, heads(rep)):
            assert torch.equal(a, b) and torch.equal(b, c)


def test_noise_scale_absolute_and_relative() -> None:
    z = torch.randn(B, 3) * torch.tensor([1.0, 10.0, 0.0]) + 5.0
    assert noise_scale(z, 0.1, relative=False) == 0.1
    s = noise_scale(z.requires_grad_(), 0.1, relative=True)
    assert isinstance(s, Tensor) and s.shape == (1, 3) and not s.requires_grad
    expected = 0.1 * torch.sqrt(((z.detach() - z.detach().mean(0)) ** 2).mean(0, keepdim=True))
    torch.testing.assert_close(s, expected)
    assert s[0, 2] == 0  # a constant feature gets no noise
    z3 = torch.randn(B, 2, 4)
    assert noise_scale(z3, 1.0).shape == (1, 2, 4)
    assert torch.equal(noise_scale(torch.randn(1, 4), 1.0), torch.zeros(1, 4))  # batch of one
    with pytest.raises(ValueError, match="batch dimension"):
        noise_scale(torch.tensor(1.0), 1.0)


def test_draw_noise_laws() -> None:
    g = torch.Generator().manual_seed(3)
    xi = draw_noise((4, 5), generator=g)
    assert torch.equal(xi, expected_noise(3, (4, 5)))
    g = torch.Generator().manual_seed(0)
    big = draw_noise((200_000,), noise="uniform", generator=g, dtype=torch.float64)
    assert big.dtype == torch.float64
    assert float(big.min()) >= -math.sqrt(3) and float(big.max()) < math.sqrt(3)
    assert abs(float(big.var()) - 1.0) < 0.01 and abs(float(big.mean())) < 0.01
    gauss = draw_noise((200_000,), generator=g)
    assert abs(float(gauss.var()) - 1.0) < 0.02
    half = draw_noise((3,), generator=g, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="noise"):
        draw_noise((3,), noise="laplace")


def test_perturb_is_identity_plus_detached_noise() -> None:
    z = torch.randn(B, 3, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    zt = perturb(z, 0.5, relative=False, generator=g)
    torch.testing.assert_close(zt, z + 0.5 * expected_noise(5, (B, 3)), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(zt.sum(), z)
    assert torch.equal(grad, torch.ones_like(z))  # dz~/dz = I, the scale is detached
    (grad,) = torch.autograd.grad(perturb(z, 0.5, relative=True, generator=g).sum(), z)
    assert torch.equal(grad, torch.ones_like(z))
    assert torch.equal(perturb(z, 0.0, generator=g), z)
    with pytest.raises(ValueError, match="floating"):
        perturb(torch.ones(3, dtype=torch.long), 0.1)


def test_symmetric_kl_matches_the_definition() -> None:
    a = torch.randn(50, dtype=torch.float64) * 3
    b = torch.randn(50, dtype=torch.float64) * 3
    p, q = torch.sigmoid(a), torch.sigmoid(b)

    def kl(p: Tensor, q: Tensor) -> Tensor:
        return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))

    torch.testing.assert_close(symmetric_bernoulli_kl(a, b), (kl(p, q) + kl(q, p)).mean())
    assert consistency_divergence(a, b, "kl") == symmetric_bernoulli_kl(a, b)
    torch.testing.assert_close(consistency_divergence(a, b, "mse"), F.mse_loss(a, b))
    with pytest.raises(ValueError, match="divergence"):
        consistency_divergence(a, b, "js")


@given(
    st.lists(st.floats(-1e30, 1e30, allow_nan=False), min_size=1, max_size=8),
    st.lists(st.floats(-1e30, 1e30, allow_nan=False), min_size=1, max_size=8),
)
def test_symmetric_kl_properties(xs: list[float], ys: list[float]) -> None:
    n = min(len(xs), len(ys))
    a = torch.tensor(xs[:n], dtype=torch.float32, requires_grad=True)
    b = torch.tensor(ys[:n], dtype=torch.float32)
    d = symmetric_bernoulli_kl(a, b)
    assert torch.isfinite(d) and float(d.detach()) >= 0
    assert float(symmetric_bernoulli_kl(b, a.detach())) == float(d.detach())
    assert float(symmetric_bernoulli_kl(a, a.detach()).detach()) == 0.0
    (g,) = torch.autograd.grad(d, a)
    assert torch.isfinite(g).all()


def test_lspr_auto_ratio_cases() -> None:
    t = torch.tensor
    assert float(lspr_auto_ratio(t(2.0), t(4.0))) == 0.5
    assert float(lspr_auto_ratio(t(2.0), t(0.0), max_ratio=7.0)) == 7.0
    assert float(lspr_auto_ratio(t(0.0), t(0.0))) == 1.0
    assert float(lspr_auto_ratio(t(1.0), t(1e-30), max_ratio=3.0)) == 3.0
    assert float(lspr_auto_ratio(t(-1.0), t(2.0))) == 0.0
    assert float(lspr_auto_ratio(t(0.0), t(2.0))) == 0.0
    assert math.isnan(float(lspr_auto_ratio(t(float("nan")), t(2.0))))
    x = t(3.0, requires_grad=True)
    assert not lspr_auto_ratio(x, x * 2).requires_grad


def test_task_loss() -> None:
    o = torch.randn(B)
    y = (torch.rand(B) < 0.5).long()
    torch.testing.assert_close(
        task_loss("binary", o, y), F.binary_cross_entropy_with_logits(o, y.float())
    )
    torch.testing.assert_close(task_loss("regression", o, y.view(B, 1)), F.mse_loss(o, y.float()))
    with pytest.raises(ValueError, match="does not match"):
        task_loss("binary", o, torch.ones(B + 1))
    with pytest.raises(ValueError, match="kind"):
        task_loss("poisson", o, y)


# ---------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("stop_grad_clean", [False, True])
def test_scr_formula(relative: bool, stop_grad_clean: bool) -> None:
    z, ys = rep_and_targets()
    heads = Linear2()
    reg = SCR(epsilon=0.3, weight=2.5, relative=relative, stop_grad_clean=stop_grad_clean, seed=7)
    losses = reg(z, heads, ys, LOSSES)
    scale = 0.3 * z.detach().std(0, correction=0, keepdim=True) if relative else 0.3
    zt = z + scale * expected_noise(7, tuple(z.shape), torch.float64)
    a, b = heads(z), heads(zt)
    ca = [x.detach() for x in a] if stop_grad_clean else a
    expected = [
        F.binary_cross_entropy_with_logits(a[0], ys[0]) + 2.5 * symmetric_bernoulli_kl(ca[0], b[0]),
        F.mse_loss(a[1], ys[1]) + 2.5 * F.mse_loss(ca[1], b[1]),
    ]
    for got, exp in zip(losses, expected):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=0)
        g_got = torch.autograd.grad(got, z, retain_graph=True)[0]
        g_exp = torch.autograd.grad(exp, z, retain_graph=True)[0]
        torch.testing.assert_close(g_got, g_exp, rtol=1e-10, atol=1e-14)
    assert set(reg.last) == {"clean", "consistency", "total"}
    assert reg.num_draws == 1


def test_scr_stop_grad_clean_detaches_the_clean_branch() -> None:
    z, ys = rep_and_targets()
    outputs = [o.detach().requires_grad_() for o in Linear2()(z)]
    for stop, same in [(True, True), (False, False)]:
        reg = SCR(epsilon=0.5, weight=3.0, stop_grad_clean=stop)
        losses = reg(z, Linear2(), ys, LOSSES, outputs=outputs)
        for k, kind in enumerate(LOSSES):
            (got,) = torch.autograd.grad(losses[k], outputs[k], retain_graph=True)
            (clean,) = torch.autograd.grad(task_loss(kind, outputs[k], ys[k]), outputs[k])
            assert torch.equal(got, clean) == same


def test_scr_divergence_choice_and_kinds() -> None:
    z, ys = rep_and_targets()
    reg = SCR(epsilon=0.2, divergence="mse")
    reg(z, Linear2(), ys, LOSSES)
    reg_kl = SCR(epsilon=0.2, divergence="kl")
    with pytest.raises(ValueError, match="regression"):
        reg_kl(z, Linear2(), ys, LOSSES)
    reg_kl(z, Linear2(), [ys[0], ys[0]], ["binary", "binary"])

    def custom(o: Tensor, y: Tensor) -> Tensor:
        return (o - y).abs().mean()

    auto = SCR(epsilon=0.2)
    with pytest.raises(ValueError, match="kind of task 1"):
        auto(z, Linear2(), ys, ["binary", custom])
    auto(z, Linear2(), ys, ["binary", custom], kinds=[None, "regression"])
    # well-known callables are recognised, functional and module forms
    auto(z, Linear2(), ys, [F.binary_cross_entropy_with_logits, nn.MSELoss()])
    auto(z, Linear2(), ys, [nn.BCEWithLogitsLoss(), F.mse_loss])
    with pytest.raises(ValueError, match="contradicts"):
        auto(z, Linear2(), ys, LOSSES, kinds=["regression", None])
    with pytest.raises(ValueError, match="unknown task kind"):
        auto(z, Linear2(), ys, LOSSES, kinds=["count", None])


@pytest.mark.parametrize("rho", [0.25, 0.5, 1.0])
def test_lspr_fixed_formula(rho: float) -> None:
    z, ys = rep_and_targets()
    heads = Linear2()
    reg = LSPR(epsilon=0.4, rho=rho, relative=False, seed=11)
    losses = reg(z, heads, ys, LOSSES)
    zt = z + 0.4 * expected_noise(11, tuple(z.shape), torch.float64)
    a, b = heads(z), heads(zt)
    for k, kind in enumerate(LOSSES):
        lc, lp = task_loss(kind, a[k], ys[k]), task_loss(kind, b[k], ys[k])
        exp = lp if rho == 1.0 else (1 - rho) * lc + rho * lp
        torch.testing.assert_close(losses[k], exp, rtol=1e-12, atol=0)
        (g,) = torch.autograd.grad(losses[k], z, retain_graph=True)
        gc = torch.autograd.grad(lc, z, retain_graph=True)[0]
        gp = torch.autograd.grad(lp, z, retain_graph=True)[0]
        torch.testing.assert_close(g, (1 - rho) * gc + rho * gp, rtol=1e-10, atol=1e-14)
        assert float(reg.last["perturbed"][k]) == pytest.approx(lp.item(), rel=1e-12)
    assert "ratio" not in reg.last


def test_lspr_auto_formula_keeps_the_loss_scale() -> None:
    z, ys = rep_and_targets()
    heads = Linear2()
    reg = LSPR(epsilon=0.8, rho="auto", relative=True, seed=2)
    losses = reg(z, heads, ys, LOSSES)
    zt = z + 0.8 * z.detach().std(0, correction=0, keepdim=True) * expected_noise(
        2, tuple(z.shape), torch.float64
    )
    a, b = heads(z), heads(zt)
    for k, kind in enumerate(LOSSES):
        lc, lp = task_loss(kind, a[k], ys[k]), task_loss(kind, b[k], ys[k])
        c = (lc / lp).item()
        assert c != pytest.approx(1.0, abs=1e-3)  # the noise is large enough to matter
        assert float(reg.last["ratio"][k]) == pytest.approx(c, rel=1e-12)
        torch.testing.assert_close(losses[k], lc, rtol=1e-12, atol=0)  # value = clean loss
        (g,) = torch.autograd.grad(losses[k], z, retain_graph=True)
        gc = torch.autograd.grad(lc, z, retain_graph=True)[0]
        gp = torch.autograd.grad(lp, z, retain_graph=True)[0]
        torch.testing.assert_close(g, 0.5 * (gc + c * gp), rtol=1e-10, atol=1e-14)
        # the equivalent per-step rho_t form of the docs
        rho_t, s_t = (lc / (lc + lp)).item(), ((lc + lp) / (2 * lp)).item()
        torch.testing.assert_close(g, s_t * ((1 - rho_t) * gc + rho_t * gp), rtol=1e-10, atol=1e-14)


def test_lspr_auto_zero_perturbed_loss_is_clamped() -> None:
    y = torch.randn(B, dtype=torch.float64)
    z = torch.randn(B, 2, dtype=torch.float64, requires_grad=True)
    calls = []

    def heads(r: Tensor) -> list[Tensor]:
        calls.append(r)
        if len(calls) == 1:
            return [r[:, 0] + r[:, 1]]
        return [y + 0 * r[:, 0]]  # the perturbed prediction hits the target: L_pert = 0

    reg = LSPR(epsilon=0.1, rho="auto", max_ratio=4.0)
    (loss,) = reg(z, heads, [y], ["regression"])
    assert float(reg.last["ratio"][0]) == 4.0
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, 0.5 * F.mse_loss(z[:, 0] + z[:, 1], y))


# ---------------------------------------------------------------------------- invariances
INACTIVE: dict[str, tuple[type[PerturbationRegularizer], dict[str, Any]]] = {
    "scr_weight0": (SCR, {"weight": 0.0, "epsilon": 0.1}),
    "scr_eps0": (SCR, {"epsilon": 0.0, "weight": 3.0}),
    "scr_eps0_stopgrad": (SCR, {"epsilon": 0.0, "stop_grad_clean": True}),
    "lspr_rho0": (LSPR, {"rho": 0.0, "epsilon": 0.1}),
    "lspr_eps0": (LSPR, {"epsilon": 0.0, "rho": 0.5}),
    "lspr_eps0_rho1": (LSPR, {"epsilon": 0.0, "rho": 1.0}),
    "lspr_auto_eps0": (LSPR, {"epsilon": 0.0, "rho": "auto"}),
}


def always_active(cls: type[PerturbationRegularizer]) -> type[PerturbationRegularizer]:
    """A subclass that claims to be :attr:`~PerturbationRegularizer.active` whatever its
    options, so every call draws noise and runs the full formula (no shortcut)."""
    return type(f"AlwaysActive{cls.__name__}", (cls,), {"active": property(lambda self: True)})


@pytest.mark.parametrize("path", ["shortcut", "formula"])
@pytest.mark.parametrize("balancer", ["equal", "mgda"])
@pytest.mark.parametrize("name", sorted(INACTIVE))
def test_inactive_regularizer_gives_bit_identical_training(
    name: str, balancer: str, path: str
) -> None:
    """Zero strength or epsilon = 0 trains bit-identically to no regularizer: through the
    shortcut of an inactive regularizer, and through the formulas themselves."""
    baseline, _ = train("shared_bottom", balancer, None, steps=4)
    cls, options = INACTIVE[name]
    reg = (cls if path == "shortcut" else always_active(cls))(**options)
    model, _ = train("shared_bottom", balancer, reg, steps=4)
    assert identical(params(model), params(baseline))
    if path == "shortcut":
        assert not reg.active and reg.num_draws == 0  # no noise, no extra forward
    else:
        assert reg.num_draws == 4


def test_inactive_regularizer_runs_no_extra_forward() -> None:
    z, ys = rep_and_targets()
    calls = []

    def heads(r: Tensor) -> list[Tensor]:
        calls.append(r)
        return Linear2()(r)

    outputs = Linear2()(z)
    for reg in (SCR(weight=0.0), LSPR(epsilon=0.0), LSPR(rho=0.0)):
        losses = reg(z, heads, ys, LOSSES, outputs=outputs)
        assert calls == []
        for got, kind, o, y in zip(losses, LOSSES, outputs, ys):
            assert torch.equal(got, task_loss(kind, o, y))
    reg = SCR()
    reg(z, heads, ys, LOSSES)  # outputs=None: clean forward + perturbed forward
    assert len(calls) == 2 and calls[0] is z and calls[1] is not z


def test_regularizer_leaves_the_global_rng_alone() -> None:
    z, ys = rep_and_targets()
    before = torch.get_rng_state()
    for reg in (SCR(), LSPR(), LSPR(rho="auto", noise="uniform")):
        reg(z, Linear2(), ys, LOSSES)
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------------------- gradient flow
@pytest.mark.parametrize(
    "make_reg",
    [
        lambda: LSPR(epsilon=0.5, rho=1.0),
        lambda: LSPR(epsilon=0.5, rho="auto"),
        lambda: SCR(epsilon=0.5, weight=5.0),
        lambda: SCR(epsilon=0.5, weight=5.0, stop_grad_clean=True, divergence="mse"),
    ],
    ids=["lspr_rho1", "lspr_auto", "scr", "scr_stopgrad_mse"],
)
@pytest.mark.parametrize("model_name", ["shared_bottom", "mmoe"])
def test_balanced_trunk_gradient_includes_the_perturbed_branch(
    make_reg: Callable[[], PerturbationRegularizer], model_name: str
) -> None:
    """Under MGDA the trunk gets exactly grad_theta sum_k c_k L_k, perturbed branch included."""
    torch.manual_seed(0)
    model = build(model_name)
    opt = make_balancer("mgda", torch.optim.SGD(model.parameters(), lr=0.1), 2)
    reg = make_reg()
    x, ys = make_data()
    saved = reg.state_dict()
    outputs, rep, heads = forward_with_heads(model, x)
    losses = reg(rep, heads, ys, LOSSES, outputs=outputs)
    opt.zero_grad()
    info = opt.backward(losses, representation=rep)
    shared = list(model.shared_parameters())
    got = [p.grad.clone() for p in shared]
    assert all(bool(g.abs().sum() > 0) for g in got)

    reg.load_state_dict(saved)  # same noise again
    outputs, rep, heads = forward_with_heads(model, x)
    losses2 = reg(rep, heads, ys, LOSSES, outputs=outputs)
    for a, b in zip(losses, losses2):
        assert torch.equal(a, b)
    c = info.weights.to(torch.float32)
    total = c[0] * losses2[0] + c[1] * losses2[1]
    expected = torch.autograd.grad(total, shared)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_perturbed_branch_alone_reaches_the_trunk() -> None:
    """LSPR with rho=1 uses only f(z~): the balancer's h_k = dL_k/dz is its gradient."""
    torch.manual_seed(0)
    model = build("shared_bottom")
    x, ys = make_data()
    outputs, rep, heads = forward_with_heads(model, x)
    reg = LSPR(epsilon=0.3, rho=1.0, seed=4)
    losses = reg(rep, heads, ys, LOSSES, outputs=outputs)
    zt = rep.detach() + 0.3 * rep.detach().std(0, correction=0, keepdim=True) * expected_noise(
        4, tuple(rep.shape)
    )
    zt.requires_grad_()
    manual = plain_losses(heads(zt), ys)
    for k in range(2):
        (h,) = torch.autograd.grad(losses[k], rep, retain_graph=True)
        (hm,) = torch.autograd.grad(manual[k], zt)
        assert bool(h.abs().sum() > 0)
        torch.testing.assert_close(h, hm, rtol=1e-5, atol=1e-8)


def test_plain_sum_backward_without_balancer() -> None:
    torch.manual_seed(0)
    model = build("shared_bottom")
    x, ys = make_data()
    outputs, rep, heads = forward_with_heads(model, x)
    losses = LSPR(rho="auto")(rep, heads, ys, LOSSES, outputs=outputs)
    sum(losses).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_input_embedding_perturbation() -> None:
    """Perturb the input embeddings e (balance point 'input'): heads = bottom + towers."""
    torch.manual_seed(0)
    model = SharedBottom(
        num_numeric=NUM, cardinalities=(7, 5), num_tasks=2, bottom_dims=(8,), balance_point="input"
    )
    opt = make_balancer("mgda", torch.optim.Adam(model.parameters(), lr=1e-2), 2)
    x, ys = make_data()
    feats = Features(x, torch.randint(0, 5, (B, 2), generator=torch.Generator().manual_seed(0)))
    for reg in (SCR(epsilon=0.1), LSPR(epsilon=0.1, rho="auto")):
        outputs, e, heads = forward_with_heads(model, feats)
        assert e.shape == (B, NUM + 2 * model.embedding_dim)
        losses = reg(e, heads, ys, LOSSES, outputs=outputs)
        opt.zero_grad()
        opt.backward(losses, representation=e)
        emb = model.embedding.embeddings[0].weight.grad
        assert emb is not None and bool(emb.abs().sum() > 0)
        opt.step()

    # a heads callable may also return a ModelOutput (e.g. a forward from the embeddings)
    def forward_from_embeddings(r: Tensor) -> ModelOutput:
        z = model.bottom(r)
        return ModelOutput(task_outputs=[t(z) for t in model.towers], representation=r)

    out = model(feats)
    losses = SCR()(out.representation, forward_from_embeddings, ys, LOSSES)
    assert len(losses) == 2 and all(torch.isfinite(v) for v in losses)


def test_blocks_are_perturbed_block_by_block() -> None:
    torch.manual_seed(0)
    trunk = nn.Linear(NUM, 6)
    towers = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
    opt = make_balancer("mgda", torch.optim.Adam([*trunk.parameters(), *towers.parameters()]), 2)
    x, ys = make_data()
    h = trunk(x)
    blocks = (h[:, :3], h[:, 3:])

    def heads(bs: tuple[Tensor, Tensor]) -> list[Tensor]:
        assert isinstance(bs, tuple) and len(bs) == 2
        cat = torch.cat(bs, dim=1)
        return [t(cat).squeeze(-1) for t in towers]

    reg = LSPR(epsilon=0.1, relative=False, seed=9)
    losses = reg(blocks, heads, ys, LOSSES)
    assert reg.num_draws == 2
    opt.zero_grad()
    info = opt.backward(losses, representation=blocks)
    assert info.weights.shape == (2,) and trunk.weight.grad is not None
    zt = reg.perturb([torch.zeros(2, 3), torch.zeros(2, 1)])
    assert isinstance(zt, list) and len(zt) == 2


# ---------------------------------------------------------------------------- replay
REPLAYED: dict[str, Callable[[], PerturbationRegularizer]] = {
    "scr": lambda: SCR(epsilon=0.5, weight=2.0),
    "scr_stopgrad": lambda: SCR(epsilon=0.5, stop_grad_clean=True),
    "lspr": lambda: LSPR(epsilon=0.5, rho=0.3),
    "lspr_auto": lambda: LSPR(epsilon=0.5, rho="auto"),
}


@pytest.mark.parametrize("name", sorted(REPLAYED))
def test_replay_reuses_the_noise_and_the_auto_ratios(name: str) -> None:
    z, ys = rep_and_targets()
    heads = Linear2()
    reg = REPLAYED[name]()
    losses = reg(z, heads, ys, LOSSES)
    last = dict(reg.last)
    again = reg.replay(z, heads, ys, LOSSES)
    assert all(torch.equal(a, b) for a, b in zip(losses, again))
    assert reg.num_draws == 1 and reg.last.keys() == last.keys()
    closure = reg.closure(heads, ys, LOSSES)
    assert all(torch.equal(x, y) for x, y in zip(closure(z), losses))
    if name == "scr_stopgrad":
        return  # a stop-gradient makes the autograd gradient differ from the loss's derivative
    # finite differences of the replayed losses = the autograd gradient of the returned losses
    # (the noise and LSPR's c_k are constants of the step)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = 1e-6
    with torch.no_grad():
        plus = reg.replay(z + a * v, heads, ys, LOSSES)
        minus = reg.replay(z - a * v, heads, ys, LOSSES)
    for k in range(2):
        (g,) = torch.autograd.grad(losses[k], z, retain_graph=True)
        fd = (plus[k] - minus[k]) / (2 * a)
        assert float(fd) == pytest.approx(float((g * v).sum()), rel=1e-6, abs=1e-9)


def test_replay_errors_and_inactive_replay() -> None:
    z, ys = rep_and_targets()
    with pytest.raises(RuntimeError, match="previous call"):
        SCR().replay(z, Linear2(), ys, LOSSES)
    reg = LSPR()
    reg(z, Linear2(), ys, LOSSES)
    with pytest.raises(ValueError, match="does not match the noise"):
        reg.replay(z[:3], Linear2(), ys, LOSSES, outputs=Linear2()(z))
    off = SCR(weight=0.0)
    losses = off(z, Linear2(), ys, LOSSES)
    assert all(torch.equal(a, b) for a, b in zip(off.replay(z, Linear2(), ys, LOSSES), losses))


def test_marigold_closure_sees_the_same_regularized_loss() -> None:
    _balancer_available("marigold")
    from balancers.registry import balancer_class

    cls = balancer_class("marigold")
    torch.manual_seed(0)
    model = build("shared_bottom")
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.1), 2, fd_scheme="forward_closure")
    x, ys = make_data()
    for reg in (SCR(epsilon=0.3), LSPR(epsilon=0.3, rho="auto")):
        outputs, rep, heads = forward_with_heads(model, x)
        losses = reg(rep, heads, ys, LOSSES, outputs=outputs)
        opt.zero_grad()
        info = opt.backward(losses, representation=rep, closure=reg.closure(heads, ys, LOSSES))
        gap = torch.as_tensor(info.extras["baseline_gap"])
        assert torch.equal(gap, torch.zeros_like(gap))
        opt.step()


# ---------------------------------------------------------------------------- extremes
@pytest.mark.parametrize("epsilon", [1e3, 1e-12])
@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize(
    "make_reg",
    [
        lambda e, r: SCR(epsilon=e, relative=r),
        lambda e, r: SCR(epsilon=e, relative=r, divergence="mse", noise="uniform"),
        lambda e, r: LSPR(epsilon=e, relative=r),
        lambda e, r: LSPR(epsilon=e, relative=r, rho="auto"),
    ],
    ids=["scr", "scr_mse_uniform", "lspr", "lspr_auto"],
)
def test_extreme_epsilon_stays_finite(
    epsilon: float, relative: bool, make_reg: Callable[[float, bool], PerturbationRegularizer]
) -> None:
    torch.manual_seed(0)
    model = build("shared_bottom")
    opt = make_balancer("mgda", torch.optim.Adam(model.parameters(), lr=1e-3), 2)
    reg = make_reg(epsilon, relative)
    x, ys = make_data()
    for _ in range(2):
        outputs, rep, heads = forward_with_heads(model, x)
        losses = reg(rep, heads, ys, LOSSES, outputs=outputs)
        assert all(torch.isfinite(loss) for loss in losses)
        opt.zero_grad()
        opt.backward(losses, representation=rep)  # raises NonFiniteError on a non-finite gradient
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize(
    "make_reg",
    [
        lambda: SCR(epsilon=0.5),
        lambda: SCR(epsilon=0.5, stop_grad_clean=True),
        lambda: LSPR(epsilon=0.5),
        lambda: LSPR(epsilon=0.5, rho="auto"),
    ],
    ids=["scr", "scr_stopgrad", "lspr", "lspr_auto"],
)
def test_extreme_logits_stay_finite(
    scale: float, make_reg: Callable[[], PerturbationRegularizer]
) -> None:
    z = torch.randn(B, 3, requires_grad=True)
    w = torch.randn(3, 2)
    y = (torch.rand(B) < 0.5).float()

    def heads(r: Tensor) -> list[Tensor]:
        logits = scale * (r @ w)
        return [logits[:, 0], logits[:, 1]]

    reg = make_reg()
    losses = reg(z, heads, [y, y], ["binary", "binary"])
    assert all(torch.isfinite(loss) for loss in losses)
    grads = torch.autograd.grad(sum(losses), z)
    assert torch.isfinite(grads[0]).all()


# ---------------------------------------------------------------------------- every balancer
REGULARIZERS: dict[str, Callable[[], PerturbationRegularizer]] = {
    "scr": lambda: SCR(epsilon=0.05),
    "lspr": lambda: LSPR(epsilon=0.05),
    "lspr_auto": lambda: LSPR(epsilon=0.05, rho="auto"),
}


def _balancer_available(name: str) -> None:
    module = BALANCERS[name].split(":")[0]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            pytest.skip(f"balancer module {module} does not exist yet")
        raise


@pytest.mark.parametrize("model_name", ["shared_bottom", "mmoe"])
@pytest.mark.parametrize("reg_name", sorted(REGULARIZERS))
@pytest.mark.parametrize("balancer", sorted(BALANCERS))
def test_every_balancer_runs_with_every_regularizer(
    balancer: str, reg_name: str, model_name: str
) -> None:
    _balancer_available(balancer)
    torch.manual_seed(0)
    model = build(model_name)
    before = [p.detach().clone() for p in model.shared_parameters()]
    reg = REGULARIZERS[reg_name]()
    model, _ = train(model_name, balancer, reg, steps=3, model=model)
    after = list(model.shared_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert reg.num_draws == 3


# ---------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("make_reg", [SCR, LSPR, lambda **kw: LSPR(rho="auto", **kw)])
def test_seeded_runs_are_reproducible(make_reg: Callable[..., PerturbationRegularizer]) -> None:
    run = [
        params(train("mmoe", "mgda", make_reg(epsilon=0.2, seed=s), steps=3)[0]) for s in (1, 1, 2)
    ]
    assert identical(run[0], run[1])
    assert not identical(run[0], run[2])


def test_noise_streams_depend_on_the_seed_and_advance() -> None:
    z = torch.zeros(B, 4)
    a, b, c = SCR(relative=False, seed=0), SCR(relative=False, seed=0), SCR(relative=False, seed=1)
    first = a.perturb(z)
    assert torch.equal(first, b.perturb(z))
    assert not torch.equal(first, c.perturb(z))
    assert not torch.equal(first, a.perturb(z))  # the stream advances
    assert a.num_draws == 2
    assert torch.equal(first, 0.01 * expected_noise(0, (B, 4)))


def test_state_dict_round_trip_of_the_generator() -> None:
    z = torch.zeros(B, 4)
    a = LSPR(relative=False, seed=3)
    for _ in range(3):
        a.perturb(z)
    sd = a.state_dict()
    nxt = a.perturb(z)
    b = LSPR(relative=False, seed=99)
    b.load_state_dict(sd)
    assert b.seed == 3 and b.num_draws == 3
    assert torch.equal(b.perturb(z), nxt)
    # the saved dict is a snapshot, not a view of the live generator
    b.load_state_dict(sd)
    assert torch.equal(b.perturb(z), nxt)
    assert isinstance(sd["generator"], Tensor)
    # checkpoint through torch.save/load
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    c = LSPR(relative=False)
    c.load_state_dict(torch.load(buf))
    assert torch.equal(c.perturb(z), nxt)


def test_training_resumes_exactly() -> None:
    full, _ = train("shared_bottom", "mgda", SCR(epsilon=0.3, seed=5), steps=6)
    reg = SCR(epsilon=0.3, seed=5)
    model, opt = train("shared_bottom", "mgda", reg, steps=3)
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "reg": reg.state_dict()}
    torch.manual_seed(123)
    model2 = build("shared_bottom")
    model2.load_state_dict(ckpt["model"])
    opt2 = make_balancer("mgda", torch.optim.Adam(model2.parameters(), lr=1e-2), 2)
    opt2.load_state_dict(ckpt["opt"])
    reg2 = SCR(epsilon=0.3, seed=0)
    reg2.load_state_dict(ckpt["reg"])
    train("shared_bottom", "mgda", reg2, steps=3, model=model2, opt=opt2)
    assert identical(params(model2), params(full))


def test_load_state_dict_rejects_bad_input() -> None:
    sd = SCR().state_dict()
    with pytest.raises(ValueError, match="saved by SCR"):
        LSPR().load_state_dict(sd)
    with pytest.raises(ValueError, match="lacks"):
        SCR().load_state_dict({"type": "SCR"})
    with pytest.raises(TypeError):
        SCR().load_state_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="generator"):
        SCR().load_state_dict({**sd, "generator_device": "cuda:0"})


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "factory",
    [
        lambda: SCR(epsilon=-1e-3),
        lambda: SCR(epsilon=float("nan")),
        lambda: SCR(epsilon=float("inf")),
        lambda: SCR(epsilon="0.1"),
        lambda: SCR(epsilon=True),
        lambda: SCR(weight=-1.0),
        lambda: SCR(weight=float("inf")),
        lambda: SCR(divergence="js"),
        lambda: SCR(stop_grad_clean=1),
        lambda: SCR(noise="laplace"),
        lambda: SCR(relative="yes"),
        lambda: SCR(seed=-1),
        lambda: SCR(seed=1.5),
        lambda: SCR(device="no-such-device"),
        lambda: LSPR(epsilon=-1.0),
        lambda: LSPR(rho=-0.1),
        lambda: LSPR(rho=1.5),
        lambda: LSPR(rho="fixed"),
        lambda: LSPR(rho=float("nan")),
        lambda: LSPR(max_ratio=0.0),
        lambda: LSPR(max_ratio=-2.0),
        lambda: LSPR(noise="normal"),
        lambda: LSPR(rho=0.5, weight=0.5),
        lambda: LSPR(weight=2.0),
    ],
)
def test_bad_options_raise_value_error(factory: Callable[[], Any]) -> None:
    with pytest.raises(ValueError):
        factory()


def test_options_defaults_setters_and_repr() -> None:
    scr, lspr = SCR(), LSPR()
    assert (scr.epsilon, scr.weight, scr.divergence, scr.stop_grad_clean) == (
        1e-2,
        1.0,
        "auto",
        False,
    )
    assert (scr.relative, scr.noise, scr.seed) == (True, "gaussian", 0)
    assert (lspr.epsilon, lspr.rho, lspr.max_ratio, lspr.weight) == (1e-2, 0.5, 10.0, 0.5)
    assert LSPR(weight="auto").rho == "auto" and LSPR(weight=0.3).rho == 0.3
    assert scr.active and lspr.active and LSPR(rho="auto").active
    scr.weight = 0.0
    assert not scr.active
    lspr.weight = 0.2
    assert lspr.rho == 0.2
    lspr.epsilon = 0
    assert not lspr.active
    with pytest.raises(ValueError):
        scr.epsilon = -1.0
    with pytest.raises(ValueError):
        lspr.rho = 2.0
    with pytest.raises(ValueError):
        scr.weight = -0.5
    assert "SCR(weight=0.0" in repr(scr) and "rho=0.2" in repr(lspr)
    assert isinstance(scr.generator, torch.Generator)


def test_bad_call_inputs() -> None:
    z, ys = rep_and_targets()
    reg = SCR()
    with pytest.raises(ValueError, match="targets"):
        reg(z, Linear2(), ys[:1], LOSSES)
    with pytest.raises(ValueError, match="task outputs"):
        reg(z, lambda r: Linear2()(r)[:1], ys, LOSSES)
    with pytest.raises(ValueError, match="task outputs"):
        reg(z, Linear2(), ys, LOSSES, outputs=Linear2()(z)[:1])
    with pytest.raises(ValueError, match="scalar"):
        reg(z, Linear2(), ys, [lambda o, y: (o - y) ** 2, "regression"])
    with pytest.raises(ValueError, match="unknown loss"):
        reg(z, Linear2(), ys, ["binary", "poisson"])
    with pytest.raises(ValueError, match="empty"):
        reg(z, Linear2(), [], [])
    with pytest.raises(TypeError, match="callable"):
        reg(z, None, ys, LOSSES)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss_fns"):
        reg(z, Linear2(), ys, "binary")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss_fns"):
        reg(z, Linear2(), ys, [1, 2])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="targets"):
        reg(z, Linear2(), torch.zeros(2, B), LOSSES)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tensors"):
        reg(z, lambda r: torch.zeros(2, B), ys, LOSSES)
    with pytest.raises(ValueError, match="floating"):
        reg(torch.ones(B, 5, dtype=torch.long), Linear2(), ys, LOSSES)
    with pytest.raises(TypeError, match="representation"):
        reg("z", Linear2(), ys, LOSSES)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kinds"):
        reg(z, Linear2(), ys, LOSSES, kinds=["binary"])
