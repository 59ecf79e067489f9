"""Tests for GradOPS: the Gram-space projections, trade-off weights, fallback and the wrapper."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from balancers.gradops import (
    GradOPS,
    gradops_coefficients,
    gradops_projections,
    gradops_tradeoff_weights,
)

sys.path.insert(0, str(Path(__file__).parent))
from _models import TinyNet, batch, flat  # noqa: E402

F64 = torch.float64
PROPS = settings(deadline=None)  # example count: the profile in conftest.py


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def gram(g: torch.Tensor) -> torch.Tensor:
    return g @ g.T


def explicit_projections(g: np.ndarray) -> np.ndarray:
    """g_i' = g_i - P_{span of the others} g_i, by least squares on the materialised vectors."""
    out = np.zeros_like(g)
    for i in range(g.shape[0]):
        a = np.delete(g, i, axis=0).T
        if a.size == 0:
            out[i] = g[i]
            continue
        coef, *_ = np.linalg.lstsq(a, g[i], rcond=None)
        out[i] = g[i] - a @ coef
    return out


def explicit_update(g: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    """G' = sum_i w_i g_i' with w_i = K R_i^alpha / sum_j R_j^alpha (no vanished projection)."""
    proj = explicit_projections(g)
    r = np.linalg.norm(proj, axis=1) / np.linalg.norm(g, axis=1)
    w = len(r) * r**alpha / np.sum(r**alpha)
    return w @ proj


def random_gradients(k: int, d: int, seed: int, log_scale: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, d, generator=gen, dtype=F64)
    scales = torch.exp(log_scale * torch.randn(k, 1, generator=gen, dtype=F64))
    return g * scales


def well_conditioned(g: torch.Tensor, limit: float = 1e6) -> bool:
    s = torch.linalg.svdvals(g / g.norm(dim=1, keepdim=True))
    return bool(s[-1] > 0) and float(s[0] / s[-1]) < limit


# ---------------------------------------------------------------------- sanity cases (4.D)
SANITY = [
    # conflicting pair
    ([[1, 0], [-1, 1]], [[0.5, 0.5], [0, 1]], [0.5, 1.5], [0.5, 1.0]),
    # non-conflicting pair: g_1' . g_2' < 0, G' still non-conflicting
    ([[1, 0], [1, 1]], [[0.5, -0.5], [0, 1]], [0.5, 0.5], [0.5, 1.0]),
    # three tasks in R^3
    (
        [[1, 0, 0], [0, 1, 0], [1, 1, 1]],
        [[0.5, 0, -0.5], [0, 0.5, -0.5], [0, 0, 1]],
        [0.5, 0.5, 0],
        [0.5, 0.5, 1.0],
    ),
]


@pytest.mark.parametrize("rows, projected, update, progress", SANITY)
@pytest.mark.parametrize("solver", ["auto", "closed_form", "lstsq"])
def test_sanity_cases(rows, projected, update, progress, solver):
    g = t(rows)
    p, info = gradops_projections(gram(g), solver=solver)
    assert info["solver"] == ("closed_form" if solver == "auto" else solver)
    torch.testing.assert_close(p @ g, t(projected), atol=1e-12, rtol=0)
    c, extras = gradops_coefficients(gram(g), solver=solver)
    assert not extras["fallback"]
    torch.testing.assert_close(c @ g, torch.tensor(update, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(g @ (c @ g), torch.tensor(progress, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("rows", [case[0] for case in SANITY])
def test_closed_form_equals_least_squares(rows):
    m = gram(t(rows))
    p_cf, _ = gradops_projections(m, solver="closed_form")
    p_ls, _ = gradops_projections(m, solver="lstsq")
    torch.testing.assert_close(p_cf, p_ls, atol=1e-9, rtol=0)


def test_non_conflicting_pair_projections_conflict_with_each_other():
    # methods.md 4.B: g_i' . g_j' >= 0 is NOT guaranteed; only g_j . G' >= 0 is.
    g = t([[1, 0], [1, 1]])
    p, _ = gradops_projections(gram(g))
    proj = p @ g
    assert float(proj[0] @ proj[1]) == pytest.approx(-0.5, abs=1e-12)


def test_dependent_set_all_projections_vanish_and_fallback_fires():
    g = t([[1, 0], [0, 1], [1, 1]])
    m = gram(g)
    with pytest.raises(ValueError, match="singular"):
        gradops_projections(m, solver="closed_form")
    p, info = gradops_projections(m)
    assert info["solver"] == "lstsq" and info["rank"] == 2 and math.isinf(info["cond"])
    assert torch.equal(p, torch.zeros(3, 3, dtype=F64))
    assert info["vanished"].all()
    expected = {"sum": [1.0, 1.0, 1.0], "mgda": [1.5, 1.5, 0.0], "zero": [0.0, 0.0, 0.0]}
    for fallback, want in expected.items():
        for alpha in (0.0, -3.0, 2.0):
            c, extras = gradops_coefficients(m, alpha, fallback=fallback)
            assert extras["fallback"] is True
            assert torch.isfinite(c).all() and torch.isfinite(extras["tradeoff_weights"]).all()
            torch.testing.assert_close(c, torch.tensor(want, dtype=F64), atol=1e-9, rtol=0)
    c, _ = gradops_coefficients(m, fallback="sum", weight_sum="1")
    torch.testing.assert_close(c, torch.full((3,), 1 / 3, dtype=F64))


def test_partially_dependent_set_keeps_the_independent_task():
    # g_3 = g_1 + g_2 lies in a plane; g_4 sticks out of it: only g_4' survives.
    g = t([[1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 2, 3]])
    for alpha in (0.0, -3.0):
        c, extras = gradops_coefficients(gram(g), alpha)
        assert extras["solver"] == "lstsq" and not extras["fallback"]
        assert extras["vanished"].tolist() == [True, True, True, False]
        update = c @ g
        # w_4 = K * |A| / K = 1 (one active task keeps the mean-one share)
        torch.testing.assert_close(update, t([[0, 0, 3]])[0], atol=1e-9, rtol=0)
        assert (g @ update >= -1e-12).all()


def test_nearly_dependent_set_gives_a_small_genuine_update():
    d = 1e-3  # g_3 = (1, 1, d) is almost in span{g_1, g_2}
    g = t([[1, 0, 0], [0, 1, 0], [1, 1, d]])
    c, extras = gradops_coefficients(gram(g))
    assert extras["solver"] == "closed_form" and not extras["fallback"]
    update = c @ g
    want = torch.tensor([d * d, d * d, d**3 - d], dtype=F64) / (1 + d * d)
    torch.testing.assert_close(update, want, rtol=1e-6, atol=0)
    progress = torch.tensor([d * d / (1 + d * d), d * d / (1 + d * d), d * d], dtype=F64)
    torch.testing.assert_close(g @ update, progress, rtol=1e-6, atol=0)
    # a coarser rank threshold treats the set as dependent: every projection vanishes
    c, extras = gradops_coefficients(gram(g), rcond=1e-5)
    assert extras["solver"] == "lstsq" and extras["fallback"] and extras["vanished"].all()
    assert torch.equal(c, torch.ones(3, dtype=F64))


def test_all_zero_gradients_and_single_task():
    c, extras = gradops_coefficients(torch.zeros(3, 3, dtype=F64), -2.0)
    assert extras["fallback"] and torch.equal(c, torch.ones(3, dtype=F64))
    c, extras = gradops_coefficients(t([[4.0]]), -2.0)  # one task: nothing to project against
    assert not extras["fallback"] and torch.equal(c, torch.ones(1, dtype=F64))


def test_zero_gradient_task_is_harmless_for_negative_alpha():
    g = t([[1, 0, 0], [0, 0, 0], [-1, 1, 0], [0, 1, 2]])
    sub = g[[0, 2, 3]]
    for alpha in (-4.0, -2.0, 0.0, 1.5):
        c, extras = gradops_coefficients(gram(g), alpha)
        c_sub, _ = gradops_coefficients(gram(sub), alpha)
        assert torch.isfinite(c).all()
        assert extras["ratios"][1] == 0 and extras["vanished"][1]
        assert float(extras["tradeoff_weights"][1]) == 1.0  # neutral weight s/K
        assert float(extras["tradeoff_weights"].sum()) == pytest.approx(4.0)
        # the zero task changes nothing: same update as GradOPS on the other three tasks
        torch.testing.assert_close(c @ g, c_sub @ sub, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------- trade-off weights
def test_tradeoff_weights_formula():
    r = torch.tensor([0.5, 0.25, 1.0], dtype=F64)
    for alpha in (-3.0, -2.0, 0.0, 1.0):
        want = 3 * r**alpha / (r**alpha).sum()
        torch.testing.assert_close(gradops_tradeoff_weights(r, alpha), want)
        torch.testing.assert_close(gradops_tradeoff_weights(r, alpha, weight_sum="1"), want / 3)
    assert torch.equal(gradops_tradeoff_weights(r, 0.0), torch.ones(3, dtype=F64))
    # huge |alpha| does not overflow
    w = gradops_tradeoff_weights(torch.tensor([1e-8, 1.0], dtype=F64), -400.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0], dtype=F64))


@PROPS
@given(k=st.integers(2, 5), extra=st.integers(0, 4), seed=st.integers(0, 2**31 - 1))
def test_alpha_minus_two_equalises_relative_progress(k, extra, seed):
    g = random_gradients(k, k + extra, seed, log_scale=1.0)
    assume(well_conditioned(g, 1e4))
    c, extras = gradops_coefficients(gram(g), -2.0)
    update = c @ g
    progress = (g @ update) / (g * g).sum(1)  # g_i . G' / |g_i|^2 = w_i R_i^2
    torch.testing.assert_close(progress, progress.mean().expand(k), rtol=1e-7, atol=0)
    w, r = extras["tradeoff_weights"], extras["ratios"]
    torch.testing.assert_close(progress, w * r**2, rtol=1e-7, atol=0)


@PROPS
@given(k=st.integers(1, 5), extra=st.integers(0, 4), seed=st.integers(0, 2**31 - 1))
def test_alpha_zero_is_equal_weights_of_the_projections(k, extra, seed):
    g = random_gradients(k, k + extra, seed, log_scale=1.0)
    assume(well_conditioned(g))
    p, _ = gradops_projections(gram(g))
    c, extras = gradops_coefficients(gram(g), 0.0)
    assert torch.equal(extras["tradeoff_weights"], torch.ones(k, dtype=F64))
    torch.testing.assert_close(c, p.sum(0), rtol=1e-12, atol=1e-14)
    c1, _ = gradops_coefficients(gram(g), 0.0, weight_sum="1")
    torch.testing.assert_close(c1, c / k)


# ---------------------------------------------------------------------- properties
@PROPS
@given(
    k=st.integers(1, 6),
    extra=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.sampled_from([0.0, 2.0, 4.0]),
)
def test_projection_properties_on_independent_gradients(k, extra, seed, log_scale):
    g = random_gradients(k, k + extra, seed, log_scale)
    # Gram-space round-off grows like cond(C) = cond(normalised G)^2: keep it <= 1e6 for 1e-9
    assume(well_conditioned(g, 1e3))
    p, info = gradops_projections(gram(g))
    assert info["solver"] == "closed_form" and not info["vanished"].any()
    proj = p @ g
    norms = g.norm(dim=1)
    cross = g @ proj.T  # cross[j, i] = g_j . g_i'
    scale = torch.outer(norms, norms)
    off = ~torch.eye(k, dtype=torch.bool)
    assert (cross[off].abs() <= 1e-9 * scale[off]).all()  # g_j . g_i' = 0, j != i
    torch.testing.assert_close(cross.diagonal(), (proj * proj).sum(1), rtol=1e-9, atol=0)
    # ratios and the materialised least-squares projections
    torch.testing.assert_close(info["ratios"], proj.norm(dim=1) / norms, rtol=1e-9, atol=0)
    want = torch.from_numpy(explicit_projections(g.numpy()))
    torch.testing.assert_close(proj, want, rtol=1e-8, atol=1e-9 * float(norms.max()))
    # closed form and least squares agree
    p_ls, _ = gradops_projections(gram(g), solver="lstsq")
    torch.testing.assert_close(p_ls @ g, proj, rtol=1e-8, atol=1e-9 * float(norms.max()))


@PROPS
@given(
    k=st.integers(2, 6),
    extra=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
    weights=st.lists(st.floats(0.0, 10.0), min_size=6, max_size=6),
)
def test_no_conflict_for_any_non_negative_weights(k, extra, seed, weights):
    g = random_gradients(k, k + extra, seed, log_scale=1.0)
    assume(well_conditioned(g))
    p, _ = gradops_projections(gram(g))
    w = torch.tensor(weights[:k], dtype=F64)
    if float(w.max()) > 0:  # the property is scale-free; keep subnormal weights from underflowing
        w = w / w.max()
    update = (p.T @ w) @ g
    bound = 1e-9 * g.norm(dim=1) * float(update.norm() + (w[:, None] * p @ g).norm())
    assert (g @ update >= -bound).all()


@PROPS
@given(
    k=st.integers(2, 6),
    extra=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
    alpha=st.sampled_from([-3.0, -2.0, -0.5, 0.0, 1.0]),
    only_if_conflict=st.booleans(),
)
def test_update_never_conflicts(k, extra, seed, alpha, only_if_conflict):
    g = random_gradients(k, k + extra, seed, log_scale=1.0)
    assume(well_conditioned(g))
    c, extras = gradops_coefficients(gram(g), alpha, only_if_conflict=only_if_conflict)
    assert not extras["fallback"]
    update = c @ g
    assert (g @ update >= -1e-9 * g.norm(dim=1) * update.norm()).all()
    if not only_if_conflict:
        want = torch.from_numpy(explicit_update(g.numpy(), alpha))
        torch.testing.assert_close(update, want, rtol=1e-7, atol=1e-9 * float(want.norm()))


@PROPS
@given(
    k=st.integers(2, 6),
    extra=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
    alpha=st.sampled_from([-3.0, 0.0, 1.0]),
    data=st.data(),
)
def test_permutation_equivariance(k, extra, seed, alpha, data):
    g = random_gradients(k, k + extra, seed, log_scale=1.0)
    perm = torch.tensor(data.draw(st.permutations(list(range(k)))))
    c, _ = gradops_coefficients(gram(g), alpha)
    c_perm, _ = gradops_coefficients(gram(g[perm]), alpha)
    torch.testing.assert_close(c_perm, c[perm], rtol=1e-7, atol=1e-9 * float(c.abs().max()))


@PROPS
@given(
    k=st.integers(2, 6),
    seed=st.integers(0, 2**31 - 1),
    scale_exp=st.sampled_from([-30, -8, 8, 30]),
)
def test_global_scale_invariance(k, seed, scale_exp):
    g = random_gradients(k, k + 2, seed, log_scale=1.0)
    c, _ = gradops_coefficients(gram(g), -2.0)
    c_scaled, _ = gradops_coefficients(gram(g * 10.0**scale_exp), -2.0)
    torch.testing.assert_close(c_scaled, c, rtol=1e-7, atol=0)


@PROPS
@given(
    k=st.integers(3, 7),
    d=st.integers(1, 4),
    dup=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    alpha=st.sampled_from([-3.0, -2.0, 0.0, 2.0]),
    fallback=st.sampled_from(["sum", "mgda", "zero"]),
)
def test_dependent_sets_stay_finite(k, d, dup, seed, alpha, fallback):
    g = random_gradients(k, d, seed, log_scale=1.0)
    if dup:  # duplicated and zero tasks in an otherwise independent set
        g = random_gradients(k, k + 3, seed)
        g[1] = g[0]
        g[2] = 0.0
    c, extras = gradops_coefficients(gram(g), alpha, fallback=fallback)
    assert torch.isfinite(c).all() and torch.isfinite(extras["tradeoff_weights"]).all()
    assert float(extras["tradeoff_weights"].sum()) == pytest.approx(k)
    if d < k - 1 and not dup:
        assert extras["fallback"]  # K > D + 1 generic vectors: every g_i is in the others' span
    if dup:
        assert extras["vanished"][:3].all()
    update = c @ g
    if not extras["fallback"] or fallback != "sum":  # MGDA's min-norm point: KKT to ~1e-12
        bound = 1e-9 * g.norm(dim=1) * (update.norm() + g.norm(dim=1).max())
        assert (g @ update >= -bound).all()


def test_only_if_conflict():
    m = gram(t([[1, 0], [1, 1]]))  # no conflict: plain sum, nothing projected
    c, extras = gradops_coefficients(m, -2.0, only_if_conflict=True)
    assert torch.equal(c, torch.ones(2, dtype=F64)) and not extras["projected"].any()
    assert extras["solver"] == "none"
    m = gram(t([[1, 0], [-1, 1]]))  # conflict: same as the default
    torch.testing.assert_close(
        gradops_coefficients(m, only_if_conflict=True)[0], gradops_coefficients(m)[0]
    )
    # g_1 conflicts with g_2 only; g_3 conflicts with nobody and is kept whole
    g = t([[1, 0, 0], [-1, 1, 0], [0, 1, 1]])
    c, extras = gradops_coefficients(gram(g), only_if_conflict=True)
    assert extras["projected"].tolist() == [True, True, False]
    assert extras["ratios"][2] == 1.0
    update = c @ g
    assert (g @ update >= 0).all()


def test_fig1_example_is_order_free_and_conflict_free():
    # the three gradients for which PCGrad's orders [1,2,3] / [3,2,1] conflict with g_2 / g_3
    # (tests/test_pcgrad.py); GradOPS has no order and its update conflicts with nobody.
    g = t([[1, 0, 2], [0, 1, 0], [0, -1, -1]])
    c, _ = gradops_coefficients(gram(g))
    update = c @ g
    torch.testing.assert_close(update, torch.tensor([26 / 15, 1 / 6, -11 / 30], dtype=F64))
    torch.testing.assert_close(g @ update, torch.tensor([1.0, 1 / 6, 0.2], dtype=F64))
    for perm in ([2, 1, 0], [1, 2, 0], [0, 2, 1]):
        c_perm, _ = gradops_coefficients(gram(g[perm]))
        torch.testing.assert_close(c_perm @ g[perm], update, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"alpha": float("nan")}, ValueError),
        ({"alpha": float("inf")}, ValueError),
        ({"alpha": "1"}, TypeError),  # wrong type: TypeError (balancers._options)
        ({"alpha": True}, TypeError),
        ({"fallback": "mean"}, ValueError),
        ({"weight_sum": 2}, TypeError),
        ({"weight_sum": "k"}, ValueError),
        ({"rcond": 0.0}, ValueError),
        ({"rcond": -1e-3}, ValueError),
        ({"eps": -1.0}, ValueError),
        ({"solver": "qr"}, ValueError),
    ],
)
def test_bad_options_raise(kwargs, error):
    m = gram(t([[1, 0], [-1, 1]]))
    with pytest.raises(error):
        gradops_coefficients(m, **kwargs)
    if "solver" not in kwargs:
        with pytest.raises(error):
            GradOPS(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), **kwargs)


def test_bad_gram_raises():
    with pytest.raises(ValueError, match="square"):
        gradops_coefficients(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        gradops_coefficients(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    with pytest.raises(TypeError, match="only_if_conflict must be a bool"):
        GradOPS(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), only_if_conflict=1)


# ---------------------------------------------------------------------- the wrapper
@pytest.mark.parametrize("alpha", [0.0, -2.0, 1.0])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_wrapper_representation_level_matches_explicit_projection(alpha, k):
    net = TinyNet(k)
    x, y = batch(k)
    trunk, heads = list(net.trunk.parameters()), list(net.heads.parameters())
    # reference: materialise h_k = dL_k/dz, project explicitly, backprop G' through the trunk
    losses, z = net.losses(x, y)
    h = torch.stack([torch.autograd.grad(lk, z, retain_graph=True)[0].reshape(-1) for lk in losses])
    update = torch.from_numpy(explicit_update(h.numpy(), alpha))
    want_trunk = torch.autograd.grad(z, trunk, grad_outputs=update.view_as(z), retain_graph=True)
    want_heads = torch.autograd.grad(sum(losses), heads)

    opt = GradOPS(torch.optim.SGD(net.parameters(), lr=0.1), k, alpha=alpha)
    losses, z = net.losses(x, y)
    opt.zero_grad()
    info = opt.backward(losses, representation=z)
    assert info.level == "representation" and not info.extras["fallback"]
    torch.testing.assert_close(info.gram, h @ h.T, rtol=1e-12, atol=0)
    torch.testing.assert_close(info.weights @ h, update, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat(p.grad for p in trunk), flat(want_trunk), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat(p.grad for p in heads), flat(want_heads), rtol=1e-12, atol=0)
    assert (h @ update >= -1e-12).all()
    assert set(info.extras) >= {"tradeoff_weights", "ratios", "fallback"}
    opt.step()


@pytest.mark.parametrize("alpha", [0.0, -3.0])
@pytest.mark.parametrize("k", [2, 3])
def test_wrapper_parameter_level_matches_explicit_projection(alpha, k):
    net = TinyNet(k, seed=3)
    x, y = batch(k, seed=4)
    trunk, heads = list(net.trunk.parameters()), list(net.heads.parameters())
    losses, _ = net.losses(x, y)
    g = torch.stack([flat(torch.autograd.grad(lk, trunk, retain_graph=True)) for lk in losses])
    update = torch.from_numpy(explicit_update(g.numpy(), alpha))
    want_heads = torch.autograd.grad(sum(losses), heads)

    opt = GradOPS(torch.optim.SGD(net.parameters(), lr=0.1), k, alpha=alpha)
    losses, _ = net.losses(x, y)
    opt.zero_grad()
    info = opt.backward(losses, shared_parameters=net.trunk.parameters())
    assert info.level == "parameters"
    torch.testing.assert_close(flat(p.grad for p in trunk), update, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat(p.grad for p in heads), flat(want_heads), rtol=1e-12, atol=0)
    assert (g @ update >= -1e-12).all()


def test_wrapper_fallback_counter_and_state_dict_round_trip():
    net = TinyNet(3)
    x, y = batch(3)
    # duplicate a task: its loss and gradient equal task 0's -> both projections vanish
    opt = GradOPS(torch.optim.SGD(net.parameters(), lr=0.1), 3, alpha=-2.0, fallback="mgda")
    losses, z = net.losses(x, y)
    info = opt.backward([losses[0], losses[0] * 1.0, losses[1]], representation=z)
    assert info.extras["vanished"].tolist() == [True, True, False]
    assert not info.extras["fallback"] and torch.isfinite(info.weights).all()
    assert opt.balancer_state["num_fallbacks"] == 0
    opt.zero_grad()
    losses, z = net.losses(x, y)
    info = opt.backward([losses[0], losses[0] * 1.0, losses[0] * 2.0], representation=z)
    assert info.extras["fallback"] and opt.balancer_state["num_fallbacks"] == 1
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = GradOPS(torch.optim.SGD(net.parameters(), lr=0.1), 3, alpha=-2.0)
    other.load_state_dict(torch.load(buf, weights_only=False))
    assert other.balancer_state == {"num_fallbacks": 1} and other.num_steps == 2
    assert "alpha=-2.0" in repr(other)


def test_registry_builds_gradops():
    from balancers.registry import make_balancer

    opt = make_balancer("gradops", torch.optim.SGD(TinyNet(2).parameters(), lr=0.1), 2, alpha=-1)
    assert isinstance(opt, GradOPS) and opt.alpha == -1.0


def test_two_tasks_alpha_has_no_effect() -> None:
    """Documented property of the [R] rule: with K = 2 both retained fractions equal sin(theta),
    so w(alpha) is uniform and the update does not depend on alpha."""
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        grads = torch.randn(2, 5, generator=g, dtype=torch.float64)
        grads[1] *= 10.0 ** float(torch.empty(1).uniform_(-3, 3, generator=g))
        gram = grads @ grads.T
        base, _ = gradops_coefficients(gram, 0.0)
        for alpha in (-4.0, -2.0, 3.0):
            c, extras = gradops_coefficients(gram, alpha)
            torch.testing.assert_close(c, base, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(
                extras["tradeoff_weights"], torch.ones(2, dtype=torch.float64), rtol=1e-9, atol=0
            )


# ---------------------------------------------------------------------- order invariance (issue 16)
def test_dependence_decision_does_not_depend_on_task_order() -> None:
    """Five generic gradients in R^4 (rank 4): every g_i lies in the span of the others, so every
    projection vanishes and the fallback fires, in every order of the tasks. The Gram matrix of
    each order is recomputed (its round-off differs). Before: the per-task least-squares
    residuals ``R_i^2`` (round-off, ~1e-9 here) were compared with ``rcond``, so 42 of the 120
    orders returned noise (|G'| ~ 1e-8) instead of falling back."""
    import itertools

    g = torch.from_numpy(np.random.default_rng(5).standard_normal((5, 4)))
    for perm in itertools.permutations(range(5)):
        gp = g[list(perm)]
        c, extras = gradops_coefficients(gp @ gp.T)
        assert extras["fallback"] and extras["vanished"].all() and extras["rank"] == 4, perm
        assert torch.equal(c, torch.ones(5, dtype=F64)), perm


def test_decisions_are_scale_free_and_equivariant_on_a_partly_dependent_set() -> None:
    """g_3 = g_1 + g_2 (up to scale) and g_4 independent, with norms from 1e-6 to 1e6: only
    g_4' survives, whatever the order and the norms."""
    import itertools

    base = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0],
                     [1.0, 2.0, 3.0, 0.5]])  # fmt: skip
    for scales in ([1.0, 1.0, 1.0, 1.0], [1e-6, 1e6, 1.0, 1e3], [1e6, 1e-6, 1e-3, 1e-6]):
        g = base * np.array(scales)[:, None]
        for perm in itertools.permutations(range(4)):
            gp = g[list(perm)]
            c, extras = gradops_coefficients(gp @ gp.T)
            assert extras["vanished"].tolist() == [p != 3 for p in perm], (scales, perm)
            update = c.numpy() @ gp
            want = np.array([0.0, 0.0, 3.0, 0.5]) * scales[3]
            np.testing.assert_allclose(update, want, rtol=1e-9, atol=1e-12 * scales[3])


def test_tiny_gradients_are_not_zero_gradients() -> None:
    """Collinear gradients with norms 2e-8, 1e-8 and 2e8 (and an exact zero): every non-zero one
    lies in the span of the others, so every projection vanishes. Before: ``M_ii <= 1e-30
    max_k M_kk`` declared the two tiny ones zero, and G' = g_4 conflicted with both."""
    g = t([[2e-8], [1e-8], [0.0], [-2e8]])
    _, info = gradops_projections(gram(g))
    assert info["zero"].tolist() == [False, False, True, False]
    c, extras = gradops_coefficients(gram(g), fallback="mgda")
    assert extras["fallback"] and extras["vanished"].all()
    update = c @ g
    assert (g @ update >= 0).all()  # the min-norm point: d = 0 (the zero gradient)
    assert torch.equal(update, torch.zeros(1, dtype=F64))
