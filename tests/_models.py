"""Toy multi-task networks shared by the tests (import with ``from _models import ...``).

``TinyNet`` is the trunk + heads toy that several test files used to define on their own: a
small MLP trunk whose output ``z`` is the balance point, and ``K`` small MLP heads with squared-
error losses. Its defaults reproduce, draw for draw, the ``TinyNet`` that ``test_gradops.py`` and
``test_pcgrad.py`` defined (``torch.manual_seed(seed)``, trunk ``4 -> 6 -> 3``, heads
``3 -> 5 -> 1``, float64); ``mlp_net`` the ``_mlp_model`` of ``test_multibalance.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["TinyNet", "batch", "flat", "mlp_net"]

F64 = torch.float64


class TinyNet(nn.Module):
    """``x -> trunk -> z -> K heads``; regression losses ``L_k = s_k mean((head_k(z) - y_k)^2)``.

    Args:
        num_tasks: K.
        seed: ``torch.manual_seed`` before the layers are built (their initial weights).
        d_in, hidden, d_z: trunk sizes (``Linear(d_in, hidden), Tanh, Linear(hidden, d_z)``).
        head_hidden: head sizes (``Linear(d_z, head_hidden), Tanh, Linear(head_hidden, 1)``).
        trunk_tanh: a final ``Tanh`` on the trunk output.
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
        dtype: torch.dtype = F64,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_z)]
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
