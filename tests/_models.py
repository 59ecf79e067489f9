"""Toy multi-task networks shared by the tests (import with ``from _models import ...``).

``TinyNet`` is the trunk + heads toy that several test files used to define on their own: a
small MLP trunk whose output ``z`` is the balance point, and ``K`` small MLP heads with squared-
error losses. Its defaults reproduce, draw for draw, the ``TinyNet`` that ``test_gradops.py`` and
``test_pcgrad.py`` defined (``torch.manual_seed(seed)``, trunk ``4 -> 6 -> 3``, heads
``3 -> 5 -> 1``, float64); ``mlp_net`` the ``_mlp_model`` of ``test_multibalance.py``.
``BatchNet`` is a ``TinyNet`` that carries its own fixed batch (``test_marigold.py``);
``BlocksNet`` (a trunk with an optional second block) and ``NeckNet`` (a neck shared by every
task above the balance point, optionally gated) are ``test_optimizer.py``'s models, whose
initial weights come from :func:`randn_init_`. ``registered_balancers`` lists the balancers the
API-wide tests parametrize over; ``train_steps`` runs a balancer on ``TinyNet`` batches;
``checkpoint_copy`` passes a checkpoint through ``torch.save`` and ``torch.load``.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl import BalancedOptimizer, BalanceInfo

__all__ = [
    "BatchNet",
    "BlocksNet",
    "NeckNet",
    "TinyNet",
    "batch",
    "checkpoint_copy",
    "flat",
    "mlp_net",
    "randn_init_",
    "registered_balancers",
    "train_steps",
]

F64 = torch.float64


class TinyNet(nn.Module):
    """``x -> trunk -> z -> K heads``; regression losses ``L_k = s_k mean((head_k(z) - y_k)^2)``.

    Args:
        num_tasks: K.
        seed: ``torch.manual_seed`` before the layers are built (their initial weights).
        d_in, hidden, d_z: trunk sizes (``Linear(d_in, hidden), Tanh, Linear(hidden, d_z)``).
        head_hidden: head sizes (``Linear(d_z, head_hidden), Tanh, Linear(head_hidden, 1)``).
        trunk_tanh: a final ``Tanh`` on the trunk output.
        dropout: a ``Dropout(dropout)`` after the trunk's first ``Tanh`` when positive.
        dtype: parameter dtype (default float64).
    """

    def __init__(
        self,
        num_tasks: int,
        seed: int = 0,
        *,
        d_in: int = 4,
        hidden: int = 6,
        d_z: int = 3,
        head_hidden: int = 5,
        trunk_tanh: bool = False,
        dropout: float = 0.0,
        dtype: torch.dtype = F64,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, d_z))
        if trunk_tanh:
            layers.append(nn.Tanh())
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d_z, head_hidden), nn.Tanh(), nn.Linear(head_hidden, 1))
            for _ in range(num_tasks)
        )
        self.to(dtype)
        self.num_tasks = num_tasks

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(z, outputs)``: the representation and the K head outputs (shape ``(B,)``)."""
        z = self.trunk(x)
        return z, self.head_outputs(z)

    def head_outputs(self, z: Tensor) -> list[Tensor]:
        return [h(z).squeeze(-1) for h in self.heads]

    def head_losses(
        self, z: Tensor, y: Tensor, scales: Sequence[float] | None = None
    ) -> list[Tensor]:
        """The K losses computed by the heads from ``z`` (``y``: ``(B, K)``)."""
        s = [1.0] * self.num_tasks if scales is None else list(scales)
        return [
            sk * ((out - y[:, k]) ** 2).mean()
            for k, (sk, out) in enumerate(zip(s, self.head_outputs(z)))
        ]

    def losses(
        self, x: Tensor, y: Tensor, scales: Sequence[float] | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """``(losses, z)`` on a batch (``y``: ``(B, K)``)."""
        z = self.trunk(x)
        return self.head_losses(z, y, scales), z

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())


class BatchNet(TinyNet):
    """A ``TinyNet`` (trunk ``d_in -> width -> d_z`` with a final Tanh, heads ``d_z -> 4 -> 1``)
    with its own fixed batch: ``x`` ``(batch, d_in)`` and targets ``ys`` ``(K, batch)``,
    ``tanh(x W^T)^T`` plus 0.1 noise, from ``torch.Generator().manual_seed(seed)``."""

    def __init__(
        self,
        k: int,
        dtype: torch.dtype = F64,
        seed: int = 0,
        d_in: int = 3,
        width: int = 8,
        d_z: int = 4,
        batch: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            k,
            seed,
            d_in=d_in,
            hidden=width,
            d_z=d_z,
            head_hidden=4,
            trunk_tanh=True,
            dropout=dropout,
            dtype=dtype,
        )
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, d_in, generator=g, dtype=dtype)
        w = torch.randn(k, d_in, generator=g, dtype=dtype)
        self.ys = torch.tanh(self.x @ w.T).T + 0.1 * torch.randn(k, batch, generator=g, dtype=dtype)

    def batch_head_losses(self, z: Tensor) -> list[Tensor]:
        """The K losses of the fixed batch computed by the heads from ``z``."""
        return [((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(self.heads, self.ys)]

    def batch_losses(self) -> list[Tensor]:
        """The K losses of the fixed batch."""
        return self.batch_head_losses(self.trunk(self.x))


def randn_init_(module: nn.Module, seed: int, std: float = 0.7) -> None:
    """Every parameter of ``module`` redrawn, in parameter order, as ``std N(0, 1)`` from
    ``torch.Generator().manual_seed(seed)`` (weights independent of torch's global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


class BlocksNet(nn.Module):
    """Trunk ``4 -> 6 -> 5`` (Tanh) and, with ``two_blocks``, a second trunk block ``4 -> 3``
    (Tanh) -> K heads ``width -> 4 -> 1`` on the concatenated blocks; :func:`randn_init_`
    weights. ``forward`` returns ``(blocks, outputs)``."""

    def __init__(
        self, k: int = 3, seed: int = 0, dtype: torch.dtype = F64, two_blocks: bool = False
    ) -> None:
        super().__init__()
        self.two_blocks = two_blocks
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
        self.trunk2 = nn.Sequential(nn.Linear(4, 3), nn.Tanh()) if two_blocks else None
        width = 8 if two_blocks else 5
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(k)
        )
        randn_init_(self, seed)
        self.to(dtype)

    def forward(self, x: Tensor) -> tuple[tuple[Tensor, ...], list[Tensor]]:
        z = self.trunk(x)
        if self.trunk2 is None:
            blocks: tuple[Tensor, ...] = (z,)
            features = z
        else:
            z2 = self.trunk2(x)
            blocks = (z, z2)
            features = torch.cat([z, z2], dim=1)
        return blocks, [h(features).squeeze(-1) for h in self.heads]

    def shared_parameters(self) -> list[nn.Parameter]:
        params = list(self.trunk.parameters())
        if self.trunk2 is not None:
            params += list(self.trunk2.parameters())
        return params


class NeckNet(nn.Module):
    """Trunk -> z -> a neck shared by every task -> K heads; ``gated``: each head's output is
    scaled by a gate that reads a trunk activation below z (the MMoE pattern);
    :func:`randn_init_` weights."""

    def __init__(self, gated: bool, seed: int = 3, k: int = 3) -> None:
        super().__init__()
        self.gated = gated
        self.bottom = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.top = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
        self.neck = nn.Linear(5, 5)
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(k))
        self.gates = nn.ModuleList(nn.Linear(6, 1) for _ in range(k))
        randn_init_(self, seed)
        self.to(F64)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        h = self.bottom(x)
        z = self.top(h)
        n = torch.tanh(self.neck(z))
        outs = [head(n).squeeze(-1) for head in self.heads]
        if self.gated:
            outs = [o * torch.sigmoid(g(h)).squeeze(-1) for o, g in zip(outs, self.gates)]
        return z, outs

    def trunk(self) -> list[nn.Parameter]:
        return [*self.bottom.parameters(), *self.top.parameters()]


def mlp_net(num_tasks: int, dtype: torch.dtype = F64, seed: int = 0) -> TinyNet:
    """The wider toy: trunk ``5 -> 8 -> 6`` with a final Tanh, heads ``6 -> 4 -> 1``."""
    return TinyNet(
        num_tasks, seed, d_in=5, hidden=8, d_z=6, head_hidden=4, trunk_tanh=True, dtype=dtype
    )


def batch(
    num_tasks: int, seed: int = 1, size: int = 5, d_in: int = 4, dtype: torch.dtype = F64
) -> tuple[Tensor, Tensor]:
    """``(x, y)``: ``x ~ N(0, 1)`` of shape ``(size, d_in)``, targets ``y[:, k] ~ (k+1) N(0, 1)``
    (different task scales), from a fixed ``torch.Generator`` seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, d_in, generator=gen, dtype=dtype)
    y = torch.randn(size, num_tasks, generator=gen, dtype=dtype)
    return x, y * torch.arange(1, num_tasks + 1, dtype=dtype)


def flat(tensors: Iterable[Tensor]) -> Tensor:
    """The tensors flattened and concatenated (e.g. the ``.grad`` of a parameter list)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def registered_balancers() -> list[str]:
    """The names in :data:`balancers.registry.BALANCERS` whose module imports here (an optional
    method whose dependency is missing is left out)."""
    from balancers.registry import BALANCERS

    out = []
    for name, target in BALANCERS.items():
        try:
            importlib.import_module(target.split(":")[0])
        except ImportError:  # pragma: no cover - an optional method
            continue
        out.append(name)
    return out


def train_steps(opt: BalancedOptimizer, net: TinyNet, seeds: Iterable[int]) -> list[BalanceInfo]:
    """One representation-level step of ``opt`` per seed, on ``batch(K, seed=seed)``; the
    steps' infos."""
    infos = []
    for seed in seeds:
        x, y = batch(net.num_tasks, seed=seed)
        losses, z = net.losses(x, y)
        opt.zero_grad()
        infos.append(opt.backward(losses, representation=z))
        opt.step()
    return infos


def checkpoint_copy(checkpoint: Any, *, weights_only: bool = True) -> Any:
    """``checkpoint`` (e.g. ``{"model": ..., "opt": ...}`` state dicts) saved with
    ``torch.save`` and loaded back with ``torch.load`` (``weights_only`` as given): what a
    resumed run reads from the file."""
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)
