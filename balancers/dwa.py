"""DWA: dynamic weight average (Liu, Johns, Davison, CVPR 2019), a loss-level method.

Liu et al., "End-to-End Multi-Task Learning with Attention" (CVPR 2019), Eq. 1::

    w_k(t) = K exp(r_k(t-1) / T) / sum_j exp(r_j(t-1) / T),    r_k(t-1) = Lbar_k(t-1) / Lbar_k(t-2)

``Lbar_k(t)`` is the average loss of task ``k`` over epoch ``t`` in the paper; here over a
*window* of ``window`` balanced steps (an "epoch" is a window the user chooses), or over what the
user marks with :meth:`DWA.end_window` (``window=None``). ``T = 2``; ``w = 1`` during the first two
windows (no ratio yet). The weights sum to K.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._learned import check_keys, count, float_list, loss_level_kwargs
from ._options import check_positive

__all__ = ["DWA", "dwa_weights"]

#: the paper's temperature
DEFAULT_TEMPERATURE = 2.0
#: default window length, in balanced steps (set it to your epoch length for the paper's rule)
DEFAULT_WINDOW = 100


def dwa_weights(previous: Any, older: Any, temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """``w = K softmax(r / T)`` with ``r = previous / older`` (float64 host array).

    Args:
        previous: ``Lbar(t-1)``, the average losses of the last completed window (K,).
        older: ``Lbar(t-2)``, those of the window before (K,); no entry may be zero.
        temperature: ``T > 0``.
    """
    prev = np.asarray(previous, dtype=np.float64)
    old = np.asarray(older, dtype=np.float64)
    if prev.shape != old.shape or prev.ndim != 1:
        raise ValueError(f"previous and older must be (K,) arrays, got {prev.shape}, {old.shape}")
    if (old == 0).any():
        raise ValueError(f"older average losses must be non-zero, got {old.tolist()}")
    x = prev / old / check_positive("temperature", temperature)
    e = np.exp(x - x.max())
    out: np.ndarray = prev.shape[0] * e / e.sum()
    return out


class DWA(BalancedOptimizer):
    """Dynamic weight average (Liu et al., CVPR 2019): weights from the loss descent rates.

    Formula (Eq. 1 of the paper, per balanced step)::

        w_k = K exp(r_k / T) / sum_j exp(r_j / T),   r_k = Lbar_k(t-1) / Lbar_k(t-2)
        model: ONE backward of sum_k w_k L_k (heads included)

    ``Lbar_k(t-1)`` and ``Lbar_k(t-2)`` are the average losses of task ``k`` over the last two
    completed windows; ``w = 1`` until two windows are complete. The current step's losses are
    then added to the current window, which is completed after ``window`` balanced steps (each
    :meth:`backward` call counts one, so gradient accumulation counts every micro-batch) or when
    :meth:`end_window` is called.

    Relation to the paper: the paper averages the training loss over each epoch (LibMTL and
    TorchJD likewise; TorchJD's scalarizer needs a call per epoch). A window of ``window``
    steps replaces the epoch (``window`` = steps per epoch gives the paper's rule when epochs
    have a fixed length); with ``window=None`` windows end only at :meth:`end_window` (call it
    after ``step()`` at the end of each epoch). Losses only enter through ratios of window
    averages, so no per-task gradient is needed.

    State (``balancer_state``): ``sums`` (the current window's loss sums, or ``None``),
    ``count`` (its steps), ``averages`` (the last two completed windows' averages, oldest first)
    and ``num_windows``. A skipped or rejected step adds nothing to the window.

    Args:
        optimizer: the inner optimizer over all model parameters.
        num_tasks: K (inferred from the first call when ``None``).
        temperature: ``T > 0`` (default 2, the paper's; larger = more uniform weights).
        window: steps per window (default 100), or ``None`` to end windows with
            :meth:`end_window` only.
        **kwargs: options of :class:`mtl.BalancedOptimizer`; ``weight_heads`` is always ``True``.

    ``BalanceInfo.extras``: ``ratios`` (``r``, or ``None`` during the first two windows),
    ``window_count`` (steps in the current window after this one) and ``num_windows``
    (completed windows).

    A window average of zero (a task whose loss was exactly 0 for a whole window) makes the next
    ratio undefined: ``ValueError`` naming the task.
    """

    requires_gram = False
    uses_gradients = False

    _KEYS = ("sums", "count", "averages", "num_windows")

    def __init__(
        self,
        optimizer: Optimizer,
        num_tasks: int | None = None,
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        window: int | None = DEFAULT_WINDOW,
        **kwargs: Any,
    ) -> None:
        temperature = check_positive("temperature", temperature)
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int):
                raise TypeError(f"window must be a positive int or None, got {window!r}")
            if window < 1:
                raise ValueError(f"window must be a positive int or None, got {window!r}")
        super().__init__(optimizer, num_tasks, **loss_level_kwargs(kwargs, "DWA"))
        self.temperature = temperature
        self.window = window

    def _repr_options(self) -> str:
        return f"temperature={self.temperature}, window={self.window}, {super()._repr_options()}"

    def reset_state(self) -> None:
        """Forget the loss history (the weights are 1 for the next two windows)."""
        self.balancer_state = {}

    def end_window(self) -> None:
        """Complete the current window now (e.g. at the end of an epoch, after ``step()``).

        A window without any step is ignored.
        """
        st = self.balancer_state
        n = int(st.get("count", 0))
        if n == 0 or st.get("sums") is None:
            return
        average = [v / n for v in st["sums"]]
        st["averages"] = [*st.get("averages", []), average][-2:]
        st["num_windows"] = int(st.get("num_windows", 0)) + 1
        st["sums"], st["count"] = None, 0

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        """Checks every entry first (ValueError naming the key), then replaces the state."""
        state = check_keys(state, self._KEYS, "DWA")
        k = self.num_tasks
        new: dict[str, Any] = {}
        if "averages" in state:
            avgs = state["averages"]
            if not isinstance(avgs, (list, tuple)) or len(avgs) > 2:
                raise ValueError("DWA state 'averages' must be a list of at most two vectors")
            new["averages"] = [float_list(a, "averages", "DWA", k) for a in avgs]
            if new["averages"]:
                k = len(new["averages"][0])
        if "sums" in state:
            sums = state["sums"]
            new["sums"] = None if sums is None else float_list(sums, "sums", "DWA", k)
        if "count" in state:
            new["count"] = count(state["count"], "count", "DWA")
            if new["count"] > 0 and new.get("sums") is None:
                raise ValueError("DWA state 'count' is positive but 'sums' is missing")
        if "num_windows" in state:
            new["num_windows"] = count(state["num_windows"], "num_windows", "DWA")
        self.balancer_state = new

    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The weights from the two last window averages, then this step's losses join the
        current window (completed after ``window`` steps)."""
        k = losses.shape[0]
        st = self.balancer_state
        averages = st.get("averages", [])
        sums = st.get("sums")
        if any(len(a) != k for a in averages) or (sums is not None and len(sums) != k):
            raise ValueError(f"DWA state is for a different number of tasks than this step's {k}")
        ratios = None
        if len(averages) >= 2:
            older = np.asarray(averages[-2], dtype=np.float64)
            zero = [i for i in range(k) if older[i] == 0.0]
            if zero:
                names = ", ".join(self._name(i) for i in zero)
                raise ValueError(
                    f"DWA: the average loss of {names} over a window is 0, so its descent rate "
                    "Lbar(t-1)/Lbar(t-2) is undefined"
                )
            previous = np.asarray(averages[-1], dtype=np.float64)
            ratios = previous / older
            weights = dwa_weights(previous, older, self.temperature)
        else:
            weights = np.ones(k)
        new_sums = losses.tolist() if sums is None else (np.asarray(sums) + losses).tolist()
        st["sums"], st["count"] = new_sums, int(st.get("count", 0)) + 1
        if self.window is not None and st["count"] >= self.window:
            self.end_window()
        extras = {
            "ratios": ratios,
            "window_count": int(st["count"]),
            "num_windows": int(st.get("num_windows", 0)),
        }
        return weights, extras
