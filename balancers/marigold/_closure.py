"""MARIGOLD's closure plumbing: evaluating the losses at a shifted point with the random state
replayed, shifting parameters in place and back, and keeping ``.grad`` aside meanwhile."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mtl._gram import rescaled_gram

from ._functional import _TINY


# ---------------------------------------------------------------------- helpers
class _NoArg:
    pass


_NOARG = _NoArg()


def _check_modules(modules: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    if modules is None:
        return []
    if isinstance(modules, nn.Module):
        return [modules]
    if isinstance(modules, (list, tuple)):
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"eval_mode_closure[{i}] is a {type(m).__name__}, not an nn.Module")
        return list(modules)
    raise TypeError(
        f"eval_mode_closure must be an nn.Module or a sequence of them, got {type(modules).__name__}"
    )


def _sq_norm(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """``sum |t|^2`` as a 0-d float64 tensor on ``device``, never read back (sparse tensors:
    their coalesced values), with :func:`mtl._gram.rescaled_gram` (float32 chunk products after
    an exact power-of-two scaling, so no float32 over- or underflow; no float64 copy)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        if t.is_sparse:
            t = t.coalesce().values()
        if t.numel():
            total = total + rescaled_gram(t.detach().reshape(1, -1))[0, 0].to(device)
    return total


def _shift_size(sq: Tensor, fd_step: float) -> Tensor:
    """``a = fd_step / sqrt(sq)`` on the device (0-d float64); 0 when ``sq`` is at or below
    1e-30 or not finite (no information: the host discards that closure result)."""
    ok = (sq > _TINY) & torch.isfinite(sq)
    return torch.where(ok, fd_step / torch.sqrt(torch.where(ok, sq, torch.ones_like(sq))), 0.0)


def _stash_grads(params: list[Tensor]) -> list[tuple[Tensor, Tensor | None]]:
    """Move the existing ``.grad`` of ``params`` aside so the next backward writes g_lam alone."""
    stash = [(p, p.grad) for p in params]
    for p in params:
        p.grad = None
    return stash


def _unstash_grads(stash: list[tuple[Tensor, Tensor | None]], *, keep_new: bool) -> None:
    """Put the stashed gradients back, adding the new ones (``keep_new``) or dropping them."""
    for p, old in stash:
        new = p.grad if keep_new else None
        if old is None:
            p.grad = new
        elif new is None:
            p.grad = old
        else:
            p.grad = old + new if old.is_sparse else old.add_(new)


class _Shift:
    """Shift a parameter in place along ``-scale * g`` and restore it bit-exactly from a copy.

    Dense gradients: the whole tensor is saved. Sparse gradients with one sparse dimension
    (``nn.Embedding(sparse=True)``): only the touched rows are saved and shifted.
    """

    def __init__(self, p: Tensor, g: Tensor, a: Tensor) -> None:
        self.p = p
        self.data = p.data
        self.a = a.to(device=p.device, dtype=p.dtype)  # the step size, a 0-d device tensor
        if g.is_sparse and g.sparse_dim() == 1:
            g = g.coalesce()
            self.index: Tensor | None = g.indices()[0]
            self.g = g.values().to(p.dtype)
            self.saved = self.data.index_select(0, self.index).clone()
        else:
            self.index = None
            self.g = (g.to_dense() if g.is_sparse else g).to(p.dtype)
            self.saved = self.data.clone()
        self.shifted = False

    def apply(self, sign: float) -> None:
        """Move to ``theta + sign * a * g`` (``sign`` in {-1, 0, 1}; 0: theta itself)."""
        if self.shifted:
            self._copy_back()
        if sign != 0.0:
            if self.index is None:
                self.data.addcmul_(self.g, self.a, value=sign)
            else:
                self.data.index_add_(0, self.index, self.g * self.a, alpha=sign)
            self.shifted = True

    def _copy_back(self) -> None:
        if self.index is None:
            self.data.copy_(self.saved)
        else:
            self.data.index_copy_(0, self.index, self.saved)
        self.shifted = False

    def restore(self) -> None:
        if self.shifted:
            self._copy_back()


@contextmanager
def _closure_scope(modules: list[nn.Module], cuda: list[int]) -> Iterator[Callable[[], None]]:
    """``no_grad``, given modules in eval mode, RNG forked; yields a function that resets the RNG
    to its state at entry (so every closure call sees the same random draws)."""
    flags = [(m, m.training) for mod in modules for m in mod.modules()]
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in cuda]

        def reset() -> None:
            torch.set_rng_state(cpu_state)
            for d, s in zip(cuda, cuda_states):
                torch.cuda.set_rng_state(s, d)

        try:
            for mod in modules:
                mod.eval()
            yield reset
        finally:
            for m, f in flags:
                m.training = f
