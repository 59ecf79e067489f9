"""FAMO: fast adaptive multitask optimization (Liu, Feng, Stone, Liu, NeurIPS 2023), loss level.

Liu et al., "FAMO: Fast Adaptive Multitask Optimization" (NeurIPS 2023); official code
``github.com/Cranial-XIX/FAMO`` (``famo.py``); TorchJD 0.18 ``torchjd.scalarization.FAMO``.
Task logits ``xi`` (state), ``z = softmax(xi)``; with ``D_k = L_k - b_k + eps``::

    model step:   ONE backward of sum_k c_k L_k,   c_k = (z_k / D_k) / sum_j (z_j / D_j)
                  (= the gradient of  sum_k z_k log D_k  normalised so that sum_k c_k = 1)
    after it:     L'_k = the losses re-evaluated on the SAME batch (one extra forward)
                  delta_k = log D_k - log D'_k                      (how much each loss fell)
                  xi <- xi - beta (J_softmax(xi)^T delta + gamma xi)
                  J_softmax(xi)^T delta = z * (delta - z . delta)

(``update="sgd"``; the default ``update="adam"`` takes one ``torch.optim.Adam`` step with
``lr=beta, weight_decay=gamma`` on the gradient ``J^T delta``, as the official code and TorchJD
do.) Tasks whose loss fell less than the others get a larger weight.

Where the extra forward runs: :meth:`FAMO.step` steps the inner optimizer and then calls the
``closure`` passed to :meth:`FAMO.backward` under ``torch.no_grad()``; the K new losses stay on
the device (no read in ``step``). The ``xi`` update is applied on the host at the NEXT
:meth:`FAMO.backward`, from the host copy made by that step's one transfer (the engine hook
``_deferred_values`` / ``_receive_deferred``), before that step's weights are computed, i.e.
exactly where the paper's Algorithm applies it (before the next model step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from mtl import BalancedOptimizer, BalanceInfo, NonFiniteError
from mtl._autocast import forward_autocast
from mtl._checks import check_closure_losses, closure_arity_mismatch

from ._learned import (
    LearnedStateBalancer,
    adam_step,
    check_learned_state,
    float_list,
    loss_level_kwargs,
)
from ._options import check_choice, check_positive
from ._rerun import cuda_indices, replay_autocast

__all__ = ["FAMO", "famo_logit_gradient", "famo_update", "famo_weights"]

Update = Literal["adam", "sgd"]
_UPDATES = ("adam", "sgd")

#: beta, the step size of the logits (official code ``w_lr=0.025``; TorchJD ``lr=0.025``)
DEFAULT_LR = 0.025
#: gamma, the decay of the logits (TorchJD's default, attributed there to the paper's
#: Algorithm 2 and LibMTL; the official ``famo.py`` defaults to 0.01)
DEFAULT_WEIGHT_DECAY = 1e-3
#: added to ``L_k - b_k`` before the logarithm (official code and TorchJD)
DEFAULT_EPS = 1e-8

#: the closure of :meth:`FAMO.backward`: re-runs the model on the same batch, returns K losses
Closure = Callable[[], Sequence[Tensor | float] | Tensor]


# ---------------------------------------------------------------------- pure host functions
def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    out: np.ndarray = e / e.sum()
    return out


def _shifted(losses: Any, min_losses: Any, eps: float) -> np.ndarray:
    x = np.asarray(losses, dtype=np.float64)
    b = 0.0 if min_losses is None else np.asarray(min_losses, dtype=np.float64)
    out: np.ndarray = x - b + eps
    return out


def famo_weights(
    logits: Any, losses: Any, min_losses: Any = None, eps: float = DEFAULT_EPS
) -> np.ndarray:
    """``c_k = (z_k / D_k) / sum_j (z_j / D_j)`` with ``z = softmax(logits)`` and
    ``D = losses - min_losses + eps`` (must be positive); a float64 host array summing to 1."""
    z = _softmax(np.asarray(logits, dtype=np.float64))
    d = _shifted(losses, min_losses, eps)
    r = z / d
    out: np.ndarray = r / r.sum()
    return out


def famo_logit_gradient(
    logits: Any,
    losses_before: Any,
    losses_after: Any,
    min_losses: Any = None,
    eps: float = DEFAULT_EPS,
) -> np.ndarray:
    """``J_softmax(xi)^T delta = z * (delta - z . delta)`` with
    ``delta = log D(before) - log D(after)`` and ``z = softmax(xi)`` (float64 host array)."""
    z = _softmax(np.asarray(logits, dtype=np.float64))
    delta = np.log(_shifted(losses_before, min_losses, eps)) - np.log(
        _shifted(losses_after, min_losses, eps)
    )
    out: np.ndarray = z * (delta - float(z @ delta))
    return out


def famo_update(
    logits: Any,
    grad: Any,
    adam_state: dict[str, Any] | None = None,
    *,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    update: str = "adam",
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """One step of the logits on ``grad`` (:func:`famo_logit_gradient`); mutates nothing.

    ``"sgd"``: ``xi - lr (grad + weight_decay xi)`` (the paper's update); ``"adam"``: one
    ``torch.optim.Adam(lr, weight_decay)`` step (:func:`balancers.uw.adam_step`). Returns
    ``(new_logits, new_adam_state)`` (``None`` for ``"sgd"``).
    """
    xi = np.asarray(logits, dtype=np.float64)
    g = np.asarray(grad, dtype=np.float64)
    if update == "sgd":
        out: np.ndarray = xi - lr * (g + weight_decay * xi)
        return out, None
    if update == "adam":
        return adam_step(xi, g, adam_state, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"update must be one of {_UPDATES}, got {update!r}")


def _unwrapped(fn: Any) -> Any:
    """A method without torch's profiling wrapper (``Optimizer._patch_step_function``), so the
    step hooks run once, around :meth:`FAMO.step` only."""
    return getattr(fn, "__wrapped__", fn)


# ---------------------------------------------------------------------- the optimizer
class FAMO(LearnedStateBalancer):
    """FAMO (Liu et al., NeurIPS 2023): loss-level weights that equalise the losses' decrease rates.

    Per step (``D_k = L_k - b_k + eps``, ``z = softmax(xi)``)::

        backward(losses, closure=f):   [xi update from the previous step, see below]
                                       c_k = (z_k / D_k) / sum_j (z_j / D_j)
                                       ONE backward of sum_k c_k L_k (heads included)
        step():                        the inner optimizer's step, then L' = f() under no_grad
                                       (the same batch, the updated model), kept on the device
        next backward:                 delta = log D(L) - log D(L');  g = z * (delta - z . delta)
                                       update="adam": Adam(lr=beta, weight_decay=gamma) step on g
                                       update="sgd":  xi <- xi - beta (g + gamma xi)

    Relation to the paper: the logits ``xi`` are updated from the change of the log-losses
    across one model update on the same batch, by descending ``J_softmax^T delta`` with decay
    ``gamma`` (the paper's Algorithm; ``update="sgd"`` is that formula verbatim). The official
    code and TorchJD take that step with ``torch.optim.Adam(lr, weight_decay)``: the default
    ``update="adam"`` does the same, on the host, with Adam's state in the balancer state. The
    model gradient ``sum_k c_k grad L_k`` is the gradient of the paper's ``sum_k z_k log D_k``
    times the normaliser ``(sum_k z_k / D_k)^{-1}`` (the official code's ``c``), so
    ``sum_k c_k = 1``. The official code also clips the shared gradient norm at 1 (its
    ``max_norm``): that is not done here (use ``torch.nn.utils.clip_grad_norm_`` between
    ``backward`` and ``step`` if you want it).

    The update is applied at the next ``backward`` (on the host, from that step's one
    transfer), not inside ``step()``: reading the new losses in ``step()`` would cost a second
    device synchronization per step. A checkpoint (``state_dict()``) applies a pending update
    first, so a save/load round trip continues identically. The closure's losses are reduced
    over the ranks under ``torch.distributed`` (one all-reduce in ``step()``, no read).

    Closure: a zero-argument callable that re-runs the model on the batch given to
    :meth:`backward` and returns the K losses (a sequence of scalars or a 1-D tensor), e.g.
    ``closure=lambda: [loss_fn(o, y) for o, y in zip(model(x).task_outputs, ys)]``, at BOTH
    levels (the trunk has changed too, so a closure that only re-runs the heads on the old
    representation would measure the wrong thing). It runs under ``torch.no_grad()``, with the
    CPU/CUDA random state forked (the caller's random stream is not advanced) and under the
    autocast that was active at :meth:`backward` (or the low-precision dtype of the
    representation). With gradient accumulation, the last ``backward`` of the window provides
    both the losses and the closure. A skipped or rejected step runs no closure and makes no
    update.

    State (``balancer_state``, saved by ``state_dict``): ``logits`` (``xi``), ``adam`` (with
    ``update="adam"``), ``num_updates`` (logit updates made), ``num_dropped`` (updates dropped
    because a re-evaluated loss was NaN/inf, with ``on_nonfinite="skip"``), ``last_losses``
    (the losses of the last step, awaiting their re-evaluation) and ``pending`` (the
    re-evaluated losses, a device tensor until the next transfer; ``None`` in checkpoints).
    ``reset_state()`` forgets it all (back to uniform logits, no Adam moments, no pending
    update).

    Args:
        optimizer: the inner optimizer over all model parameters.
        num_tasks: K (inferred from the first call when ``None``).
        lr: ``beta``, the step size of the logits (default 0.025, the official code's and
            TorchJD's).
        weight_decay: ``gamma``, the decay of the logits (default 1e-3, TorchJD's; the
            official ``famo.py`` uses 0.01).
        update: ``"adam"`` (default, the official code's and TorchJD's) or ``"sgd"``.
        min_losses: ``b``, lower bounds of the losses (K numbers, default 0).
        eps: added to ``L - b`` before the logarithm (default 1e-8).
        **kwargs: options of :class:`mtl.BalancedOptimizer`; ``weight_heads`` is always ``True``.

    Losses: FAMO takes ``log(L_k - b_k + eps)``, so every loss (and re-evaluated loss) must
    exceed ``b_k - eps``: otherwise ``ValueError`` naming the task. A NaN/inf loss passed to
    :meth:`backward` follows ``on_nonfinite``; a NaN/inf re-evaluated loss raises
    :class:`~mtl.NonFiniteError` at the next ``backward`` (``on_nonfinite="raise"``) or drops
    that one logit update (``"skip"``).

    ``BalanceInfo.extras``: ``logits`` (``xi`` used for this step), ``task_weights``
    (``z``), ``logits_updated`` (whether this call applied the previous step's update) and,
    when it did, ``loss_decrease`` (``delta``) and ``logit_grad`` (``J^T delta``).
    """

    requires_gram = False
    uses_gradients = False
    needs_closure = True
    closure_reruns_model = True

    _KEYS = ("logits", "adam", "num_updates", "num_dropped", "last_losses", "pending")

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        lr: float = DEFAULT_LR,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        update: Update = "adam",
        min_losses: Sequence[float] | None = None,
        eps: float = DEFAULT_EPS,
        **kwargs: Any,
    ) -> None:
        lr = check_positive("lr", lr, allow_zero=True)
        weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        update = check_choice("update", update, _UPDATES)  # type: ignore[assignment]
        eps = check_positive("eps", eps, allow_zero=True)
        bounds = None
        if min_losses is not None:
            bounds = float_list(min_losses, "min_losses", "FAMO", num_tasks)
        super().__init__(optimizer, num_tasks, **loss_level_kwargs(kwargs, "FAMO"))
        self.lr = lr
        self.weight_decay = weight_decay
        self.update: str = update
        self.min_losses = bounds
        self.eps = eps
        self._closure: Closure | None = None  # the last backward's closure, for step()
        self._amp: list[tuple[str, torch.dtype]] = []  # the autocast the closure runs under
        self._device: torch.device | None = None  # where the re-evaluated losses live
        self._update_extras: dict[str, Any] | None = None  # this call's logit update

    def _repr_options(self) -> str:
        return (
            f"lr={self.lr}, weight_decay={self.weight_decay}, update={self.update!r}, "
            f"min_losses={self.min_losses}, eps={self.eps}, {super()._repr_options()}"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_closure"] = None  # the user's callable, valid for one step only
        return state

    @property
    def logits(self) -> np.ndarray | None:
        """The current logits ``xi`` (a copy), or ``None`` before the first step."""
        return self._state_copy("logits")

    # ------------------------------------------------------------------ state
    def _bounds(self, k: int) -> np.ndarray:
        if self.min_losses is None:
            return np.zeros(k)
        if len(self.min_losses) != k:
            raise ValueError(
                f"min_losses has {len(self.min_losses)} entries but there are {k} tasks"
            )
        return np.asarray(self.min_losses, dtype=np.float64)

    def _check_positive(self, losses: np.ndarray, what: str) -> None:
        d = _shifted(losses, self._bounds(losses.shape[0]), self.eps)
        bad = [k for k in range(d.shape[0]) if not d[k] > 0]
        if bad:
            names = ", ".join(f"{self._name(k)} ({what} {float(losses[k])!r})" for k in bad)
            raise ValueError(
                f"FAMO takes log(L - min_losses + eps), so every loss must exceed "
                f"min_losses - eps (default min_losses 0): got {names}"
            )

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        """Checks every entry first (ValueError naming the key), then replaces the state.

        ``pending`` (a tensor of K re-evaluated losses, possibly on the device) is checked by
        shape only: reading its values here would synchronize inside a step's rollback.
        """
        new, k = check_learned_state(
            state,
            self._KEYS,
            "FAMO",
            self.num_tasks,
            vector="logits",
            counts=("num_updates", "num_dropped"),
            update=self.update,
        )
        last = state.get("last_losses")
        if "last_losses" in state:
            new["last_losses"] = (
                None if last is None else float_list(last, "last_losses", "FAMO", k)
            )
            k = len(new["last_losses"]) if last is not None else k
        pending = state.get("pending")
        if "pending" in state:
            new["pending"] = None
        if pending is not None:
            if isinstance(pending, (list, tuple, np.ndarray)):
                pending = torch.tensor(
                    float_list(pending, "pending", "FAMO", k), dtype=torch.float64
                )
            if not isinstance(pending, Tensor) or pending.dim() != 1:
                raise ValueError("FAMO state 'pending' must be None or a (K,) tensor")
            if k is not None and pending.numel() != k:
                raise ValueError(
                    f"FAMO state 'pending' has {pending.numel()} entries, expected {k}"
                )
            if last is None:
                raise ValueError("FAMO state 'pending' needs 'last_losses' (the losses it follows)")
            new["pending"] = pending.detach()
        self.balancer_state = new

    # ------------------------------------------------------------------ the engine hook
    def _deferred_values(self) -> Tensor | None:
        """The losses re-evaluated after the last step (device), for this step's transfer."""
        pending = self.balancer_state.get("pending")
        return pending if isinstance(pending, Tensor) else None

    def _receive_deferred(self, values: np.ndarray) -> None:
        """Apply the logit update of the last step, on the host (before this step's weights).

        Ignored when the state no longer holds a pending update (a fused optimizer's skipped
        step was rolled back by the engine just before this call).
        """
        st = self.balancer_state
        if st.get("pending") is None:
            return
        before = st.get("last_losses")
        st["pending"], st["last_losses"] = None, None  # consumed, whatever happens below
        if before is None:
            return
        prev = np.asarray(before, dtype=np.float64)
        after = np.array(values, dtype=np.float64).reshape(-1)
        if after.shape != prev.shape:
            raise ValueError(
                f"FAMO: the closure returned {after.shape[0]} losses, the step had {prev.shape[0]}"
            )
        bad = [k for k in range(after.shape[0]) if not np.isfinite(after[k])]
        if bad:
            st["num_dropped"] = int(st.get("num_dropped", 0)) + 1
            names = ", ".join(self._name(k) for k in bad)
            self._update_extras = {"logits_updated": False, "dropped": f"non-finite {names}"}
            if self.on_nonfinite == "raise":
                raise NonFiniteError(
                    f"non-finite loss re-evaluated by FAMO's closure after the last step for "
                    f"{names}; pass on_nonfinite='skip' to drop that logit update"
                )
            return
        self._check_positive(after, "re-evaluated loss")
        b = self._bounds(prev.shape[0])
        xi = np.asarray(st.get("logits", np.zeros(prev.shape[0])), dtype=np.float64)
        grad = famo_logit_gradient(xi, prev, after, b, self.eps)
        new_xi, adam = famo_update(
            xi,
            grad,
            st.get("adam"),
            lr=self.lr,
            weight_decay=self.weight_decay,
            update=self.update,
        )
        if not np.isfinite(new_xi).all():
            raise NonFiniteError(f"FAMO produced non-finite logits {new_xi.tolist()}")
        st["logits"] = new_xi.tolist()
        if adam is not None:
            st["adam"] = adam
        st["num_updates"] = int(st.get("num_updates", 0)) + 1
        delta = np.log(_shifted(prev, b, self.eps)) - np.log(_shifted(after, b, self.eps))
        self._update_extras = {"logits_updated": True, "loss_decrease": delta, "logit_grad": grad}

    # ------------------------------------------------------------------ the method
    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """``c = (z / D) / sum(z / D)`` from the current logits; remembers the losses for the
        logit update that follows this step's re-evaluation."""
        k = losses.shape[0]
        st = self.balancer_state
        xi = np.asarray(st.get("logits", np.zeros(k)), dtype=np.float64)
        if xi.shape != (k,):
            raise ValueError(f"FAMO state has {xi.shape[0]} logits but this step has {k} tasks")
        self._check_positive(losses, "loss")
        c = famo_weights(xi, losses, self._bounds(k), self.eps)
        st["logits"] = xi.tolist()
        st["last_losses"] = losses.tolist()
        extras: dict[str, Any] = {"logits": xi, "task_weights": _softmax(xi)}
        extras.update(self._update_extras or {"logits_updated": False})
        self._update_extras = None
        return c, extras

    # ------------------------------------------------------------------ backward / step
    def backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        *,
        representation: Tensor | Sequence[Tensor] | None = None,
        shared_parameters: Iterable[Tensor] | None = None,
        closure: Closure | None = None,
    ) -> BalanceInfo:
        """One balanced backward pass: ``losses``, ``representation`` and
        ``shared_parameters`` as in :meth:`mtl.BalancedOptimizer.backward` (the balance point
        is checked; the step is one weighted backward), plus the required ``closure``: a
        zero-argument callable that re-runs the model on the SAME batch and returns the K task
        losses; :meth:`step` calls it after the model update."""
        if (representation is None) != (shared_parameters is None):  # else the base says why
            self._check_closure(closure)
        self._closure, self._update_extras = None, None
        items = [losses] if isinstance(losses, Tensor) else list(losses)
        tensors = [t for t in items if isinstance(t, Tensor)]
        blocks = (
            [representation]
            if isinstance(representation, Tensor)
            else [z for z in (representation or []) if isinstance(z, Tensor)]
        )
        amp = forward_autocast({t.device.type for t in tensors}, blocks)
        info = super().backward(
            losses, representation=representation, shared_parameters=shared_parameters
        )
        if not info.skipped:
            self._closure, self._amp = closure, amp
            self._device = tensors[0].device if tensors else torch.device("cpu")
        return info

    def _check_closure(self, closure: Closure | None) -> None:
        if closure is None:
            raise ValueError(
                "FAMO needs closure=: a zero-argument callable that re-runs the model on the "
                "same batch and returns the K task losses (FAMO updates its task weights from "
                "the losses' change across the step), e.g. closure=lambda: [loss_fn(o, y) for "
                "o, y in zip(model(x).task_outputs, ys)]"
            )
        sig = closure_arity_mismatch(closure, 0)
        if sig is not None:
            raise TypeError(
                "FAMO calls closure with no argument (it re-runs the whole model on the same "
                "batch after the update; a closure of the shifted representation, as MARIGOLD "
                f"takes at the representation level, does not apply); got signature {sig}"
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._closure = None  # a discarded window's closure must not run at the next step
        super().zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """The inner step (see :meth:`mtl.BalancedOptimizer.step`), then, if it was taken, the
        losses re-evaluated by the last :meth:`backward`'s closure, kept on the device.

        ``closure`` is the inner optimizer's (``torch.optim`` semantics), not FAMO's.
        """
        famo_closure, self._closure = self._closure, None
        pre_skip, skipped = self._skip_next_step, self.num_skipped
        out = _unwrapped(BalancedOptimizer.step)(self, closure)
        if famo_closure is not None and not pre_skip and self.num_skipped == skipped:
            self.balancer_state["pending"] = self._evaluate(famo_closure)
        return out

    def _evaluate(self, closure: Closure) -> Tensor:
        """The closure's K losses as a float64 tensor on the losses' device (no read), averaged
        over the ranks under ``torch.distributed``."""
        k = len(self.balancer_state.get("last_losses") or []) or self.num_tasks or 0
        device = self._device or torch.device("cpu")
        cuda = cuda_indices(self._params())
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), replay_autocast(self._amp):
            out = closure()
        values = self._closure_losses(out, k, device)
        active, group = self._group()
        if active:
            dist.all_reduce(values, group=group)
            values = values / dist.get_world_size(group)
        return values

    def _closure_losses(self, out: Any, k: int, device: torch.device) -> Tensor:
        return check_closure_losses(out, k, device, self._name, who="FAMO's closure")
