"""Property suite: every registered Gram-based balancer's weight function on random gradient sets.

Each balancer in :data:`balancers.registry.BALANCERS` whose class has ``requires_gram`` gets the
generic checks on every example: ``_compute_weights`` returns ``(weights, extras)`` with finite
float64 weights of shape ``(K,)``, leaves its input alone, and keeps no hidden per-call state.
Then the guarantee its documentation states (``docs/methods.md``), from :data:`GUARANTEES`:

* MGDA: ``alpha`` on the simplex and the KKT conditions of the min-norm problem in relative form
  (``g_k . d >= |d|^2 (1 - 1e-6)``, equality on the support, up to the round-off of alpha);
  ``d`` equivariant under a relabelling of the tasks; bit-identical under ``M -> 2^e M``;
* GradOPS: no conflict with any task gradient when the fallback did not fire (up to round-off
  scaled by the conditioning of the normalised Gram matrix); coefficients equivariant under a
  relabelling (compared through the contributions ``|c_k| |g_k|``); ``fallback="mgda"`` gives
  the min-norm point;
* PCGrad: each projected gradient does not conflict with the last task it was projected against;
  a zero gradient stays zero and is never projected against; ``c`` is the column sum of the
  projection matrix;
* MultiBalance: weights inside the clamp; equivariant under a relabelling (symmetric anchor).

A registered Gram-based method without an entry in :data:`GUARANTEES` fails
:func:`test_every_gram_method_states_its_guarantee`: register, then document and add its check.

The gradient sets (:func:`gradient_sets`) mix random and small-integer entries with per-task
scales from 1e-8 to 1e8, zero gradients, exact duplicates, collinear copies and nearly opposite
float32 copies (``g_i = -float32(g_j)``). Example counts: :data:`EXAMPLES` per method (at least
1000 gradient sets each); the file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancers.registry import balancer_class
from mtl import BalancedOptimizer

sys.path.insert(0, str(Path(__file__).parent))
from _asserts import (  # noqa: E402
    EPS,
    assert_finite,
    assert_min_norm_kkt,
    assert_no_conflict,
    assert_on_simplex,
    permute_gram,
)
from _models import registered_balancers  # noqa: E402

#: examples per method and test (every method gets at least 1000 gradient sets in all)
EXAMPLES = 1000
PROPS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


GRAM_METHODS = [name for name in registered_balancers() if balancer_class(name).requires_gram]


# ---------------------------------------------------------------------- gradient sets
@st.composite
def gradient_sets(draw: st.DrawFn, min_k: int = 2, max_k: int = 6) -> np.ndarray:
    """A ``(K, D)`` float64 gradient matrix with the hard cases mixed in."""
    k = draw(st.integers(min_k, max_k))
    d = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        g = rng.standard_normal((k, d))
    else:  # small integers: exact ties, exact dependencies, exact orthogonality
        g = rng.integers(-3, 4, size=(k, d)).astype(np.float64)
    exponents = draw(
        st.lists(
            st.sampled_from([-8.0, -4.0, 0.0, 0.0, 0.0, 4.0, 8.0]) | st.floats(-8.0, 8.0),
            min_size=k,
            max_size=k,
        )
    )
    g = g * (10.0 ** np.array(exponents))[:, None]
    for i in range(k):
        action = draw(
            st.sampled_from(["keep"] * 5 + ["zero", "duplicate", "collinear", "opposite32"])
        )
        j = draw(st.integers(0, k - 1))
        if action == "zero":
            g[i] = 0.0
        elif j == i:
            continue
        elif action == "duplicate":
            g[i] = g[j]
        elif action == "collinear":
            g[i] = g[j] * draw(st.sampled_from([-2.0, -1.0, 0.5, 3.0, 1e-6, -1e6]))
        elif action == "opposite32":
            g[i] = -(g[j].astype(np.float32).astype(np.float64))
    return g


def gram(g: np.ndarray) -> np.ndarray:
    m = g @ g.T
    return 0.5 * (m + m.T)


# ---------------------------------------------------------------------- the weight functions
def make(name: str, k: int, **options: Any) -> BalancedOptimizer:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return balancer_class(name)(opt, k, **options)


def weights_of(
    opt: BalancedOptimizer, m: np.ndarray, losses: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """One host call as the engine makes it (one block: ``block_grams = M[None]``)."""
    m_in = m.copy()
    result = opt._compute_weights(m_in, losses, m_in[None].copy())
    assert isinstance(result, tuple) and len(result) == 2, type(result)
    w, extras = result
    assert isinstance(w, np.ndarray) and w.dtype == np.float64
    assert w.shape == (m.shape[0],), w.shape
    assert_finite(w)
    assert np.array_equal(m_in, m)  # the input is not modified
    assert isinstance(extras, dict)
    assert not hasattr(opt, "_last") and not hasattr(opt, "_extras")  # no hidden per-call state
    return w, extras


def relabelled(name: str, m: np.ndarray, perm: np.ndarray, **options: Any) -> np.ndarray:
    """Weights of a fresh balancer on the relabelled Gram matrix, back in the original labels."""
    w, _ = weights_of(make(name, m.shape[0], **options), permute_gram(m, perm), np.ones(len(perm)))
    out = np.empty_like(w)
    out[perm] = w
    return out


# ---------------------------------------------------------------------- the guarantees
def _mgda(g: np.ndarray, data: st.DataObject) -> None:
    m = gram(g)
    k = m.shape[0]
    c, extras = weights_of(make("mgda", k), m, np.ones(k))
    alpha = np.asarray(extras["alpha"])
    assert np.array_equal(c, alpha)  # normalization "none": c = alpha
    assert_on_simplex(alpha)
    assert_min_norm_kkt(m, alpha, rtol=1e-6)
    # d = sum alpha_k g_k is unique: equivariant under a relabelling of the tasks
    perm = np.array(data.draw(st.permutations(range(k))))
    diff = relabelled("mgda", m, perm) - alpha
    scale = float(np.abs(alpha) @ np.sqrt(np.diag(m)))  # sum_k alpha_k |g_k|
    assert float(diff @ m @ diff) <= (1e-6 * scale) ** 2 + 1e-300, (diff, scale)
    # exact scale invariance (power-of-two scaling)
    e = data.draw(st.integers(-60, 60))
    c2, _ = weights_of(make("mgda", k), np.ldexp(m, e), np.ones(k))
    assert np.array_equal(c2, c)


def _conditioning(m: np.ndarray, rcond: float = 1e-10) -> float:
    """``lambda_max / lambda_min`` of the normalised Gram matrix over its numerical range."""
    n = np.sqrt(np.clip(np.diag(m), 0.0, None))
    live = n > 1e-15 * n.max() if n.max() > 0 else n > 0
    if live.sum() == 0:
        return 1.0
    c = m[np.ix_(live, live)] / np.outer(n[live], n[live])
    lam = np.linalg.eigvalsh(c)
    kept = lam[lam > rcond * lam[-1]]
    return float(lam[-1] / kept.min())


def _gradops(g: np.ndarray, data: st.DataObject) -> None:
    m = gram(g)
    k = m.shape[0]
    alpha = data.draw(st.sampled_from([0.0, -2.0, 1.0]))
    fallback = data.draw(st.sampled_from(["sum", "mgda"]))
    c, extras = weights_of(make("gradops", k, alpha=alpha, fallback=fallback), m, np.ones(k))
    assert_finite(extras["tradeoff_weights"], extras["ratios"])
    if not extras["fallback"]:
        # G' = sum_i w_i g_i' conflicts with no task, up to round-off x conditioning
        rtol = 1e-9 + 1e3 * k * EPS * _conditioning(m)
        assert_no_conflict(m, c, rtol=rtol)
    elif fallback == "mgda":
        assert_min_norm_kkt(m, c / k, rtol=1e-6)
    # no order: the coefficients are equivariant under a relabelling of the tasks
    # (compared through their contributions |c_k| |g_k|: a tiny gradient's coefficient may be
    # huge and carry round-off of the others' scale)
    perm = np.array(data.draw(st.permutations(range(k))))
    moved = relabelled("gradops", m, perm, alpha=alpha, fallback=fallback)
    norms = np.sqrt(np.diag(m))
    size = float(np.abs(c) @ norms)
    if extras["fallback"] and fallback == "mgda":  # the min-norm point: d is unique (as MGDA)
        diff = moved - c
        assert float(diff @ m @ diff) <= (1e-6 * size) ** 2 + 1e-300, (c, moved)
    else:
        assert float((np.abs(moved - c) * norms).max(initial=0.0)) <= 1e-9 * size + 1e-300, (
            c,
            moved,
        )


def _pcgrad(g: np.ndarray, data: st.DataObject) -> None:
    from balancers.pcgrad import DEFAULT_EPS, _pcgrad_projections_np

    m = gram(g)
    k = m.shape[0]
    c, extras = weights_of(make("pcgrad", k, seed=data.draw(st.integers(0, 99))), m, np.ones(k))
    orders = np.asarray(extras["orders"])
    coef, projected = _pcgrad_projections_np(m, orders, DEFAULT_EPS)
    assert np.array_equal(c, coef.sum(0))
    assert np.array_equal(projected, np.asarray(extras["projected"]))
    zero = np.diag(m) == 0
    assert not projected[:, zero].any() and not projected[zero].any()
    assert (coef[zero] == np.eye(k)[zero]).all()  # a zero g_i stays (its zero row of G)
    norms = np.sqrt(np.diag(m))
    for i in range(k):
        hit = [j for j in orders[i, 1:] if projected[i, j]]
        if hit:  # g_i^PC . g_j >= 0 for the last task it was projected against
            j = hit[-1]
            dot = float(coef[i] @ m[:, j])
            size = float(np.abs(coef[i]) @ norms) * float(norms[j])
            assert dot >= -1e-9 * size, (i, j, dot, size)


def _multibalance(g: np.ndarray, data: st.DataObject) -> None:
    m = gram(g)
    k = m.shape[0]
    w, extras = weights_of(make("multibalance", k), m, np.ones(k))
    assert_finite(w, extras["norms_ma"], extras["reference"])
    # no clamp by default: w_k = r m_ref / (m~_k + eps) + (1 - r) on observed tasks, else 1
    eff, ref = np.asarray(extras["norms_effective"]), float(extras["reference"])
    expected = np.where(eff > 0, 0.7 * ref / (eff + 1e-12) + 0.3, 1.0) if ref > 0 else np.ones(k)
    np.testing.assert_allclose(w, expected, rtol=1e-12, atol=0)
    assert (w >= 0.3).all(), w
    perm = np.array(data.draw(st.permutations(range(k))))
    np.testing.assert_allclose(relabelled("multibalance", m, perm), w, rtol=1e-12, atol=0)


def _gradnorm(g: np.ndarray, data: st.DataObject) -> None:
    """GradNorm: the applied weights are positive and sum to K; the next ones too (over two
    calls with changing losses); relabelling the tasks relabels the weights."""
    m = gram(g)
    k = m.shape[0]
    losses = 10.0 ** np.array(data.draw(st.lists(st.floats(-3, 3), min_size=k, max_size=k)))
    opt = make("gradnorm", k)
    weights_of(opt, m, losses)
    w, extras = weights_of(opt, m, losses * 0.5)
    for v in (w, np.asarray(extras["next_weights"])):
        assert (v > 0).all() and abs(float(v.sum()) - k) <= 1e-9 * k, v
    perm = np.array(data.draw(st.permutations(range(k))))
    other = make("gradnorm", k)
    weights_of(other, permute_gram(m, perm), losses[perm])
    w_perm, _ = weights_of(other, permute_gram(m, perm), losses[perm] * 0.5)
    np.testing.assert_allclose(w_perm, w[perm], rtol=1e-9, atol=1e-12)


def _multibalance_s(g: np.ndarray, data: st.DataObject) -> None:
    """The [S] variant: lambda stays on the simplex; c_k = lambda_k u_k / |h_k| >= 0, zero for
    a zero gradient."""
    m = gram(g)
    k = m.shape[0]
    opt = make("multibalance_s", k)
    for _ in range(3):
        c, _ = weights_of(opt, m, np.ones(k))
    lam = np.asarray(opt.balancer_state["lam"], dtype=np.float64)
    assert_on_simplex(lam, atol=1e-9)  # the projection of a step of size |DMD| ~ 1e4 rounds
    assert (c >= 0).all(), c
    assert (c[np.diag(m) == 0] == 0).all(), c


def _same_direction(m: np.ndarray, c: np.ndarray, ref: np.ndarray, rtol: float = 1e-6) -> None:
    """``sum_k c_k g_k`` equals ``sum_k ref_k g_k`` to ``rtol`` of the terms' size: relabelling
    the tasks must give the same direction (the weights need not be unique: duplicates,
    collinear or more gradients than dimensions)."""
    diff = c - ref
    norms = np.sqrt(np.clip(np.diag(m), 0.0, None))
    size = float(np.abs(ref) @ norms) + float(np.abs(c) @ norms)
    floor = 16 * len(c) * EPS * float(norms.max(initial=0.0))  # coefficients' own round-off
    gap = float(np.sqrt(max(float(diff @ m @ diff), 0.0)))
    assert gap <= rtol * size + floor, (c, ref, gap, size)


def _upgrad(g: np.ndarray, data: st.DataObject) -> None:
    """UPGrad: non-conflicting by construction (g_k . d >= 0, scale-aware round-off; nearly
    opposite float32 pairs are resolved to 1e-6, see docs/methods.md), equivariant."""
    m = gram(g)
    k = m.shape[0]
    c, _ = weights_of(make("upgrad", k), m, np.ones(k))
    assert_no_conflict(m, c, rtol=1e-6)
    _same_direction(
        m, relabelled("upgrad", m, perm=np.array(data.draw(st.permutations(range(k))))), c
    )


def _imtlg(g: np.ndarray, data: st.DataObject) -> None:
    """IMTL-G: d's projections on the unit task gradients are equal (nonzero tasks), up to
    round-off relative to the terms involved."""
    m = gram(g)
    k = m.shape[0]
    c, _ = weights_of(make("imtlg", k), m, np.ones(k))
    norms = np.sqrt(np.clip(np.diag(m), 0.0, None))
    live = norms > 0
    if live.sum() < 2 or not np.any(c):
        return
    proj = (m @ c)[live] / norms[live]
    scale = float(np.abs(c) @ norms) or 1.0
    rank = np.linalg.matrix_rank(m[np.ix_(live, live)] / np.outer(norms[live], norms[live]))
    if rank == live.sum():  # a unique equal-projection direction exists
        assert float(proj.max() - proj.min()) <= 1e-6 * scale, (proj, scale)


def _nashmtl(g: np.ndarray, data: st.DataObject) -> None:
    """Nash-MTL: finite, non-negative weights (the bargaining solution, capped)."""
    m = gram(g)
    k = m.shape[0]
    c, _ = weights_of(make("nashmtl", k), m, np.ones(k))
    assert (c >= 0).all(), c


def _alignedmtl(g: np.ndarray, data: st.DataObject) -> None:
    """Aligned-MTL: finite weights; equivariant under a relabelling of the tasks when M is
    well conditioned on its range (kappa <= 1e6) and no eigenvalue lies near the rank cut-off
    (K eps lambda_max): there, whether an eigenvalue is kept depends on round-off, so on the
    order of the tasks (a known limitation, see the #16/#17 notes)."""
    m = gram(g)
    k = m.shape[0]
    c, _ = weights_of(make("alignedmtl", k), m, np.ones(k))
    eig = np.linalg.eigvalsh(m)
    top = float(eig.max(initial=0.0))
    kept = eig[eig > top * 1e-8]  # a clear gap to the rank cut-off (K eps * top)
    gap = not ((eig > top * k * EPS * 1e-3) & (eig <= top * 1e-8)).any()
    if top > 0 and gap and float(kept.max() / kept.min()) <= 1e6:
        perm = np.array(data.draw(st.permutations(range(k))))
        _same_direction(m, relabelled("alignedmtl", m, perm), c, rtol=1e-6)


def _cagrad(g: np.ndarray, data: st.DataObject) -> None:
    """CAGrad: finite weights; the direction stays within c |g_0| of the mean gradient g_0."""
    m = gram(g)
    k = m.shape[0]
    c, _ = weights_of(make("cagrad", k), m, np.ones(k))
    mean = np.full(k, 1.0 / k)
    diff = c - mean
    g0_sq = float(mean @ m @ mean)
    moved = float(diff @ m @ diff)
    norms = np.sqrt(np.clip(np.diag(m), 0.0, None))
    slack = 1e-6 * float(np.abs(c) @ norms) ** 2
    assert moved <= 0.25 * g0_sq * (1 + 1e-6) + slack, (moved, g0_sq)


#: registry name -> the documented guarantee (checked on every example)
GUARANTEES: dict[str, Callable[[np.ndarray, st.DataObject], None]] = {
    "mgda": _mgda,
    "gradops": _gradops,
    "pcgrad": _pcgrad,
    "multibalance": _multibalance,
    "gradnorm": _gradnorm,
    "multibalance_s": _multibalance_s,
    "upgrad": _upgrad,
    "imtlg": _imtlg,
    "nashmtl": _nashmtl,
    "alignedmtl": _alignedmtl,
    "cagrad": _cagrad,
}


def test_every_gram_method_states_its_guarantee() -> None:
    assert GRAM_METHODS, "no Gram-based balancer registered"
    missing = [name for name in GRAM_METHODS if name not in GUARANTEES]
    assert not missing, f"Gram-based balancers without a property check: {missing}"


@pytest.mark.parametrize("name", GRAM_METHODS)
@PROPS
@given(g=gradient_sets(), data=st.data())
def test_documented_guarantee(name: str, g: np.ndarray, data: st.DataObject) -> None:
    check = GUARANTEES.get(name)
    if check is None:  # generic checks only (the test above names the gap)
        m = gram(g)
        weights_of(make(name, m.shape[0]), m, np.ones(m.shape[0]))
        return
    check(g, data)


# ---------------------------------------------------------------------- regressions
#: gradient sets that failed a guarantee at some point (kept as fixed examples; the random draws
#: inside each check, relabellings and options, still vary)
REGRESSIONS: list[tuple[str, list[list[float]]]] = [
    # issue 16 row 5: norms 1e-6, 1.6e6, 0.5 (the old solver returned (0.503, 1.5e-7, 0.497))
    ("mgda", [[5e-7, 1e-6, -1e-7], [-1.3e6, 8e5, 4e5], [0.3, -0.4, -0.1]]),
    # nearly opposite float32 pair next to a third gradient: |d| at 1e-8 of the gradients
    (
        "mgda",
        [
            [2e-08, 1e-08, 0.0],
            [-2e-08, -1e-08, -3.0000000000000004e-08],
            [-3.0000000000000004e-08, -3.0000000000000004e-08, -2e-08],
            [1.999999987845058e-08, 9.99999993922529e-09, 2.999999892949745e-08],
        ],
    ),
    # a huge gradient with weight 2e-17: its KKT needs the refined affine solve
    (
        "mgda",
        [
            [-1.0763976070681713e-14, 1.4689147777165175e-14, 5.915714688692306e-15],
            [-1.0763976070681713e-08, 1.4689147777165177e-08, 5.915714688692306e-09],
            [0.9671563153852168, -0.2561426943344785, 2.3699164848424257],
        ],
    ),
    # d = 0 below the Gram matrix's resolution (the float64 Gram is slightly indefinite)
    (
        "mgda",
        [
            [-2.4452589240875676e-09, -5.780110216178537e-09, 2.5992184646275546e-09],
            [-0.00010763976070681714, 0.00014689147777165176, 5.9157146886923065e-05],
            [0.9671563153852168, -0.2561426943344785, 2.3699164848424257],
            [0.00010763976024463773, -0.00014689147064927965, -5.9157147916266695e-05],
        ],
    ),
    # g_2 orthogonal to g_1 up to the round-off of their Gram entry
    ("mgda", [[-2e-4, 1e-4, 0.0, 3e-4], [3e7, 3e7, 3e7, 2e7], [-2e-8, 3e-8, -1e-8, 0.0]]),
    # issue 16 row 6: rank 4 in R^4 (every projection vanishes, in every order)
    ("gradops", np.random.default_rng(5).standard_normal((5, 4)).tolist()),
    # tiny but non-zero gradients are not zero (the old eps = 1e-30 relative to the largest
    # made them so, and G' = g_4 conflicted with them)
    ("gradops", [[2e-8], [1e-8], [0.0], [-2e8]]),
    # duplicates, a zero gradient and a 1e-8 gradient next to 1e4 ones
    (
        "gradops",
        [
            [0.0, 0.0, 3e4, 1e4, -1e4],
            [0.0, 0.0, 3e4, 1e4, -1e4],
            [0.0, 3e4, -1e4, -2e4, -1e4],
            [-2.0, 2.0, -1.0, -3.0, -1.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [-1e-8, 1e-8, 3e-8, 2e-8, 0.0],
        ],
    ),
    # issue 16 row 6: collinear, the tiny gradient conflicts with both others (exact: d = 0)
    ("pcgrad", [[3e7], [2e6], [-1.2e-8]]),
]


@pytest.mark.parametrize(
    ("name", "rows"),
    [pytest.param(n, r, id=f"{n}-{i}") for i, (n, r) in enumerate(REGRESSIONS)],
)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_documented_guarantee_on_regressions(
    name: str, rows: list[list[float]], data: st.DataObject
) -> None:
    GUARANTEES[name](np.array(rows, dtype=np.float64), data)
