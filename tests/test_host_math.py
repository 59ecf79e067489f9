"""The balancers' math runs on the host: ``_compute_weights`` takes float64 NumPy arrays (the
engine's one device-to-host copy per step), returns ``(weights, extras)`` with NumPy float64
weights and no hidden state, and calls none of the torch functions that synchronise a device
(counted with :class:`tests._sync_count.SyncCounter`). Each result equals the public pure
function's on the same input.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from balancers import (
    MGDA,
    EqualWeight,
    GradOPS,
    MultiBalance,
    PCGrad,
    gradops_coefficients,
    mgda_weights,
    multibalance_weights,
    pcgrad_coefficients,
    update_norm_averages,
)
from mtl import NonFiniteError

sys.path.insert(0, str(Path(__file__).parent))
from _sync_count import SyncCounter  # noqa: E402

K = 3


def inner() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


def host_inputs(k: int = K, blocks: int = 2, seed: int = 0, d: int = 6):
    """``(gram, losses, block_grams)`` as float64 NumPy arrays, like the engine's host copy."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((blocks, k, d)) * np.exp(rng.standard_normal((1, k, 1)))
    block_grams = np.einsum("bkd,bjd->bkj", g, g)
    return block_grams.sum(0), rng.uniform(0.1, 2.0, k), block_grams


def as_info_extras(raw: dict[str, Any]) -> dict[str, Any]:
    """What the engine makes of a method's extras: arrays become (copied) host tensors."""
    return {
        k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray | np.generic) else v
        for k, v in raw.items()
    }


def host_step(opt: Any, gram, losses, block_grams) -> tuple[np.ndarray, dict[str, Any]]:
    """``_compute_weights`` under the sync counter (no synchronising call); the extras as the
    engine turns them into ``BalanceInfo.extras`` (arrays become host tensors)."""
    with SyncCounter() as sync:
        result = opt._compute_weights(gram, losses, block_grams)
    assert sync.count == 0, sync.calls
    assert isinstance(result, tuple) and len(result) == 2, type(result)
    w, raw = result
    assert isinstance(w, np.ndarray) and w.dtype == np.float64
    assert np.isfinite(w).all()
    assert not hasattr(opt, "_extras") and not hasattr(opt, "_last")  # no hidden state
    return w, as_info_extras(raw)


# ---------------------------------------------------------------------- the counter itself
def test_sync_counter_counts_every_synchronising_call() -> None:
    t = torch.tensor([1.0, 2.0])
    with SyncCounter() as sync:
        t[0].item()
        t.tolist()
        bool(t[0])
        float(t[0])
        int(t[0])
        t.cpu()
        t.numpy()
        t.nonzero()
        torch.nonzero(t)
        if t[1]:
            pass
        _ = t * 2 + torch.from_numpy(np.ones(2))  # arithmetic is not counted
    assert sync.calls == [
        "item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy", "nonzero",
        "nonzero", "__bool__",
    ]  # fmt: skip
    assert sync.count == 10
    sync.reset()
    assert sync.count == 0 and sync.calls == []


# ---------------------------------------------------------------------- EqualWeight
@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0]])
def test_equal_weight_host(weights) -> None:
    gram, losses, bg = host_inputs()
    opt = EqualWeight(inner(), K, weights=weights)
    w, extras = host_step(opt, gram, losses, bg)
    want = np.ones(K) if weights is None else np.asarray(weights)
    assert w.shape == (K,) and np.array_equal(w, want) and extras == {}
    w[0] = 7.0  # the returned array is not the balancer's own
    assert host_step(opt, gram, losses, bg)[0][0] == want[0]


# ---------------------------------------------------------------------- MGDA
@pytest.mark.parametrize("normalized_update", [False, True])
@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_host(normalization: str, normalized_update: bool) -> None:
    gram, losses, bg = host_inputs(k=4, seed=1)
    opt = MGDA(inner(), 4, normalization=normalization, normalized_update=normalized_update)
    w, extras = host_step(opt, gram, losses, bg)
    c, alpha = mgda_weights(
        torch.from_numpy(gram),
        torch.from_numpy(losses),
        normalization=normalization,  # type: ignore[arg-type]
        normalized_update=normalized_update,
    )
    assert w.shape == (4,)
    np.testing.assert_array_equal(w, c.numpy())
    np.testing.assert_array_equal(extras["alpha"].numpy(), alpha.numpy())
    assert extras["scales"].shape == (4,)
    # numpy input to the public function gives the same tensors
    c_np, _ = mgda_weights(gram, losses, normalization=normalization)  # type: ignore[arg-type]
    assert isinstance(c_np, torch.Tensor)


@pytest.mark.parametrize("normalization", ["loss", "loss+"])
def test_mgda_negative_loss_is_a_host_check(normalization: str) -> None:
    gram, losses, bg = host_inputs()
    losses[1] = -0.5
    opt = MGDA(inner(), K, normalization=normalization)
    with SyncCounter() as sync, pytest.raises(ValueError, match="needs non-negative losses"):
        opt._compute_weights(gram, losses, bg)
    assert sync.count == 0


def test_mgda_nonfinite_gram_keeps_its_message() -> None:
    gram, losses, bg = host_inputs()
    gram[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        MGDA(inner(), K)._compute_weights(gram, losses, bg)


# ---------------------------------------------------------------------- MultiBalance
@pytest.mark.parametrize("anchor", [None, 0, "max"])
@pytest.mark.parametrize("strategy", ["A", "B", "C"])
def test_multibalance_per_block_host(strategy: str, anchor) -> None:
    opt = MultiBalance(inner(), K, strategy=strategy, anchor=anchor)
    ma = torch.zeros(2, K, dtype=torch.float64)
    for step in range(3):
        gram, losses, bg = host_inputs(seed=10 + step)
        w, extras = host_step(opt, gram, losses, bg)
        norms = torch.from_numpy(np.sqrt(np.diagonal(bg, axis1=1, axis2=2)).copy())
        ma, updated = update_norm_averages(ma, norms, beta=opt.beta, skip_empty=opt.skip_empty)
        want = multibalance_weights(ma, strategy=strategy, anchor=anchor)  # type: ignore[arg-type]
        assert w.shape == (2, K)
        np.testing.assert_allclose(w, want.numpy(), rtol=1e-15, atol=0)
        np.testing.assert_allclose(extras["norms_ma"].numpy(), ma.numpy(), rtol=1e-15, atol=0)
        assert extras["updated"].dtype == torch.bool and bool(extras["updated"].all())
        assert extras["reference"].shape == (2,)
        st = opt.balancer_state
        assert isinstance(st["norms_ma"], torch.Tensor) and st["norms_ma"].shape == (2, K)
        assert st["num_updates"].dtype == torch.int64
        assert torch.equal(st["num_updates"], torch.full((2, K), step + 1))


def test_multibalance_single_block_and_skipped_task_host() -> None:
    opt = MultiBalance(inner(), K)
    for step in range(3):
        gram, losses, bg = host_inputs(blocks=1, seed=step)
        if step == 1:
            bg[:, 2, :] = bg[:, :, 2] = 0.0  # task 2 has no gradient: skipped, counts diverge
        w, extras = host_step(opt, bg.sum(0), losses, bg)
        assert w.shape == (K,) and extras["norms"].shape == (K,)
        assert extras["reference"].dim() == 0
    assert opt.balancer_state["num_updates"].tolist() == [[3, 3, 2]]


def test_multibalance_extras_do_not_alias_the_state() -> None:
    opt = MultiBalance(inner(), K)
    gram, losses, bg = host_inputs(blocks=1)
    _, extras = host_step(opt, gram, losses, bg)
    before = opt.balancer_state["norms_ma"].clone()
    extras["norms_ma"].fill_(123.0)
    assert torch.equal(opt.balancer_state["norms_ma"], before)


@pytest.mark.parametrize("mgda_ema", [False, True])
def test_multibalance_mgda_rule_host(mgda_ema: bool) -> None:
    opt = MultiBalance(inner(), K, rule="mgda", mgda_ema=mgda_ema)
    prev = None
    for step in range(2):
        gram, losses, bg = host_inputs(seed=20 + step)
        w, extras = host_step(opt, gram, losses, bg)
        alpha = np.stack([mgda_weights(b)[0].numpy() for b in bg])
        np.testing.assert_allclose(extras["alpha"].numpy(), alpha, rtol=0, atol=1e-15)
        want = alpha if prev is None or not mgda_ema else opt.beta * prev + (1 - opt.beta) * alpha
        np.testing.assert_allclose(w, want, rtol=0, atol=1e-15)
        prev = want
    assert ("alpha_ema" in opt.balancer_state) == mgda_ema


def test_multibalance_state_round_trip_is_exact_and_sync_free() -> None:
    opt = MultiBalance(inner(), K, rule="mgda", mgda_ema=True)
    for step in range(2):
        host_step(opt, *host_inputs(seed=step))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = MultiBalance(inner(), K, rule="mgda", mgda_ema=True)
    other.load_state_dict(torch.load(buf, weights_only=True))
    nxt = host_inputs(seed=5)
    w1, e1 = host_step(opt, *nxt)
    w2, e2 = host_step(other, *nxt)  # loaded state: read without a sync
    assert np.array_equal(w1, w2)
    for key, value in opt.balancer_state.items():
        assert torch.equal(value, other.balancer_state[key])


def test_multibalance_errors_keep_their_messages_and_state() -> None:
    opt = MultiBalance(inner(), K)
    gram, losses, bg = host_inputs()
    host_step(opt, gram, losses, bg)
    before = {k: v.clone() for k, v in opt.balancer_state.items()}
    with pytest.raises(ValueError, match="keeps moving averages for 2 block"):
        opt._compute_weights(gram, losses, bg[:1])
    bad = bg.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="norms must be finite"):
        opt._compute_weights(gram, losses, bad)
    for key, value in before.items():
        assert torch.equal(opt.balancer_state[key], value)
    assert issubclass(NonFiniteError, Exception)


# ---------------------------------------------------------------------- GradOPS
@pytest.mark.parametrize("alpha", [0.0, -2.0, 1.0])
@pytest.mark.parametrize("only_if_conflict", [False, True])
def test_gradops_host(alpha: float, only_if_conflict: bool) -> None:
    gram, losses, bg = host_inputs(k=4, seed=3)
    opt = GradOPS(inner(), 4, alpha=alpha, only_if_conflict=only_if_conflict)
    w, extras = host_step(opt, gram, losses, bg)
    c, want = gradops_coefficients(torch.from_numpy(gram), alpha, only_if_conflict=only_if_conflict)
    assert w.shape == (4,)
    np.testing.assert_array_equal(w, c.numpy())
    assert set(extras) == set(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(extras[key], value), key
        else:
            assert extras[key] == value, key
    assert opt.balancer_state["num_fallbacks"] == 0


@pytest.mark.parametrize("fallback", ["sum", "mgda", "zero"])
def test_gradops_fallback_counter_host(fallback: str) -> None:
    g = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # linearly dependent: every g_i' = 0
    gram = g @ g.T
    opt = GradOPS(inner(), 3, fallback=fallback)
    for n in (1, 2):
        w, extras = host_step(opt, gram, np.ones(3), None)
        assert extras["fallback"] is True and opt.balancer_state["num_fallbacks"] == n
    np.testing.assert_array_equal(w, gradops_coefficients(gram, fallback=fallback)[0].numpy())
    assert type(opt.balancer_state["num_fallbacks"]) is int


# ---------------------------------------------------------------------- PCGrad
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_pcgrad_host(k: int, reduction: str) -> None:
    opt = PCGrad(inner(), k, seed=3, reduction=reduction)
    for step in range(3):
        gram, losses, bg = host_inputs(k=k, seed=30 + step)
        w, extras = host_step(opt, gram, losses, bg)
        orders = extras["orders"]
        assert orders.shape == (k, k) and orders.dtype == torch.int64
        assert orders[:, 0].tolist() == list(range(k))  # each row starts with the task itself
        want = pcgrad_coefficients(torch.from_numpy(gram), orders, reduction=reduction)  # type: ignore[arg-type]
        assert w.shape == (k,)
        np.testing.assert_array_equal(w, want.numpy())
        assert extras["num_projections"] == int(extras["projected"].sum())


def test_pcgrad_seeded_orders_and_exact_round_trip() -> None:
    gram, losses, bg = host_inputs(k=4)
    a, b, c = PCGrad(inner(), 4, seed=7), PCGrad(inner(), 4, seed=7), PCGrad(inner(), 4, seed=8)
    oa = [host_step(a, gram, losses, bg)[1]["orders"] for _ in range(4)]
    ob = [host_step(b, gram, losses, bg)[1]["orders"] for _ in range(4)]
    oc = [host_step(c, gram, losses, bg)[1]["orders"] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(oa, ob))
    assert not all(torch.equal(x, y) for x, y in zip(oa, oc))

    for weights_only in (True, False):
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        d = PCGrad(inner(), 4, seed=99)
        d.load_state_dict(torch.load(buf, weights_only=weights_only))
        assert d.seed == 7
        nxt_a = [host_step(a, gram, losses, bg)[1]["orders"] for _ in range(3)]
        nxt_d = [host_step(d, gram, losses, bg)[1]["orders"] for _ in range(3)]
        assert all(torch.equal(x, y) for x, y in zip(nxt_a, nxt_d))


def test_pcgrad_loads_an_old_torch_generator_checkpoint() -> None:
    opt = PCGrad(inner(), 3, seed=1)
    sd = opt.state_dict()
    sd["balancer"]["state"]["generator"] = torch.Generator().manual_seed(5).get_state()
    gram, losses, bg = host_inputs()
    loaded = []
    for _ in range(2):
        other = PCGrad(inner(), 3)
        other.load_state_dict(sd)
        loaded.append(host_step(other, gram, losses, bg)[1]["orders"])
    assert torch.equal(loaded[0], loaded[1])  # deterministic continuation

    sd["balancer"]["state"]["generator"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="torch generator state"):
        PCGrad(inner(), 3).load_state_dict(sd)
    sd["balancer"]["state"]["generator"] = {"bit_generator": "MT19937"}
    with pytest.raises(ValueError, match="PCG64"):
        PCGrad(inner(), 3).load_state_dict(sd)
    del sd["balancer"]["state"]["generator"]
    with pytest.raises(ValueError, match="no generator state"):
        PCGrad(inner(), 3).load_state_dict(sd)


# ---------------------------------------------------------------------- public functions
def test_public_functions_accept_numpy_and_return_tensors() -> None:
    from balancers import (
        gradops_projections,
        gradops_tradeoff_weights,
        min_norm_weights,
        pcgrad_orders,
        pcgrad_projections,
        project_simplex,
    )

    gram, losses, _ = host_inputs()
    t = torch.from_numpy(gram)
    pairs = [
        (min_norm_weights(gram), min_norm_weights(t)),
        (mgda_weights(gram, losses)[0], mgda_weights(t, torch.from_numpy(losses))[0]),
        (gradops_coefficients(gram)[0], gradops_coefficients(t)[0]),
        (gradops_projections(gram)[0], gradops_projections(t)[0]),
        (gradops_tradeoff_weights(np.array([0.5, 1.0]), -2.0),
         gradops_tradeoff_weights(torch.tensor([0.5, 1.0], dtype=torch.float64), -2.0)),
        (pcgrad_coefficients(gram, [0, 1, 2]), pcgrad_coefficients(t, [0, 1, 2])),
        (pcgrad_projections(gram, np.array([2, 1, 0]))[0], pcgrad_projections(t, [2, 1, 0])[0]),
        (multibalance_weights(np.array([1.0, 2.0, 4.0])),
         multibalance_weights(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))),
        (update_norm_averages(np.zeros(3), losses)[0],
         update_norm_averages(torch.zeros(3), torch.from_numpy(losses))[0]),
        (project_simplex(np.array([0.3, 0.9, -1.0])),
         project_simplex(torch.tensor([0.3, 0.9, -1.0], dtype=torch.float64))),
    ]  # fmt: skip
    for got, want in pairs:
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    orders = pcgrad_orders(4, np.random.default_rng(0))
    assert orders.shape == (4, 4) and sorted(orders[2].tolist()) == [0, 1, 2, 3]


def test_project_simplex_on_a_tensor_is_sync_free() -> None:
    from balancers import project_simplex

    y = torch.tensor([0.3, 0.9, -1.0, 2.0], dtype=torch.float32)
    with SyncCounter() as sync:
        p = project_simplex(y)
    assert sync.count == 0, sync.calls
    assert p.dtype == torch.float32 and abs(float(p.sum()) - 1.0) < 1e-6
