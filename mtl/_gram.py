"""Per-task gradient matrices and their Gram matrix, on the device, without host synchronization.

A ``(K, N)`` matrix holds one flattened task gradient per row (the representation gradients of a
block, or the shared parameters' gradients). Its Gram matrix ``M = R R^T`` is what almost every
balancer consumes. Everything here stays on the tensors' device and never reads a value back to
the host; the caller copies the small Gram matrix once (see :mod:`mtl._host`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "combine_rows",
    "device_gram",
    "gram_matrix",
    "rescaled_gram",
    "suspect_rows",
    "task_rows",
]

#: columns per partial product: each float32 partial sum keeps ~sqrt(CHUNK) * 6e-8 relative error
CHUNK = 1 << 15


def _chunked_products(rows: Tensor, chunk: int) -> Tensor:
    """``rows @ rows.T`` as float32 products over column chunks, summed in float64.

    The full chunks go through ONE batched product on a strided view (no copy, no Python loop:
    a single kernel on a GPU); the remainder is one more product.
    """
    k, n = rows.shape
    whole = n // chunk
    out = torch.zeros(k, k, dtype=torch.float64, device=rows.device)
    if whole:
        body = rows[:, : whole * chunk].reshape(k, whole, chunk)
        parts = torch.matmul(body.transpose(0, 1), body.permute(1, 2, 0))  # (whole, K, K)
        out = parts.to(torch.float64).sum(0)
    if whole * chunk < n:
        tail = rows[:, whole * chunk :]
        out = out + (tail @ tail.T).to(torch.float64)
    return out


def _as_float32(rows: Tensor) -> Tensor:
    return rows if rows.dtype == torch.float32 else rows.float()


def device_gram(rows: Tensor, *, chunk: int = CHUNK) -> Tensor:
    """Float64 Gram matrix ``rows @ rows.T`` of a ``(K, N)`` matrix, with no host synchronization.

    Float64 rows: one float64 product. Lower precision rows (bfloat16/float16 are widened to
    float32 first): float32 products over column chunks of ``chunk`` entries accumulated in
    float64, computed as one batched product. That avoids a float64 copy of the K x N gradients
    and keeps the rounding of each partial product to about ``sqrt(chunk) * 6e-8`` relative; the
    sum over chunks adds no float32 rounding.

    Overflow or underflow of the float32 products shows as a diagonal entry that is infinite or
    below 1e-30: the caller checks its host copy with :func:`suspect_rows` and, if needed, asks
    for :func:`rescaled_gram` (what :func:`gram_matrix` does in one call).
    """
    if rows.dim() != 2:
        raise ValueError(f"rows must be a (K, N) matrix, got shape {tuple(rows.shape)}")
    k, n = rows.shape
    if rows.dtype == torch.float64:
        return rows @ rows.T
    if n == 0:
        return torch.zeros(k, k, dtype=torch.float64, device=rows.device)
    return _chunked_products(_as_float32(rows), chunk)


def gram_matrix(rows: Tensor, *, chunk: int = CHUNK) -> Tensor:
    """Float64 Gram matrix ``rows @ rows.T`` of a ``(K, N)`` matrix of flattened gradients.

    :func:`device_gram`, then (one read of the diagonal on the host) :func:`rescaled_gram` when a
    float32 product over- or underflowed (``GradScaler`` losses scaled by 2^24, tasks whose
    gradients are 1e-20): each row is scaled by a power of two (exact) and the scaling undone in
    float64. Genuinely non-finite gradients still give a non-finite Gram. For diagnostics and
    user code; the balanced step reads the diagonal together with everything else it needs.
    """
    out = device_gram(rows, chunk=chunk)
    if rows.dtype == torch.float64 or rows.shape[1] == 0:
        return out
    if suspect_rows(out.diagonal().tolist()):
        return rescaled_gram(rows, chunk=chunk)
    return out


def suspect_rows(diagonal: Sequence[float]) -> list[int]:
    """Rows whose squared norm (host values) may have over- or underflowed in float32."""
    return [i for i, d in enumerate(diagonal) if not (1e-30 < d < float("inf"))]


def rescaled_gram(rows: Tensor, *, chunk: int = CHUNK) -> Tensor:
    """:func:`gram_matrix` with every row scaled by a power of two that brings its largest entry
    into [1, 2) (exact in floating point), the scaling undone in float64.

    The rescue for float32 over- and underflow: an exactly zero row stays zero (its Gram entries
    are exact zeros), genuinely non-finite gradients still give a non-finite Gram.
    """
    if rows.dtype == torch.float64:
        return rows @ rows.T
    rows = _as_float32(rows)
    # largest magnitude per row from two plain reductions (no |rows| temporary)
    peak = torch.maximum(rows.amax(dim=1), -rows.amin(dim=1))
    exponent = torch.where(peak > 0, torch.floor(torch.log2(peak)), torch.zeros_like(peak))
    exponent = torch.where(torch.isfinite(exponent), exponent, torch.zeros_like(exponent))
    out = _chunked_products(rows * torch.exp2(-exponent)[:, None], chunk)
    unscale = torch.exp2(exponent.to(torch.float64))
    return out * unscale[:, None] * unscale[None, :]


def task_rows(grads: list[Tensor | None], p: Tensor, densify: bool) -> tuple[Tensor, Tensor | None]:
    """The K task gradients of one parameter as a ``(K, n)`` matrix.

    Sparse gradients (``nn.Embedding(sparse=True)``) stay sparse: only the rows touched by some
    task enter the matrix (the union of their row ids is returned), so a 1M-row table costs what
    the batch touches, not K dense copies. ``densify`` (DDP) forces dense rows. (Sparse
    gradients need ``coalesce``/``unique``, whose output sizes depend on the data: on a GPU they
    synchronize; dense parameters never do.)
    """
    sparse = [g for g in grads if g is not None and g.is_sparse]
    if sparse and not densify and all(g.sparse_dim() == 1 for g in sparse):
        coalesced = [None if g is None else g.coalesce() for g in grads]
        if all(c is not None and c.is_sparse for c in coalesced):
            ids = torch.unique(torch.cat([c.indices()[0] for c in coalesced if c is not None]))
            tail = sparse[0].shape[1:]
            out = torch.zeros(
                len(grads), ids.numel(), *tail, dtype=sparse[0].dtype, device=sparse[0].device
            )
            for k, c in enumerate(coalesced):
                assert c is not None
                out[k].index_copy_(0, torch.searchsorted(ids, c.indices()[0]), c.values())
            return out.reshape(len(grads), -1), ids
    dense = p.new_zeros(len(grads), p.numel())
    for k, g in enumerate(grads):
        if g is not None:
            dense[k].copy_((g.to_dense() if g.is_sparse else g).reshape(-1))
    return dense, None


def combine_rows(flat: Tensor, ids: Tensor | None, p: Tensor) -> Tensor:
    """``sum_k c_k g_k`` for one parameter, sparse again when the rows were."""
    if ids is None:
        return flat.view_as(p)
    values = flat.view(ids.numel(), *p.shape[1:])
    return torch.sparse_coo_tensor(
        ids.unsqueeze(0), values, p.shape, is_coalesced=True, check_invariants=False
    )
