"""One MARIGOLD step at the parameter level and at the representation level: the weighted
gradient, the estimator's extra evaluations, the ONE host transfer, the verdict and the update."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mtl import BalanceInfo
from mtl._combine import (
    accumulate_head_grads,
    register_grad_hook,
    replace_grad,
    weighted_sum,
)
from mtl._verdict import reject_step

from .._rerun import cuda_indices
from ._closure import (
    _NOARG,
    _Shift,
    _shift_size,
    _sq_norm,
    _stash_grads,
    _unstash_grads,
)
from ._functional import Closure, Level
from ._update import amortized_estimate, fd_estimate, finish, remember

if TYPE_CHECKING:
    from ._optimizer import MARIGOLD


def marigold_parameters(
    opt: MARIGOLD,
    losses: list[Tensor],
    values: Tensor,
    params: list[Tensor],
    closure: Closure | None,
) -> BalanceInfo:
    k = len(losses)
    lam = opt._coefficients()
    heads = opt._heads(params)
    # F(lam + mu u_j): needs the graph, so before step 2
    u, perturbed = _perturbed(opt, losses, lam, params, values.device)
    stash = _stash_grads(params + heads)
    try:
        if opt.weight_heads or not heads:
            torch.autograd.backward(weighted_sum(losses, lam), inputs=params + heads)
        else:
            torch.autograd.backward(weighted_sum(losses, lam), inputs=params, retain_graph=True)
            torch.autograd.backward(weighted_sum(losses, None), inputs=heads)
        # read after BOTH calls: under DDP the averaged (global) g_lam is final only then,
        # and it is identical on every rank (so are the checks below)
        fresh = [p.grad for p in params]
        grad_sq_dev = _sq_norm([g for g in fresh if g is not None], values.device)
        raw: list[Tensor] = []
        if opt.estimator == "fd":
            assert closure is not None
            raw = fd_parameters(opt, closure, values, params, fresh, grad_sq_dev, k)
        # every rank shifted by the same global g: the losses' and the closure losses' sums
        # (one all-reduce), then the step's ONE host transfer
        value_sums, raw_sums, scalars = opt._gather(values, raw, [grad_sq_dev, *perturbed], k)
    except BaseException:
        _unstash_grads(stash, keep_new=False)
        raise
    world = opt._world()
    host_values = value_sums / world
    grad_sq = float(scalars[0])
    bad = opt._bad(host_values)
    if bad:
        _unstash_grads(stash, keep_new=False)
        return reject_step(opt, "parameters", host_values, "loss", bad)
    if not math.isfinite(grad_sq) or not np.isfinite(scalars[1:]).all():
        _unstash_grads(stash, keep_new=False)
        return reject_step(opt, "parameters", host_values, "gradient", opt._support())
    h, extras = _estimate(opt, value_sums, raw_sums, grad_sq, world, u, scalars[1:], grad_sq)
    if h is not None and not np.isfinite(h).all():
        _unstash_grads(stash, keep_new=False)
        return reject_step(
            opt, "parameters", host_values, "loss at the shifted parameters", opt._bad(h)
        )
    _unstash_grads(stash, keep_new=True)
    return _conclude(opt, "parameters", host_values, h, grad_sq, extras, remembered=grad_sq)


def fd_parameters(
    opt: MARIGOLD,
    closure: Closure,
    values: Tensor,
    params: list[Tensor],
    grads: list[Tensor | None],
    grad_sq: Tensor,
    k: int,
) -> list[Tensor]:
    """The closure losses at the shifted parameters (one row per call, on the device). The
    shift ``a g`` with ``a = fd_step / |g|`` is computed on the device (``a = 0`` for a
    gradient too small to carry information: the closure then sees theta itself and its
    result is not used)."""
    a = _shift_size(grad_sq, opt.fd_step)
    shifts = [_Shift(p, g, a) for p, g in zip(params, grads) if g is not None]
    cuda = cuda_indices(params)

    def at(sign: float) -> Callable[[], Any]:
        def setup() -> Any:
            for s in shifts:
                s.apply(sign)
            return _NOARG

        return setup

    try:
        return opt._evaluate(closure, k, values.device, cuda, points(opt, at))
    finally:
        for s in shifts:
            s.restore()


def points(opt: MARIGOLD, at: Callable[[float], Callable[[], Any]]) -> list[Callable[[], Any]]:
    if opt.fd_scheme == "forward":
        return [at(-1.0)]
    if opt.fd_scheme == "forward_closure":
        return [at(0.0), at(-1.0)]
    return [at(1.0), at(-1.0)]


def marigold_representation(
    opt: MARIGOLD,
    losses: list[Tensor],
    values: Tensor,
    blocks: list[Tensor],
    heads: list[list[Tensor]] | None,
    representation: Any,
    closure: Closure | None,
) -> BalanceInfo:
    k = len(losses)
    lam = opt._coefficients()
    # heads disjoint from the trunk: the heads' gradients come with g_z and the final
    # backward runs through the trunk only (the heads are traversed once, as in a plain step)
    if heads is None:
        gs = torch.autograd.grad(
            weighted_sum(losses, lam), blocks, retain_graph=True, allow_unused=True
        )
        gz = [torch.zeros_like(z) if g is None else g for z, g in zip(blocks, gs)]
        head_grads: list[tuple[Tensor | None, ...]] = []
    else:
        gz, head_grads = gradients_with_heads(opt, losses, blocks, heads, lam)
    local_sq = _sq_norm(gz, values.device)
    u, perturbed = _perturbed(opt, losses, lam, blocks, values.device)
    # Under DDP the ranks hold disjoint rows of the global Z: |g_z|^2 of the global batch is
    # sum_r |g_z,r|^2 / W^2, and the single-process shift of rank r's rows is
    # fd_step * g_z,r / sqrt(sum_r |g_z,r|^2). One all-reduce (sum) before the closure, on
    # the device: the shift is computed there, nothing is read back before the closure.
    (summed,) = opt._reduce_parts([(torch.stack([local_sq, *perturbed]), 0)])
    raw: list[Tensor] = []
    if opt.estimator == "fd":
        assert closure is not None
        raw = fd_representation(opt, closure, values, blocks, gz, summed[0], k, representation)
    value_sums, raw_sums, scalars = opt._gather(values, raw, [summed], k)
    scalars = scalars.reshape(-1)
    world = opt._world()
    host_values = value_sums / world
    bad = opt._bad(host_values)
    if bad:
        return reject_step(opt, "representation", host_values, "loss", bad)
    shift_sq = float(scalars[0])
    grad_sq = shift_sq / world**2
    if not np.isfinite(scalars).all():
        return reject_step(opt, "representation", host_values, "gradient", opt._support())
    # representation-level Gram convention under DDP: sum_r / W^2
    h, extras = _estimate(
        opt, value_sums, raw_sums, shift_sq, world**2, u, scalars[1:] / world**2, grad_sq
    )
    if h is not None and not np.isfinite(h).all():  # NaN on any rank reaches every rank
        return reject_step(
            opt, "representation", host_values, "loss at the shifted representation", opt._bad(h)
        )
    coef = lam if opt.weight_heads else None
    if heads is not None:
        torch.autograd.backward(blocks, grad_tensors=gz)  # the trunk only
        accumulate_head_grads(heads, head_grads, coef)
    else:
        # the model's gradient: ONE backward; z's incoming gradient is replaced by g_z
        handles = [register_grad_hook(z, replace_grad(g)) for z, g in zip(blocks, gz)]
        try:
            torch.autograd.backward(weighted_sum(losses, coef))
        finally:
            for hd in handles:
                hd.remove()
    return _conclude(opt, "representation", host_values, h, grad_sq, extras, remembered=None)


def _perturbed(
    opt: MARIGOLD,
    losses: list[Tensor],
    lam: list[float],
    inputs: list[Tensor],
    device: torch.device,
) -> tuple[np.ndarray | None, list[Tensor]]:
    """The gaussian estimator's directions ``u`` and, per direction ``j``, half the squared
    norm of ``d(sum_k (lam_k + mu u_jk) L_k)/d inputs`` (on the device); ``(None, [])`` for the
    other estimators. Keeps the graph."""
    if opt.estimator != "gaussian":
        return None, []
    u = opt._directions(len(losses))
    perturbed: list[Tensor] = []
    for j in range(opt.num_perturbations):
        cs = [c + opt.mu * float(x) for c, x in zip(lam, u[j])]
        gs = torch.autograd.grad(
            weighted_sum(losses, cs), inputs, retain_graph=True, allow_unused=True
        )
        perturbed.append(0.5 * _sq_norm([g for g in gs if g is not None], device))
    return u, perturbed


def _estimate(
    opt: MARIGOLD,
    value_sums: np.ndarray,
    raw_sums: np.ndarray,
    shift_sq: float,
    divisor: float,
    u: np.ndarray | None,
    perturbed: np.ndarray,
    grad_sq: float,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """``(h, extras)`` of the ``"fd"`` and ``"gaussian"`` estimators from the step's host
    copy (``h = None`` for ``"amortized"``, which :func:`_conclude` estimates)."""
    extras: dict[str, Any] = {"fd_step_size": None, "closure_calls": 0}
    if opt.estimator == "fd":
        return fd_estimate(opt, value_sums, raw_sums, shift_sq, divisor)
    if opt.estimator == "gaussian":
        assert u is not None
        return opt._gaussian_from_values(u, perturbed, 0.5 * grad_sq), extras
    return None, extras


def _conclude(
    opt: MARIGOLD,
    level: Level,
    host_values: np.ndarray,
    h: np.ndarray | None,
    grad_sq: float,
    extras: dict[str, Any],
    *,
    remembered: float | None,
) -> BalanceInfo:
    """The weight update from the estimate ``h`` (the amortized one is made here), the
    history kept for the next step (``remembered``: the ``|g|^2`` it records) and the info."""
    if opt.estimator == "amortized":
        h = amortized_estimate(opt, host_values)
    used, diagnostics = finish(opt, host_values, h, grad_sq, extras)
    remember(opt, host_values, used, remembered)
    return opt._result(level, used, host_values, diagnostics)


def gradients_with_heads(
    opt: MARIGOLD,
    losses: list[Tensor],
    blocks: list[Tensor],
    heads: list[list[Tensor]],
    lam: list[float],
) -> tuple[list[Tensor], list[tuple[Tensor | None, ...]]]:
    """``g_z = d(sum_k lam_k L_k)/dz`` and each task's head gradients ``dL_k/dheads[k]``,
    from one pass per task that stops at the representation (the heads' total work is one
    traversal, as in a plain backward); ``g_z`` accumulated as the passes come in, so no K
    per-task gradients are held (unlike the Gram methods' ``_task_representation_grads``,
    whose row matrix MARIGOLD does not need: its memory stays that of one gradient)."""
    n = len(blocks)
    gz = [torch.zeros_like(z) for z in blocks]
    head_grads: list[tuple[Tensor | None, ...]] = []
    for loss, c, params in zip(losses, lam, heads):
        gs = torch.autograd.grad(loss, [*blocks, *params], retain_graph=True, allow_unused=True)
        for acc, g in zip(gz, gs[:n]):
            if g is not None and c != 0.0:
                acc.add_(g, alpha=c)
        head_grads.append(gs[n:])
    return gz, head_grads


def fd_representation(
    opt: MARIGOLD,
    closure: Closure,
    values: Tensor,
    blocks: list[Tensor],
    gz: list[Tensor],
    shift_sq: Tensor,
    k: int,
    representation: Any,
) -> list[Tensor]:
    """The closure losses at the shifted representation (one row per call, on the device).
    ``shift_sq``: ``|g_z|^2`` summed over the ranks (the local one without DDP), a 0-d
    device tensor; the shift ``a g_z``, ``a = fd_step / sqrt(shift_sq)``, is computed on the
    device (``a = 0`` below 1e-30: the closure then sees z itself, its result unused)."""
    a = _shift_size(shift_sq, opt.fd_step)
    base_z = [z.detach() for z in blocks]
    scaled = [a.to(device=g.device, dtype=g.dtype) * g for g in gz]
    cuda = cuda_indices(blocks)

    def at(sign: float) -> Callable[[], Any]:
        def setup() -> Any:
            shifted = [z.add(ag, alpha=sign) if sign != 0.0 else z for z, ag in zip(base_z, scaled)]
            if isinstance(representation, Tensor):
                return shifted[0]
            return type(representation)(shifted)

        return setup

    return opt._evaluate(closure, k, values.device, cuda, points(opt, at))
