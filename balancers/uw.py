"""UW: uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018), a loss-level method.

Kendall et al., "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
Semantics" (CVPR 2018). Each task gets a learnable log-variance ``s_k = log sigma_k^2`` and the
model minimises::

    sum_k a_k e^{-s_k} L_k + 1/2 s_k          a_k = 1/2 (regression, Gaussian likelihood, Eq. 5)
                                              a_k = 1   (classification, softmax likelihood, Eq. 10)

(with ``s = log sigma^2``, the paper's ``log sigma`` is ``s / 2``). So the model receives the
gradient of ``sum_k c_k L_k`` with ``c_k = a_k e^{-s_k}``, and ``s`` moves along
``d/ds_k = 1/2 - a_k e^{-s_k} L_k`` (regression: ``1/2 (1 - e^{-s_k} L_k)``); at the fixed point
``e^{s_k} = 2 a_k L_k`` (regression: ``sigma_k^2 = L_k``).

The pure host functions (:func:`uw_coefficients`, :func:`uw_gradient`, :func:`adam_step`) hold the
math; :class:`UW` keeps ``s`` (and the Adam moments) in its balancer state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from torch.optim import Optimizer

from mtl import NonFiniteError

from ._learned import LearnedStateBalancer, adam_step, check_learned_state, loss_level_kwargs
from ._options import check_choice, check_positive, check_real

__all__ = ["UW", "uw_coefficients", "uw_gradient"]

Update = Literal["sgd", "adam"]
Variant = Literal["regression", "classification"]

_UPDATES = ("sgd", "adam")
_VARIANTS = ("regression", "classification")
#: ``a_k`` of the objective ``a_k e^{-s_k} L_k + s_k / 2`` per variant
_FACTORS = {"regression": 0.5, "classification": 1.0}

#: default step size of the log-variances
DEFAULT_LR = 0.01


# ---------------------------------------------------------------------- pure host functions
def uw_coefficients(log_vars: Any, factors: Any = 0.5) -> np.ndarray:
    """``c_k = a_k e^{-s_k}``: the coefficients of the task losses (float64 host array).

    Args:
        log_vars: ``s`` (K,), the log-variances ``log sigma_k^2``.
        factors: ``a`` (a number or (K,)): 1/2 for regression tasks, 1 for classification.
    """
    s = np.asarray(log_vars, dtype=np.float64)
    a = np.broadcast_to(np.asarray(factors, dtype=np.float64), s.shape)
    out: np.ndarray = a * np.exp(-s)
    return out


def uw_gradient(log_vars: Any, losses: Any, factors: Any = 0.5) -> np.ndarray:
    """``d/ds_k (a_k e^{-s_k} L_k + s_k / 2) = 1/2 - a_k e^{-s_k} L_k`` (float64 host array)."""
    s = np.asarray(log_vars, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    out: np.ndarray = 0.5 - uw_coefficients(s, factors) * loss
    return out


# ---------------------------------------------------------------------- the optimizer
class UW(LearnedStateBalancer):
    """Uncertainty weighting (Kendall et al., CVPR 2018): ``c_k = a_k e^{-s_k}``, learnable ``s``.

    Objective (``s_k = log sigma_k^2``)::

        sum_k a_k e^{-s_k} L_k + 1/2 s_k        a_k = 1/2 ("regression", default) or 1
                                                ("classification"), per task
        model:  ONE backward of sum_k c_k L_k,  c_k = a_k e^{-s_k}   (heads included)
        s:      s_k <- s_k - lr * (1/2 - a_k e^{-s_k} L_k)            (update="sgd", default)
                or one Adam step on that gradient                      (update="adam")

    The default is the regression (Gaussian likelihood) form for every task,
    ``1/2 e^{-s_k} L_k + 1/2 s_k``, i.e. ``c_k = 1/2 e^{-s_k}`` and
    ``d/ds_k = 1/2 (1 - e^{-s_k} L_k)``; LibMTL and TorchJD use it for every task too. The
    paper's classification form (Eq. 10: ``1/sigma^2 L + log sigma``) doubles ``c_k``; choose it
    per task with ``variant``.

    Relation to the paper: there ``s`` is a parameter of the network, updated by the model's
    optimizer on the gradient of the same objective. Here ``s`` is balancer state, updated on the
    host inside the balanced step with its own step size ``lr``: a plain gradient step
    (``update="sgd"``) or Adam (``update="adam"``, ``torch.optim.Adam``'s rule and constants,
    closer to putting ``s`` into an Adam model optimizer). The coefficients of a step use ``s``
    BEFORE that step's update (the gradient of both ``theta`` and ``s`` is taken at the same
    point, as when one optimizer steps both). The ``1/2 s_k`` terms do not depend on the model,
    so the model's gradient is exactly that of the paper's objective.

    State (``balancer_state``, saved by ``state_dict``): ``log_vars`` (``s``, list of K
    floats), ``num_updates``, and with ``update="adam"`` ``adam`` (step, first and second
    moments). A skipped or rejected step leaves it untouched (the engine's snapshot);
    ``reset_state()`` forgets it (back to ``init``, no Adam moments).

    Args:
        optimizer: the inner optimizer over all model parameters.
        num_tasks: K (inferred from the first call when ``None``).
        lr: step size of ``s`` (default 0.01; 0 freezes ``s``). With ``update="sgd"`` the
            update contracts near its fixed point for ``lr < 4`` whatever the loss scale, but a
            loss far above 1 makes the first steps overshoot (``s`` jumps by about
            ``lr a_k L_k``) and the way back is slow: use ``update="adam"`` for such losses.
        update: ``"sgd"`` (default) or ``"adam"``.
        variant: ``"regression"`` (default, ``a = 1/2``), ``"classification"`` (``a = 1``), or
            one of them per task (a sequence of K strings).
        init: initial ``s`` for every task (default 0: ``sigma^2 = 1``, the paper; LibMTL -0.5).
        **kwargs: options of :class:`mtl.BalancedOptimizer` (``on_nonfinite``, ``task_names``,
            ``process_group``, ``compute_gram`` for diagnostics). ``weight_heads`` is always
            ``True`` (the heads receive ``c_k grad L_k``, as in the paper).

    ``BalanceInfo.extras``: ``log_vars`` (``s`` used for this step's coefficients),
    ``next_log_vars`` (after the update) and ``grad_log_vars``.
    """

    requires_gram = False
    uses_gradients = False

    _KEYS = ("log_vars", "num_updates", "adam")

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        lr: float = DEFAULT_LR,
        update: Update = "sgd",
        variant: Variant | Sequence[Variant] = "regression",
        init: float = 0.0,
        **kwargs: Any,
    ) -> None:
        lr = check_positive("lr", lr, allow_zero=True)
        update = check_choice("update", update, _UPDATES)  # type: ignore[assignment]
        init = check_real("init", init)
        if isinstance(variant, str):
            check_choice("variant", variant, _VARIANTS)
            variants: str | list[str] = variant
        elif isinstance(variant, (list, tuple)):
            variants = [check_choice(f"variant[{i}]", v, _VARIANTS) for i, v in enumerate(variant)]
            if num_tasks is not None and len(variants) != num_tasks:
                raise ValueError(f"variant has {len(variants)} entries but num_tasks={num_tasks}")
        else:
            raise TypeError(
                f"variant must be 'regression', 'classification' or a sequence of them, got "
                f"{variant!r}"
            )
        super().__init__(optimizer, num_tasks, **loss_level_kwargs(kwargs, "UW"))
        self.lr = lr
        self.update: str = update
        self.variant = variants
        self.init = init

    def _repr_options(self) -> str:
        return (
            f"lr={self.lr}, update={self.update!r}, variant={self.variant!r}, init={self.init}, "
            f"{super()._repr_options()}"
        )

    @property
    def log_vars(self) -> np.ndarray | None:
        """The current ``s = log sigma^2`` (a copy), or ``None`` before the first step."""
        return self._state_copy("log_vars")

    def _factors(self, k: int) -> np.ndarray:
        if isinstance(self.variant, str):
            return np.full(k, _FACTORS[self.variant])
        if len(self.variant) != k:
            raise ValueError(f"variant has {len(self.variant)} entries but there are {k} tasks")
        return np.array([_FACTORS[v] for v in self.variant])

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        """Checks every entry first (ValueError naming the key), then replaces the state."""
        self.balancer_state, _ = check_learned_state(
            state,
            self._KEYS,
            "UW",
            self.num_tasks,
            vector="log_vars",
            counts=("num_updates",),
            update=self.update,
        )

    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """``c = a e^{-s}`` from the current ``s``, then one update of ``s`` (host only)."""
        k = losses.shape[0]
        st = self.balancer_state
        s = np.array(st.get("log_vars", [self.init] * k), dtype=np.float64)
        if s.shape != (k,):
            raise ValueError(f"UW state has {s.shape[0]} log-variances but this step has {k} tasks")
        a = self._factors(k)
        c = uw_coefficients(s, a)
        grad = uw_gradient(s, losses, a)
        adam = st.get("adam")
        if self.update == "adam":
            new_s, adam = adam_step(s, grad, adam, lr=self.lr)
        else:
            new_s = s - self.lr * grad
        if not (np.isfinite(new_s).all() and np.isfinite(c).all()):  # state left as it was
            raise NonFiniteError(
                f"UW produced non-finite coefficients {c.tolist()} or log-variances "
                f"{new_s.tolist()}"
            )
        st["log_vars"] = new_s.tolist()
        st["num_updates"] = int(st.get("num_updates", 0)) + 1
        if adam is not None:
            st["adam"] = adam
        return c, {"log_vars": s, "next_log_vars": new_s, "grad_log_vars": grad}
