"""RLW: random loss weighting (Lin et al., TMLR 2022), a loss-level method.

Lin, Ye, Xu, Shi, Zhang, Kwok, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning" (TMLR 2022), Algorithm 2 with the normal distribution::

    eps ~ N(0, I_K),   w = softmax(eps)        (fresh every step; the weights sum to 1)

The normals come from a host ``numpy.random.Generator(PCG64(seed))`` whose state is checkpointed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.optim import Optimizer

from mtl import BalancedOptimizer

from ._learned import check_keys, loss_level_kwargs
from ._rng import pcg64, rng_from_state

__all__ = ["RLW", "rlw_weights"]


def rlw_weights(normals: Any) -> np.ndarray:
    """``softmax(eps)`` of the drawn normals ``eps`` (K,), as a float64 host array."""
    x = np.asarray(normals, dtype=np.float64)
    e = np.exp(x - x.max())
    out: np.ndarray = e / e.sum()
    return out


class RLW(BalancedOptimizer):
    """Random loss weighting (Lin et al., TMLR 2022): ``w = softmax(eps)``, ``eps ~ N(0, I_K)``.

    Per balanced step::

        eps = generator.standard_normal(K)        (host PCG64, float64)
        w = softmax(eps)                          (sum w = 1)
        model: ONE backward of sum_k w_k L_k (heads included)

    Relation to the paper: its Algorithm 2 samples the weights from a distribution ``p`` and
    normalises them with a softmax; the normal ``N(0, I)`` is the paper's default and LibMTL's
    (``F.softmax(torch.randn(K))``). The weights sum to 1, so the loss scale is ``1/K`` of the
    plain sum (as in the paper).

    State: the generator's bit-generator state (a dict of str and int, saved by
    ``state_dict``) and the seed. A skipped or rejected step does not advance the generator (the
    engine restores the state it saved when the step's backward began), so the draws are a
    function of the number of steps taken.

    Args:
        optimizer: the inner optimizer over all model parameters.
        num_tasks: K (inferred from the first call when ``None``).
        seed: seed of the generator (default 0). Under ``torch.distributed`` use the same seed
            on every rank (the default) so the ranks agree.
        **kwargs: options of :class:`mtl.BalancedOptimizer`; ``weight_heads`` is always ``True``.

    ``BalanceInfo.extras``: ``normals`` (the drawn ``eps``).
    """

    requires_gram = False
    uses_gradients = False
    accepts_seed = True

    def __init__(
        self, optimizer: Optimizer, num_tasks: int | None = None, *, seed: int = 0, **kwargs: Any
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        super().__init__(optimizer, num_tasks, **loss_level_kwargs(kwargs, "RLW"))
        self.seed = seed
        self.generator = pcg64(seed)

    def _repr_options(self) -> str:
        return f"seed={self.seed}, {super()._repr_options()}"

    def _balancer_state_dict(self) -> dict[str, Any]:
        # a fresh plain dict of str and int (PCG64's 128-bit state and increment)
        return {"seed": self.seed, "generator": self.generator.bit_generator.state}

    def _load_balancer_state_dict(self, state: dict[str, Any]) -> None:
        """Checks the generator state first (ValueError naming the key), then replaces it."""
        state = check_keys(state, ("seed", "generator"), "RLW")
        if not state:  # an optimizer that never saved anything: start over from the seed
            self.generator = pcg64(self.seed)
            return
        if "generator" not in state:
            raise ValueError("RLW state has no 'generator' (the PCG64 bit-generator state)")
        seed = state.get("seed", self.seed)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"RLW state 'seed' must be an int, got {seed!r}")
        rng = rng_from_state(state["generator"], "RLW (key 'generator')")
        self.seed, self.generator = seed, rng

    def _compute_weights(
        self, gram: np.ndarray | None, losses: np.ndarray, block_grams: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """``softmax(eps)`` of K fresh standard normals from the host generator."""
        normals = self.generator.standard_normal(losses.shape[0])
        return rlw_weights(normals), {"normals": normals}
