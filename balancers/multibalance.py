"""MultiBalance (He et al., arXiv 2411.11871) and its parent MetaBalance (He et al., WWW 2022).

Moving-average gradient-magnitude balancing toward an anchor magnitude, per block: per
representation tensor with ``representation=`` (MultiBalance), per shared parameter tensor with
``shared_parameters=`` (MetaBalance's "each part of the network" semantics).

Only MetaBalance's full text and reference code were available; MultiBalance's weight rule,
anchor and moving-average placement are a reconstruction ([R] in
``reference/methods.md`` section 2.C) grounded in MetaBalance. See ``docs/methods.md (MultiBalance)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer, NonFiniteError

from ._host import check_gram, device_of, host_array, to_torch
from ._min_norm import _min_norm_weights_np
from ._options import check_choice

__all__ = [
    "MultiBalance",
    "MultiBalanceClampWarning",
    "multibalance_weights",
    "update_norm_averages",
]

Strategy = Literal["A", "B", "C"]
Anchor = int | Literal["mean", "max", "min"] | None
Rule = Literal["magnitude", "mgda"]

_STRATEGIES = ("A", "B", "C")
_STATISTICS = ("mean", "max", "min")
_RULES = ("magnitude", "mgda")
_FLOAT64_MAX = float(np.finfo(np.float64).max)


# ---------------------------------------------------------------------- validation
def _check_relax_factor(relax_factor: float) -> float:
    r = float(relax_factor)
    if not 0.0 <= r <= 1.0:  # also rejects NaN
        raise ValueError(f"relax_factor must be in [0, 1], got {relax_factor!r}")
    return r


def _check_beta(beta: float) -> float:
    b = float(beta)
    if not 0.0 <= b < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    return b


def _check_strategy(strategy: str) -> str:
    return check_choice("strategy", strategy, _STRATEGIES)


def _check_eps(eps: float) -> float:
    e = float(eps)
    if not (math.isfinite(e) and e >= 0.0):
        raise ValueError(f"eps must be finite and non-negative, got {eps!r}")
    return e


def _check_clamp(clamp: tuple[float, float] | None) -> tuple[float, float] | None:
    if clamp is None:
        return None
    try:
        lo, hi = (float(c) for c in clamp)
    except (TypeError, ValueError):
        raise ValueError(f"clamp must be None or a pair (low, high), got {clamp!r}") from None
    if not (math.isfinite(lo) and 0.0 <= lo <= 1.0 <= hi):  # hi may be inf; NaN fails
        raise ValueError(
            f"clamp must satisfy 0 <= low <= 1 <= high (weight 1 = no change must stay "
            f"reachable), got {clamp!r}"
        )
    return lo, hi


def _check_skip_empty(skip_empty: float | None) -> float | None:
    if skip_empty is None:
        return None
    s = float(skip_empty)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"skip_empty must be None or in [0, 1), got {skip_empty!r}")
    return s


def _check_anchor(anchor: Anchor, num_tasks: int | None) -> Anchor:
    if anchor is None or (isinstance(anchor, str) and anchor in _STATISTICS):
        return anchor
    if isinstance(anchor, bool) or not isinstance(anchor, int):
        raise ValueError(
            f"anchor must be None, a task index or one of {_STATISTICS}, got {anchor!r}"
        )
    if anchor < 0 or (num_tasks is not None and anchor >= num_tasks):
        k = "K" if num_tasks is None else str(num_tasks)
        raise ValueError(f"anchor={anchor} is out of range: expected a task index in [0, {k})")
    return anchor


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """A validated float64 ``(blocks, K)`` view of a ``(K,)`` or ``(blocks, K)`` host array."""
    if x.ndim not in (1, 2) or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (K,) or (blocks, K), got {tuple(x.shape)}")
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all() or (x < 0).any():
        raise ValueError(f"{name} must be finite and non-negative, got {x.tolist()}")
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------- pure functions
def _reference(m: np.ndarray, anchor: Anchor) -> np.ndarray:
    """``m_ref`` per block from a ``(blocks, K)`` matrix; 0 where it is undefined."""
    observed = m > 0
    ref: np.ndarray
    if isinstance(anchor, int):
        ref = m[:, anchor].copy()
    elif anchor == "max":
        ref = m.max(-1)
    elif anchor == "min":
        lo = np.where(observed, m, math.inf).min(-1)
        ref = np.where(np.isinf(lo), 0.0, lo)
    else:  # None and "mean": mean over the observed tasks
        ref = m.sum(-1) / np.maximum(observed.sum(-1), 1)
    return ref


def _multibalance_weights_np(
    m: np.ndarray,
    *,
    relax_factor: float,
    strategy: str,
    anchor: Anchor,
    eps: float,
    clamp: tuple[float, float] | None,
) -> np.ndarray:
    """:func:`multibalance_weights` on a validated ``(blocks, K)`` float64 host matrix."""
    r = relax_factor
    ref = _reference(m, anchor)[:, None]
    observed = m > 0
    denom = np.where(observed, m + eps, 1.0)
    with np.errstate(over="ignore", divide="ignore"):
        ratio = np.minimum(ref / denom, _FLOAT64_MAX)
    w = r * ratio + (1.0 - r)
    if strategy == "A":
        active = m > ref
    elif strategy == "B":
        active = m < ref
    else:
        active = np.ones_like(observed)
    active = active & observed & (ref > 0)
    if isinstance(anchor, int):
        active[:, anchor] = False
    w = np.where(active, w, 1.0)
    if clamp is not None:
        w = np.clip(w, clamp[0], clamp[1])
    return w


def multibalance_weights(
    norms_ma: Tensor | np.ndarray,
    *,
    relax_factor: float = 0.7,
    strategy: Strategy = "C",
    anchor: Anchor = None,
    eps: float = 1e-12,
    clamp: tuple[float, float] | None = None,
) -> Tensor:
    """MetaBalance/MultiBalance weights from moving averages of gradient norms (pure function).

    For each block (row) with averages ``m_1..m_K``::

        m_ref = m_anchor                 (anchor = task index: MetaBalance's target task)
              = mean/max/min of the m_k > 0   (anchor = "mean" (= None, default), "max", "min")
        w_k   = r * m_ref / (m_k + eps) + (1 - r)   if the strategy condition holds, else 1
                A: m_k > m_ref only (shrink dominating tasks); B: m_k < m_ref only (enlarge weak
                tasks); C: always
        w_k   = clamp(w_k, low, high)               (skipped when clamp is None)

    This is Eq. 4 of MetaBalance (``w = (m_tar / m_aux - 1) r + 1``) with ``eps`` in the
    denominator. Exceptions: the anchor task (integer anchor) gets exactly 1; a task with
    ``m_k = 0`` (never observed: no gradient yet) gets 1; a block whose ``m_ref`` is 0 gets all
    ones. The symmetric statistics ignore tasks with ``m_k = 0``. Ratios overflowing float64
    are capped at its largest value before the clamp, so the result is always finite.

    Args:
        norms_ma: ``(K,)`` or ``(blocks, K)`` finite non-negative moving averages (a tensor on
            any device or a NumPy array; computed on the host by
            :func:`_multibalance_weights_np`).
        relax_factor: ``r`` in [0, 1]; 0 = plain sum, 1 = every adapted task's balanced
            magnitude equals ``m_ref``.
        strategy: ``"A"``, ``"B"`` or ``"C"`` (default).
        anchor: a task index, ``None``/``"mean"`` (default), ``"max"`` or ``"min"``.
        eps: added to ``m_k`` in the denominator (default 1e-12; 0 allowed).
        clamp: ``(low, high)`` with ``0 <= low <= 1 <= high``, or None (default: unbounded).

    Returns:
        float64 weights of the shape of ``norms_ma``, on its device (CPU for NumPy input).
    """
    r = _check_relax_factor(relax_factor)
    checked_strategy = _check_strategy(strategy)
    eps = _check_eps(eps)
    bounds = _check_clamp(clamp)
    device = device_of(norms_ma)
    x = host_array(norms_ma)
    m = _as_matrix(x, "norms_ma")
    anchor = _check_anchor(anchor, m.shape[1])
    w = _multibalance_weights_np(
        m, relax_factor=r, strategy=checked_strategy, anchor=anchor, eps=eps, clamp=bounds
    )
    return to_torch(w.reshape(x.shape), device)


def _update_norm_averages_np(
    m: np.ndarray, n: np.ndarray, *, beta: float, skip_empty: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`update_norm_averages` on validated ``(blocks, K)`` float64 host matrices."""
    if skip_empty is None:
        updated = np.ones(n.shape, dtype=bool)
    else:
        updated = n > skip_empty * n.max(-1, keepdims=True)
    return np.where(updated, beta * m + (1.0 - beta) * n, m), updated


def update_norm_averages(
    norms_ma: Tensor | np.ndarray,
    norms: Tensor | np.ndarray,
    *,
    beta: float = 0.9,
    skip_empty: float | None = 1e-6,
) -> tuple[Tensor, Tensor]:
    """One moving-average step ``m_k <- beta m_k + (1 - beta) n_k`` with the empty-task rule.

    Per block (row), the observation ``n_k`` is *empty* when ``n_k <= skip_empty * max_j n_j``
    (so an exactly-zero gradient is always empty, and so is every task of an all-zero block);
    empty entries keep their previous average. ``skip_empty=None`` updates every entry every
    step (exact MetaBalance). Tensors (any device) or NumPy arrays; computed on the host by
    :func:`_update_norm_averages_np`.

    Returns:
        ``(new_averages, updated)``: float64 averages and the boolean mask of updated entries,
        both of the shape of ``norms``, on ``norms``' device (CPU for NumPy input).
    """
    b = _check_beta(beta)
    skip = _check_skip_empty(skip_empty)
    device = device_of(norms)
    x = host_array(norms)
    n = _as_matrix(x, "norms")
    m = _as_matrix(host_array(norms_ma), "norms_ma")
    if m.shape != n.shape:
        raise ValueError(
            f"norms_ma has shape {tuple(m.shape)} but norms has shape {tuple(n.shape)}"
        )
    new, updated = _update_norm_averages_np(m, n, beta=b, skip_empty=skip)
    return to_torch(new.reshape(x.shape), device), to_torch(updated.reshape(x.shape), device)


def _effective_averages(m: np.ndarray, counts: np.ndarray, beta: float) -> np.ndarray:
    """Rescale each entry to the warm-up level of the most-updated task of its block.

    ``m~_k = m_k (1 - beta^T) / (1 - beta^t_k)`` with ``t_k`` the entry's number of updates and
    ``T = max_j t_j``; 0 where ``t_k = 0``. When every task was updated equally often (always,
    unless the empty-task rule skipped one) the factor is exactly 1.
    """
    if beta == 0.0 or (counts == counts[:, :1]).all():
        return m
    t = counts.astype(np.float64)
    big_t = t.max(-1, keepdims=True)
    num = 1.0 - np.power(beta, big_t)
    den = 1.0 - np.power(beta, t)
    factor = np.where(counts > 0, num / np.where(counts > 0, den, 1.0), 0.0)
    return m * factor


def _mgda_block(gram: np.ndarray, present: np.ndarray) -> np.ndarray:
    """MGDA min-norm weights of one block, restricted to the non-empty tasks (0 for the others)."""
    k = gram.shape[0]
    idx = np.flatnonzero(present)
    if idx.size == 0:
        return np.full(k, 1.0 / k)
    alpha = np.zeros(k)
    alpha[idx] = _min_norm_weights_np(check_gram(gram[np.ix_(idx, idx)]))
    return alpha


# ---------------------------------------------------------------------- the optimizer
class MultiBalanceClampWarning(UserWarning):
    """MultiBalance's ``clamp`` changed a weight: the balance is partial."""


class MultiBalance(BalancedOptimizer):
    """Moving-average gradient-magnitude balancing toward an anchor magnitude (MultiBalance).

    Per step and per block ``b`` (one per representation tensor with ``representation=``, one
    per shared parameter tensor with ``shared_parameters=``), with ``M^b`` the block's Gram
    matrix of the task gradients ``g_k`` at the balance point:

    1. ``n_k = sqrt(M^b_kk)`` (Frobenius norm of task k's gradient on the block);
    2. ``m_k <- beta m_k + (1 - beta) n_k`` (state initialised to 0, no bias correction), except
       for *empty* observations ``n_k <= skip_empty * max_j n_j`` (always for ``n_k = 0``),
       which keep the previous ``m_k``;
    3. weights from :func:`multibalance_weights` on ``m~`` where
       ``m~_k = m_k (1 - beta^T) / (1 - beta^t_k)``, ``t_k`` = number of updates of ``m_k`` and
       ``T = max_j t_j`` (exactly ``m~ = m`` while no observation was skipped; otherwise a task
       that was skipped is not under-estimated):
       ``w_k = clamp(r m_ref / (m~_k + eps) + (1 - r))`` where the strategy holds, else 1;
    4. the shared part receives ``sum_k w_k g_k`` on each block; heads get their own unweighted
       gradient (``weight_heads=True``: ``w_k`` averaged over blocks).

    Zero-gradient rule (a task with no signal in a batch, e.g. a masked conversion loss with no
    clicks): its observation is skipped (the moving average is not dragged toward 0); a task
    never observed yet (``t_k = 0``, e.g. all-zero at step 1) gets weight 1 and is left out of
    the symmetric statistics; if ``m_ref`` is 0 (anchor never observed) the block gets all ones.
    Weights are always finite (``eps``; ratios are capped at the largest float64).

    Fidelity: MetaBalance (WWW'22, Algorithm 2) is verified; with ``shared_parameters=``,
    ``anchor=0`` (the first loss is the target), ``strategy="C"``, ``clamp=None`` and
    ``skip_empty=None`` this is exactly MetaBalance per parameter tensor (plus ``eps``). The
    MultiBalance default (gradients w.r.t. the representation, symmetric ``"mean"`` anchor, the
    clamp, the empty-task rule) is a reconstruction [R]: the paper's weight rule was not
    available.

    Args:
        optimizer: the inner optimizer.
        num_tasks: K.
        relax_factor: ``r`` in [0, 1] (default 0.7, MetaBalance's); 0 = plain sum.
        beta: moving-average coefficient in [0, 1) (default 0.9).
        strategy: ``"A"`` (shrink only), ``"B"`` (enlarge only) or ``"C"`` (both; default).
        anchor: ``None`` (default) = ``"mean"`` of the tasks' averages [R]; ``"max"``,
            ``"min"``; or a task index (MetaBalance target task, keeps weight 1).
        eps: added to the denominator (default 1e-12).
        clamp: ``(low, high)`` bounds of the weights, or ``None`` (default: unbounded). A
            bound caps the weight ratio between tasks at ``high / low``; a 2000x gradient-norm
            gap (a raw-unit regression next to a BCE) then stays mostly unbalanced. When a bound
            binds, the step warns once (:class:`MultiBalanceClampWarning`) and
            ``extras["clamped"]`` marks the capped weights. Earlier releases defaulted to
            ``(0.1, 10.0)`` [R]; the weights are finite without it (``eps``).
        skip_empty: relative threshold of the empty-task rule (default 1e-6 [R]); ``0`` skips
            only exactly-zero gradients; ``None`` never skips (exact MetaBalance).
        rule: ``"magnitude"`` (default, the reconstruction above) or ``"mgda"``: MGDA-UB
            weights (:func:`balancers.mgda_weights`, normalization ``"none"``) per block on the
            same Gram matrices, empty tasks excluded from the solve (weight 0); ``relax_factor``,
            ``strategy``, ``anchor``, ``eps`` and ``clamp`` are then unused.
        mgda_ema: with ``rule="mgda"``, smooth the simplex weights
            ``a <- beta a + (1 - beta) alpha`` (initialised with the first ``alpha``; stays on the
            simplex). Default ``False``.
        **kwargs: options of :class:`mtl.BalancedOptimizer` (``task_names``, ``weight_heads``,
            ``on_nonfinite``, ...).

    ``BalanceInfo.weights``: ``(K,)`` with a single block, ``(blocks, K)`` otherwise.
    ``BalanceInfo.extras``: ``norms`` (``n``), ``norms_ma`` (``m``, the state after the update),
    ``norms_effective`` (``m~``), ``reference`` (``m_ref``), ``updated`` (mask of updated
    averages), ``clamped`` (with a ``clamp``: the weights it changed); with ``rule="mgda"``:
    ``alpha`` (this step's min-norm weights). Shapes follow
    ``weights`` (``reference``: a scalar or ``(blocks,)``).

    State (``state_dict()["balancer"]["state"]``): ``norms_ma`` ``(blocks, K)`` float64,
    ``num_updates`` ``(blocks, K)`` int64, and ``alpha_ema`` with ``rule="mgda", mgda_ema=True``.
    The block partition must not change between steps (``ValueError``; see :meth:`reset_state`).
    """

    requires_gram = True
    per_block = True

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        relax_factor: float = 0.7,
        beta: float = 0.9,
        strategy: Strategy = "C",
        anchor: Anchor = None,
        eps: float = 1e-12,
        clamp: tuple[float, float] | Sequence[float] | None = None,
        skip_empty: float | None = 1e-6,
        rule: Rule = "magnitude",
        mgda_ema: bool = False,
        **kwargs: Any,
    ) -> None:
        self.relax_factor = _check_relax_factor(relax_factor)
        self.beta = _check_beta(beta)
        self.strategy = _check_strategy(strategy)
        self.eps = _check_eps(eps)
        self.clamp = _check_clamp(clamp)  # type: ignore[arg-type]
        self.skip_empty = _check_skip_empty(skip_empty)
        self.rule = check_choice("rule", rule, _RULES)
        self.mgda_ema = bool(mgda_ema)
        super().__init__(optimizer, num_tasks, **kwargs)
        self.anchor = _check_anchor(anchor, self.num_tasks)
        self._host_state: dict[str, tuple[Tensor, np.ndarray]] = {}
        self._clamp_warned = False  # MultiBalanceClampWarning: once per optimizer

    def _warn_clamped(self, raw: np.ndarray, clamped: np.ndarray) -> None:
        """Warn once per optimizer the first time the clamp changes a weight."""
        if not clamped.any() or getattr(self, "_clamp_warned", False):  # absent in old pickles
            return
        self._clamp_warned = True
        assert self.clamp is not None
        warnings.warn(
            f"MultiBalance clamp={self.clamp} capped its weights (unclamped "
            f"{np.round(raw[clamped], 4).tolist()}): the task gradients differ in magnitude "
            f"by more than the clamp allows ({self.clamp[1] / max(self.clamp[0], 1e-300):.3g}x), "
            "so the balance is partial. Pass clamp=None (the default) to balance fully; "
            "extras['clamped'] marks the capped weights at each step.",
            MultiBalanceClampWarning,
            stacklevel=2,
        )

    def _repr_options(self) -> str:
        opts = (
            f"relax_factor={self.relax_factor}, beta={self.beta}, strategy={self.strategy!r}, "
            f"anchor={self.anchor!r}, eps={self.eps}, clamp={self.clamp}, "
            f"skip_empty={self.skip_empty}, rule={self.rule!r}"
        )
        if self.rule == "mgda":
            opts += f", mgda_ema={self.mgda_ema}"
        return f"{opts}, {super()._repr_options()}"

    def reset_state(self) -> None:
        """Forget the moving averages (e.g. before changing the block partition)."""
        self.balancer_state = {}
        self._host_state = {}

    # -- state
    # The state lives on the host as float64/int64 NumPy arrays; ``balancer_state`` holds CPU
    # tensors that share their memory (``torch.from_numpy``), so reading it back needs no copy
    # and no synchronisation. ``_host_state`` maps each key to ``(tensor, array)``; a tensor put
    # into ``balancer_state`` from outside (a user, an old checkpoint) is copied once.
    def _host_value(self, key: str, dtype: Any) -> np.ndarray | None:
        v = self.balancer_state.get(key)
        if v is None:
            return None
        cached = getattr(self, "_host_state", {}).get(key)
        if cached is not None and cached[0] is v:
            value: np.ndarray = cached[1]
            return value
        return host_array(v, dtype)  # set from outside: one copy

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_host_state"] = {}  # a copy's tensors no longer share memory with these arrays
        return state

    def _set_host_state(self, state: dict[str, np.ndarray]) -> None:
        pairs = {key: (torch.from_numpy(a), a) for key, a in state.items()}
        self._host_state = pairs
        self.balancer_state = {key: t for key, (t, _) in pairs.items()}

    def _state_for(self, num_blocks: int, k: int) -> dict[str, np.ndarray]:
        m = self._host_value("norms_ma", np.float64)
        if m is None:
            return {
                "norms_ma": np.zeros((num_blocks, k)),
                "num_updates": np.zeros((num_blocks, k), dtype=np.int64),
            }
        if m.shape[0] != num_blocks:
            raise ValueError(
                f"MultiBalance keeps moving averages for {m.shape[0]} block(s) but this step has "
                f"{num_blocks} (one block per representation tensor or per shared parameter "
                "tensor); pass the same tensors every step, or call reset_state() to start over"
            )
        if m.shape[1] != k:
            raise ValueError(f"MultiBalance state is for {m.shape[1]} tasks, this step has {k}")
        counts = self._host_value("num_updates", np.int64)
        out = {
            "norms_ma": m,
            "num_updates": np.ones_like(m, np.int64) if counts is None else counts,
        }
        alpha_ema = self._host_value("alpha_ema", np.float64)
        if alpha_ema is not None:
            out["alpha_ema"] = alpha_ema
        return out

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"MultiBalance state must be a dict, got {type(state).__name__}")
        if "norms_ma" in state:
            m = state["norms_ma"]
            if not isinstance(m, Tensor) or m.dim() != 2:
                raise ValueError("MultiBalance state 'norms_ma' must be a (blocks, K) tensor")
            if self.num_tasks is not None and m.shape[1] != self.num_tasks:
                raise ValueError(
                    f"MultiBalance state 'norms_ma' is for {m.shape[1]} tasks, this optimizer "
                    f"has num_tasks={self.num_tasks}"
                )
            if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
                raise ValueError("MultiBalance state 'norms_ma' must be finite and >= 0")
            n = state.get("num_updates")
            if n is not None and (not isinstance(n, Tensor) or n.shape != m.shape):
                raise ValueError("MultiBalance state 'num_updates' must match 'norms_ma'")
            a = state.get("alpha_ema")
            if a is not None and (not isinstance(a, Tensor) or a.shape != m.shape):
                raise ValueError("MultiBalance state 'alpha_ema' must match 'norms_ma'")
        dtypes = {"norms_ma": np.float64, "num_updates": np.int64, "alpha_ema": np.float64}
        if set(state) <= set(dtypes) and all(isinstance(v, Tensor) for v in state.values()):
            # the host copy is made here, once, not in the next step
            self._set_host_state({key: host_array(v, dtypes[key]) for key, v in state.items()})
        else:
            self.balancer_state = state
            self._host_state = {}

    # -- the method
    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Steps 1-4 of the class docstring on the host copy of the block Gram matrices.

        Returns ``(weights, extras)``; the extras are copies (they never alias the state).

        Host functions: :func:`_update_norm_averages_np`, :func:`_effective_averages`,
        :func:`_multibalance_weights_np` (``rule="magnitude"``) or :func:`_mgda_block` per block
        (``rule="mgda"``). The state is replaced only once the weights are known to be finite.
        """
        assert block_grams is not None  # requires_gram: the engine always passes them
        k = np.shape(losses)[0]
        self.anchor = _check_anchor(self.anchor, k)
        num_blocks = block_grams.shape[0]
        norms = np.sqrt(np.clip(np.diagonal(block_grams, axis1=-2, axis2=-1), 0.0, None))
        _as_matrix(norms, "norms")  # finite (same ValueError as update_norm_averages)
        st = self._state_for(num_blocks, k)
        _as_matrix(st["norms_ma"], "norms_ma")
        new_ma, updated = _update_norm_averages_np(
            st["norms_ma"], norms, beta=self.beta, skip_empty=self.skip_empty
        )
        counts = st["num_updates"] + updated.astype(np.int64)
        effective = _effective_averages(new_ma, counts, self.beta)
        new_state: dict[str, np.ndarray] = {"norms_ma": new_ma, "num_updates": counts}
        extras: dict[str, np.ndarray] = {}
        if self.rule == "magnitude":
            raw = _multibalance_weights_np(
                effective,
                relax_factor=self.relax_factor,
                strategy=self.strategy,
                anchor=self.anchor,
                eps=self.eps,
                clamp=None,
            )
            weights = raw if self.clamp is None else np.clip(raw, self.clamp[0], self.clamp[1])
            if self.clamp is not None:
                extras["clamped"] = weights != raw
                self._warn_clamped(raw, extras["clamped"])
        else:
            alpha = np.stack([_mgda_block(block_grams[b], updated[b]) for b in range(num_blocks)])
            extras["alpha"] = alpha
            weights = alpha
            if self.mgda_ema:
                prev = st.get("alpha_ema")
                if prev is not None:
                    weights = self.beta * prev + (1.0 - self.beta) * alpha
                new_state["alpha_ema"] = weights
        if not np.isfinite(weights).all():  # state untouched
            raise NonFiniteError(f"MultiBalance produced non-finite weights {weights.tolist()}")
        self._set_host_state(new_state)
        extras.update(norms=norms, norms_ma=new_ma, norms_effective=effective, updated=updated)
        if self.rule == "magnitude":
            extras["reference"] = _reference(effective, self.anchor)
        single = num_blocks == 1
        out = {name: np.array(v[0] if single else v) for name, v in extras.items()}
        return (weights[0].copy() if single else weights.copy()), out
