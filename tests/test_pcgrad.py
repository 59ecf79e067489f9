"""Tests for PCGrad: Gram-space projections, order dependence, the seeded order and the wrapper."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from balancers.gradops import gradops_coefficients
from balancers.pcgrad import PCGrad, pcgrad_coefficients, pcgrad_orders, pcgrad_projections

sys.path.insert(0, str(Path(__file__).parent))
from _models import TinyNet, batch, flat  # noqa: E402

F64 = torch.float64
PROPS = settings(deadline=None)  # example count: the profile in conftest.py

# The GradOPS paper's Fig. 1 situation, in R^3 with independent gradients: processing order
# [1, 2, 3] gives an aggregate that conflicts with g_2, order [3, 2, 1] one that conflicts with g_3.
FIG1 = torch.tensor([[1, 0, 2], [0, 1, 0], [0, -1, -1]], dtype=F64)


def gram(g: torch.Tensor) -> torch.Tensor:
    return g @ g.T


def explicit_pcgrad(g: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Yu et al. 2020, Algorithm 1, on materialised vectors (projection against the originals)."""
    pc = g.copy()
    for i in range(g.shape[0]):
        for j in orders[i]:
            if j == i or not g[j] @ g[j] > 0:
                continue
            d = pc[i] @ g[j]
            if d < 0:
                pc[i] = pc[i] - d / (g[j] @ g[j]) * g[j]
    return pc


def random_gradients(k: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, d, generator=gen, dtype=F64)
    return g * torch.exp(torch.randn(k, 1, generator=gen, dtype=F64))


# ---------------------------------------------------------------------- hand-derived cases
def test_two_conflicting_tasks_match_gradops_and_methods_md():
    g = torch.tensor([[1, 0], [-1, 1]], dtype=F64)
    coef, info = pcgrad_projections(gram(g), [0, 1])
    torch.testing.assert_close(coef @ g, torch.tensor([[0.5, 0.5], [0, 1]], dtype=F64))
    # g_1' = g_1 - (g_1.g_2/|g_2|^2) g_2 (methods.md 4.D): PCGrad == GradOPS(alpha=0) for K=2
    c = pcgrad_coefficients(gram(g), [1, 0])
    torch.testing.assert_close(c @ g, torch.tensor([0.5, 1.5], dtype=F64))
    torch.testing.assert_close(c, gradops_coefficients(gram(g))[0])
    assert info["num_projections"] == 2
    torch.testing.assert_close(pcgrad_coefficients(gram(g), [0, 1], reduction="mean"), c / 2)


def test_two_non_conflicting_tasks_are_left_alone():
    g = torch.tensor([[1, 0], [1, 1]], dtype=F64)
    coef, info = pcgrad_projections(gram(g), [0, 1])
    assert torch.equal(coef, torch.eye(2, dtype=F64)) and info["num_projections"] == 0
    # GradOPS projects anyway (methods.md 4.B): the two methods differ here
    assert not torch.allclose(gradops_coefficients(gram(g))[0], torch.ones(2, dtype=F64))


@PROPS
@given(d=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_two_tasks_equal_gradops_whenever_they_conflict(d, seed):
    g = random_gradients(2, d, seed)
    if float(g[0] @ g[1]) >= 0:
        g[1] = -g[1]
    c = pcgrad_coefficients(gram(g), [0, 1])
    torch.testing.assert_close(c, gradops_coefficients(gram(g))[0], rtol=1e-10, atol=1e-12)


def test_fig1_order_dependence():
    m = gram(FIG1)
    forward = pcgrad_coefficients(m, [0, 1, 2]) @ FIG1  # order [1, 2, 3]
    backward = pcgrad_coefficients(m, [2, 1, 0]) @ FIG1  # order [3, 2, 1]
    torch.testing.assert_close(forward, torch.tensor([1.4, -0.5, 0.3], dtype=F64))
    torch.testing.assert_close(backward, torch.tensor([1.6, 0.5, 0.7], dtype=F64))
    # the first conflicts with g_2 only, the second with g_3 only
    torch.testing.assert_close(FIG1 @ forward, torch.tensor([2.0, -0.5, 0.2], dtype=F64))
    torch.testing.assert_close(FIG1 @ backward, torch.tensor([3.0, 0.5, -1.2], dtype=F64))
    # GradOPS on the same gradients: no order, no conflict, and the same update when the tasks
    # are processed in any order
    for perm in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        c, _ = gradops_coefficients(gram(FIG1[perm]))
        update = c @ FIG1[perm]
        assert (FIG1 @ update > 0).all()
        torch.testing.assert_close(update, torch.tensor([26 / 15, 1 / 6, -11 / 30], dtype=F64))


def test_zero_gradient_is_never_projected_against():
    g = torch.tensor([[1, 0], [0, 0], [-1, 1]], dtype=F64)
    coef, info = pcgrad_projections(gram(g), [0, 1, 2])
    assert torch.isfinite(coef).all()
    assert not info["projected"][:, 1].any()
    torch.testing.assert_close(coef @ g, torch.tensor([[0.5, 0.5], [0, 0], [0, 1]], dtype=F64))
    c = pcgrad_coefficients(torch.zeros(3, 3, dtype=F64), [0, 1, 2])
    assert torch.equal(c, torch.ones(3, dtype=F64))


# ---------------------------------------------------------------------- properties
@PROPS
@given(
    k=st.integers(1, 6),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_gram_space_equals_explicit_projection(k, d, seed, data):
    g = random_gradients(k, d, seed)
    orders = np.array([data.draw(st.permutations(list(range(k)))) for _ in range(k)])
    c = pcgrad_coefficients(gram(g), orders)
    want = explicit_pcgrad(g.numpy(), orders).sum(0)
    scale = float(g.norm(dim=1).max())
    torch.testing.assert_close(c @ g, torch.from_numpy(want), rtol=1e-9, atol=1e-10 * scale)
    coef, info = pcgrad_projections(gram(g), orders)
    assert info["orders"][:, 0].tolist() == list(range(k))  # self first (a no-op)
    for i in range(k):
        assert sorted(info["orders"][i].tolist()) == list(range(k))


@PROPS
@given(k=st.integers(2, 6), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_projected_gradient_never_conflicts_with_the_last_visited_task(k, seed, data):
    # after its last projection, g_i^PC . g_j >= 0 for that j (the projection zeroes it)
    g = random_gradients(k, k + 1, seed)
    orders = np.array([data.draw(st.permutations(list(range(k)))) for _ in range(k)])
    coef, info = pcgrad_projections(gram(g), orders)
    pc = coef @ g
    for i in range(k):
        last = [j for j in info["orders"][i].tolist() if j != i][-1]
        assert float(pc[i] @ g[last]) >= -1e-10 * float(pc[i].norm() * g[last].norm())


def test_generator_orders_are_seeded_and_advance():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, b = pcgrad_orders(4, g1), pcgrad_orders(4, g2)
    assert torch.equal(a, b) and a.shape == (4, 4)
    assert not torch.equal(pcgrad_orders(4, g1), a)  # the generator advanced
    g = random_gradients(4, 3, 0)
    c1 = pcgrad_coefficients(gram(g), torch.Generator().manual_seed(3))
    c2 = pcgrad_coefficients(gram(g), torch.Generator().manual_seed(3))
    assert torch.equal(c1, c2)


@pytest.mark.parametrize(
    "orders",
    [
        [0, 1],
        [0, 1, 1],
        [[0, 1, 2], [0, 2, 2], [0, 1, 2]],
        [0.0, 1.0, 2.0],
        [[0, 1], [1, 0]],
        [3, 1, 0],
    ],
)
def test_bad_orders_raise(orders):
    with pytest.raises(ValueError):
        pcgrad_coefficients(torch.eye(3, dtype=F64), orders)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        pcgrad_coefficients(torch.eye(2, dtype=F64), [0, 1], reduction="max")
    with pytest.raises(ValueError, match="square"):
        pcgrad_coefficients(torch.zeros(2, 3), [0, 1])
    with pytest.raises(TypeError):
        pcgrad_orders(2, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pcgrad_orders(0, torch.Generator())


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"seed": -1}, ValueError),
        ({"seed": 1.5}, TypeError),  # wrong type: TypeError (balancers._options)
        ({"seed": True}, TypeError),
        ({"reduction": "max"}, ValueError),
        ({"reduction": 1}, TypeError),
        ({"eps": -1.0}, ValueError),
    ],
)
def test_bad_options_raise(kwargs, error):
    with pytest.raises(error):
        PCGrad(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), **kwargs)


# ---------------------------------------------------------------------- the wrapper
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_wrapper_representation_level_matches_explicit_projection(k, reduction):
    net = TinyNet(k)
    trunk, heads = list(net.trunk.parameters()), list(net.heads.parameters())
    opt = PCGrad(torch.optim.SGD(net.parameters(), lr=0.05), k, seed=5, reduction=reduction)
    for step in range(3):
        x, y = batch(k, seed=step)
        losses, z = net.losses(x, y)
        h = torch.stack(
            [torch.autograd.grad(lk, z, retain_graph=True)[0].reshape(-1) for lk in losses]
        )
        want_heads = torch.autograd.grad(sum(losses), heads, retain_graph=True)
        opt.zero_grad()
        info = opt.backward(losses, representation=z)
        orders = info.extras["orders"].numpy()
        update = explicit_pcgrad(h.numpy(), orders).sum(0)
        if reduction == "mean":
            update = update / k
        update = torch.from_numpy(update)
        want_trunk = torch.autograd.grad(net.trunk(x), trunk, grad_outputs=update.view_as(z))
        torch.testing.assert_close(
            flat(p.grad for p in trunk), flat(want_trunk), rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(flat(p.grad for p in heads), flat(want_heads))
        opt.step()


@pytest.mark.parametrize("k", [2, 3])
def test_wrapper_parameter_level_matches_explicit_projection(k):
    net = TinyNet(k, seed=2)
    x, y = batch(k, seed=9)
    trunk = list(net.trunk.parameters())
    losses, _ = net.losses(x, y)
    g = torch.stack([flat(torch.autograd.grad(lk, trunk, retain_graph=True)) for lk in losses])
    opt = PCGrad(torch.optim.SGD(net.parameters(), lr=0.05), k, seed=1)
    opt.zero_grad()
    info = opt.backward(losses, shared_parameters=trunk)
    update = explicit_pcgrad(g.numpy(), info.extras["orders"].numpy()).sum(0)
    torch.testing.assert_close(
        flat(p.grad for p in trunk), torch.from_numpy(update), rtol=1e-9, atol=1e-12
    )


def _train(opt: PCGrad, net: TinyNet, steps: range) -> list[torch.Tensor]:
    orders = []
    for step in steps:
        x, y = batch(3, seed=step)
        losses, z = net.losses(x, y)
        opt.zero_grad()
        orders.append(opt.backward(losses, representation=z).extras["orders"])
        opt.step()
    return orders


def test_seed_reproducibility():
    a, b, c = TinyNet(3), TinyNet(3), TinyNet(3)
    opt_a = PCGrad(torch.optim.SGD(a.parameters(), lr=0.05), seed=11)
    opt_b = PCGrad(torch.optim.SGD(b.parameters(), lr=0.05), seed=11)
    opt_c = PCGrad(torch.optim.SGD(c.parameters(), lr=0.05), seed=12)
    oa, ob, oc = _train(opt_a, a, range(4)), _train(opt_b, b, range(4)), _train(opt_c, c, range(4))
    assert all(torch.equal(x, y) for x, y in zip(oa, ob))
    assert not all(torch.equal(x, y) for x, y in zip(oa, oc))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_state_dict_round_trip_continues_identically():
    net = TinyNet(3)
    opt = PCGrad(torch.optim.Adam(net.parameters(), lr=0.01), 3, seed=4)
    _train(opt, net, range(3))
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    later = _train(opt, net, range(3, 6))
    final = [p.detach().clone() for p in net.parameters()]

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    net2 = TinyNet(3, seed=99)
    net2.load_state_dict(saved["model"])
    opt2 = PCGrad(torch.optim.Adam(net2.parameters(), lr=0.01), 3, seed=123)
    opt2.load_state_dict(saved["opt"])
    assert opt2.seed == 4 and opt2.num_steps == 3
    again = _train(opt2, net2, range(3, 6))
    assert all(torch.equal(x, y) for x, y in zip(later, again))
    for p, q in zip(final, net2.parameters()):
        assert torch.equal(p, q)
    assert "seed=4" in repr(opt2)


def test_registry_builds_pcgrad():
    from balancers.registry import make_balancer

    opt = make_balancer("pcgrad", torch.optim.SGD(TinyNet(2).parameters(), lr=0.1), 2, seed=3)
    assert isinstance(opt, PCGrad) and opt.seed == 3


# ---------------------------------------------------------------------- scale-aware decisions (issue 16)
def test_tiny_conflicting_gradient_is_projected_exactly() -> None:
    """Three collinear gradients in R^1; the tiny -1.2e-8 one conflicts with both others, so in
    exact arithmetic every projection removes everything: d = 0. Before: a gradient with
    |g|^2 <= 1e-30 max_k |g_k|^2 was never projected against, giving d = 3.2e7 in every order."""
    import itertools

    g = torch.tensor([[3e7], [2e6], [-1.2e-8]], dtype=F64)
    for order in itertools.permutations(range(3)):
        c = pcgrad_coefficients(gram(g), list(order))
        d = float(c @ g[:, 0])
        size = float(c.abs() @ g.abs()[:, 0])  # the scale of d's round-off
        assert abs(d) <= 1e-14 * size, (order, d)
        assert size < 1e8  # not a blow-up: coefficients stay O(1) relative to the gradients


def test_conflict_test_depends_on_the_pair_only() -> None:
    """Adding a huge gradient orthogonal to the others changes nothing among them (before: it
    raised max_k |g_k|^2 and made the small gradients count as zero)."""
    small = torch.tensor([[1.0, 0.0, 0.0], [-1e-9, 1e-9, 0.0]], dtype=F64)
    big = torch.tensor([[0.0, 0.0, 1e12]], dtype=F64)
    g = torch.cat([small, big])
    for orders in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        coef, info = pcgrad_projections(gram(g), orders)
        sub_orders = [o for o in orders if o != 2]
        coef_small, _ = pcgrad_projections(gram(small), sub_orders)
        torch.testing.assert_close(coef[:2, :2], coef_small, rtol=1e-12, atol=0)
        assert info["projected"][0, 1] and info["projected"][1, 0]
        assert not info["projected"][:, 2].any() and not info["projected"][2].any()


@PROPS
@given(
    k=st.integers(2, 6),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.sampled_from([0.0, 4.0, 8.0]),
    data=st.data(),
)
def test_relabelling_the_tasks_relabels_the_result(k, d, seed, log_scale, data):
    """Relabel the tasks (and the orders with them) in the same Gram matrix: the coefficients
    are relabelled, bit for bit. No decision uses a quantity that depends on the labels."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, d, generator=gen, dtype=F64)
    g = g * torch.exp(log_scale * torch.randn(k, 1, generator=gen, dtype=F64))
    orders = np.array([data.draw(st.permutations(list(range(k)))) for _ in range(k)])
    perm = np.array(data.draw(st.permutations(list(range(k)))))
    inv = np.argsort(perm)
    m = gram(g)
    coef, _ = pcgrad_projections(m, orders)
    # task i of the relabelled problem is task perm[i]; its order lists new labels inv[j]
    new_orders = inv[orders[perm]]
    coef_p, _ = pcgrad_projections(m[perm][:, perm], new_orders)
    assert torch.equal(coef_p, coef[perm][:, perm])
