"""MARIGOLD's host math [R]: the normalised estimate, the weight step, the Gaussian-smoothing
estimate, the state's domain check and its host/checkpoint conversion (``docs/methods.md``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._host import host_array, to_torch
from .._min_norm import _project_simplex_np, project_simplex

#: option and argument types
Estimator = Literal["fd", "amortized", "gaussian"]
Parametrization = Literal["simplex", "softmax"]
Normalize = Literal["auto", "grad_norm", "max_abs", "none"]
FDScheme = Literal["forward", "forward_closure", "central"]
StepControl = Literal["secant", "none"]
Level = Literal["representation", "parameters"]
Closure = Callable[..., Sequence[Tensor | float] | Tensor]

_ESTIMATORS = ("fd", "amortized", "gaussian")


_PARAMETRIZATIONS = ("simplex", "softmax")


_NORMALIZE = ("auto", "grad_norm", "max_abs", "none")


_FD_SCHEMES = ("forward", "forward_closure", "central")


_STEP_CONTROLS = ("secant", "none")


#: default weight step size (dimensionless with the default normalisation)
DEFAULT_LR_WEIGHTS = 0.05


#: default norm of the finite-difference shift, in units of the balance point (parameters or z)
DEFAULT_FD_STEP = 1e-3


#: weight moves smaller than this (max-abs, on the simplex) are not used by the step control
_MIN_MOVE = 1e-10


#: squared gradient norms at or below this are treated as zero (no information, lam unchanged)
_TINY = 1e-30


# ---------------------------------------------------------------------- pure functions
def normalize_estimate(h: Tensor, mode: str, grad_norm_sq: float | None = None) -> Tensor:
    """Scale-free version ``n(h)`` of an estimate ``h ~ M lam`` (float64).

    * ``"grad_norm"``: ``h / |g_lam|^2``. For the exact ``h = M lam`` this is
      ``g_i . g_lam / |g_lam|^2``, the relative directional derivative of task ``i``: it equals 1
      for every task on the support of the MGDA weights at their optimum (KKT) and its
      ``lam``-average is always 1. Needs ``grad_norm_sq = |g_lam|^2``.
    * ``"max_abs"``: ``h / max_i |h_i|`` (needs nothing else; every entry in [-1, 1]).
    * ``"none"``: ``h`` unchanged (units of squared gradients: the step shrinks with them).

    A zero scale (zero gradient, zero estimate) gives a zero vector: no information, no step.
    """
    return to_torch(_normalize_np(host_array(h), mode, grad_norm_sq), h.device)


def marigold_step(
    weights: Tensor,
    h_normalized: Tensor,
    lr: float,
    *,
    parametrization: str = "simplex",
    logits: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One upper-level step; returns ``(new_weights, new_logits)`` (logits ``None`` for simplex).

    * ``"simplex"``: ``lam' = Proj_simplex(lam - lr * n)`` (Euclidean projection, Duchi et al.).
      Fixed points are exactly the KKT points of ``min_{lam in simplex} lam^T M lam`` when
      ``n`` is a positive multiple of ``M lam``: ``n_i = c`` where ``lam_i > 0``, ``n_i >= c``
      elsewhere, i.e. the MGDA weights.
    * ``"softmax"``: ``xi' = xi - lr * J^T n`` with ``J = diag(lam) - lam lam^T`` the softmax
      Jacobian, i.e. ``xi' = xi - lr * lam * (n - lam . n)``; ``lam' = softmax(xi')``. Interior
      fixed points are the same; a zero MGDA weight is only approached asymptotically.
    """
    lam = weights.detach().to(torch.float64)
    n = h_normalized.detach().to(torch.float64).to(lam.device)
    if parametrization == "simplex":
        return project_simplex(lam - lr * n), None
    if parametrization == "softmax":
        if logits is None:
            raise ValueError("parametrization='softmax' needs the current logits")
        xi = logits.detach().to(torch.float64) - lr * lam * (n - torch.dot(lam, n))
        return torch.softmax(xi, 0), xi
    raise ValueError(f"parametrization must be one of {_PARAMETRIZATIONS}, got {parametrization!r}")


def gaussian_smoothing_estimate(
    objective: Callable[[Tensor], Tensor | float],
    weights: Tensor,
    *,
    num_perturbations: int,
    mu: float,
    generator: torch.Generator | None = None,
    project: bool = True,
    value: float | None = None,
) -> Tensor:
    """Gaussian-smoothing zeroth-order gradient of ``objective`` at ``weights`` (E3) [R].

    ``g = (1/q) sum_{j=1..q} (F(lam + mu u_j) - F(lam)) / mu * u_j`` with ``u_j ~ N(0, I_K)``
    (float64, drawn from ``generator``), projected on ``{sum u = 0}`` when ``project`` (the
    simplex's tangent space; ``E[g] = P grad F`` with ``P = I - 11^T/K`` then). For a quadratic
    ``F`` the estimator is unbiased for any ``mu`` (the odd moments of ``u`` vanish).

    Args:
        objective: ``F``, called with a ``(K,)`` float64 tensor; returns a scalar.
        weights: ``lam``, ``(K,)``.
        num_perturbations: ``q >= 1``.
        mu: smoothing radius ``> 0``.
        generator: source of the directions (``None``: the global CPU generator).
        project: project the directions on ``{sum u = 0}`` (default ``True``).
        value: ``F(lam)`` when already known (saves one evaluation).
    """
    if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int):
        raise TypeError(f"num_perturbations must be an int, got {num_perturbations!r}")
    if num_perturbations < 1:
        raise ValueError(f"num_perturbations must be >= 1, got {num_perturbations}")
    if not (math.isfinite(mu) and mu > 0):
        raise ValueError(f"mu must be a positive finite number, got {mu!r}")
    lam = weights.detach().to(torch.float64).cpu()
    k = lam.numel()
    u = torch.randn(num_perturbations, k, generator=generator, dtype=torch.float64)
    if project:
        u = u - u.mean(1, keepdim=True)
    f0 = float(objective(lam)) if value is None else float(value)
    perturbed = np.array([float(objective(lam + mu * u[j])) for j in range(num_perturbations)])
    return torch.from_numpy(gaussian_estimate_np(u.numpy(), perturbed, f0, mu))


def gaussian_estimate_np(u: np.ndarray, perturbed: np.ndarray, f0: float, mu: float) -> np.ndarray:
    """E3 on the host: ``(1/q) sum_j (F(lam + mu u_j) - F(lam)) / mu * u_j`` from the ``q``
    directions ``u`` (``(q, K)``) and the values ``perturbed[j] = F(lam + mu u_j)``. The one
    implementation of the estimate: :func:`gaussian_smoothing_estimate` and MARIGOLD's
    ``estimator="gaussian"`` both call it."""
    est: np.ndarray = ((np.asarray(perturbed, dtype=np.float64) - f0) / mu) @ u / u.shape[0]
    return est


def _check_lam(state: dict[str, Any], parametrization: str, num_tasks: int | None) -> None:
    """A saved lam must lie on its domain: finite, on the simplex (both parametrizations), of
    K entries, and for ``"softmax"`` equal to the softmax of finite saved logits."""
    lam = np.asarray(state["weights"], dtype=np.float64)
    k = num_tasks if num_tasks is not None else lam.shape[0] if lam.ndim == 1 else -1
    if lam.ndim != 1 or lam.shape[0] != k:
        raise ValueError(f"MARIGOLD state_dict: 'weights' must have shape ({k},), got {lam.shape}")
    if not np.isfinite(lam).all() or (lam < 0).any() or abs(lam.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"MARIGOLD state_dict: 'weights' must lie on the simplex (finite, >= 0, sum 1), "
            f"got {lam.tolist()}"
        )
    if parametrization == "softmax":
        logits = np.asarray(state.get("logits"), dtype=np.float64)
        if logits.shape != lam.shape or not np.isfinite(logits).all():
            raise ValueError(
                f"MARIGOLD state_dict: 'logits' must be {k} finite numbers, got {logits.tolist()}"
            )
        soft = np.exp(logits - logits.max())
        if np.abs(soft / soft.sum() - lam).max() > 1e-6:
            raise ValueError("MARIGOLD state_dict: 'weights' is not the softmax of 'logits'")


def _host_vector(t: Tensor) -> np.ndarray:
    """A state tensor put in from outside, as a writable float64 host array (one copy)."""
    return np.array(host_array(t, np.float64), dtype=np.float64)


def _to_numpy_tree(obj: Any) -> Any:
    """Tensors (the checkpoint's float64 vectors) in nested dicts/lists as host arrays."""
    if isinstance(obj, Tensor):
        return _host_vector(obj) if obj.is_floating_point() else host_array(obj, None).copy()
    if isinstance(obj, dict):
        return {key: _to_numpy_tree(v) for key, v in obj.items()}
    if isinstance(obj, list):
        return [_to_numpy_tree(v) for v in obj]
    return obj


def _to_torch_tree(obj: Any) -> Any:
    """Host arrays in nested dicts/lists as CPU tensors (copies)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {key: _to_torch_tree(v) for key, v in obj.items()}
    if isinstance(obj, list):
        return [_to_torch_tree(v) for v in obj]
    return obj


def _normalize_np(h: np.ndarray, mode: str, grad_norm_sq: float | None) -> np.ndarray:
    """:func:`normalize_estimate` on the host."""
    if mode == "none":
        return h.copy()
    if mode == "max_abs":
        scale = float(np.abs(h).max()) if h.size else 0.0
    elif mode == "grad_norm":
        if grad_norm_sq is None:
            raise ValueError("normalize='grad_norm' needs grad_norm_sq = |g_lam|^2")
        scale = float(grad_norm_sq)
    else:
        raise ValueError(f"normalize must be one of {_NORMALIZE[1:]}, got {mode!r}")
    if not math.isfinite(scale) or scale <= _TINY:
        return np.zeros_like(h)
    return h / scale


def _step_np(
    lam: np.ndarray, n: np.ndarray, lr: float, parametrization: str, logits: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`marigold_step` on the host."""
    if parametrization == "simplex":
        return _project_simplex_np(lam - lr * n), None
    if logits is None:
        raise ValueError("parametrization='softmax' needs the current logits")
    xi = logits - lr * lam * (n - float(lam @ n))
    e = np.exp(xi - xi.max())
    return e / e.sum(), xi
