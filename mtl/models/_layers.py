"""Building blocks shared by the multi-task models: validation, MLPs, feature embedding, towers.

Everything here is internal; the public models are in :mod:`mtl.models`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ._types import Features, ModelOutput

__all__ = [
    "FeatureEmbedding",
    "Heads",
    "MultiTaskModel",
    "Tower",
    "make_mlp",
]

#: the part of a model above the balance point: representation -> K task outputs
Heads = Callable[[Tensor], list[Tensor]]


# --------------------------------------------------------------------------- validation helpers


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` as an int if it is an integer ``>= minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_dims(name: str, dims: object, *, allow_empty: bool) -> tuple[int, ...]:
    """Validate a sequence of layer widths (positive integers)."""
    if isinstance(dims, (int, str, bytes)) or not isinstance(dims, Sequence):
        raise ValueError(f"{name} must be a sequence of positive integers, got {dims!r}")
    out = tuple(check_int(f"{name}[{i}]", d, minimum=1) for i, d in enumerate(dims))
    if not out and not allow_empty:
        raise ValueError(f"{name} must contain at least one layer width, got {dims!r}")
    return out


def check_dropout(dropout: object) -> float:
    """Validate a dropout probability in ``[0, 1)``."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    p = float(dropout)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return p


def check_balance_point(balance_point: object, allowed: Sequence[str], model: str) -> str:
    """Validate the ``balance_point`` option against the names a model supports."""
    if not isinstance(balance_point, str) or balance_point not in allowed:
        raise ValueError(
            f"{model}: unknown balance_point {balance_point!r}; expected one of {list(allowed)}"
        )
    return balance_point


# --------------------------------------------------------------------------- layers


def make_mlp(in_dim: int, dims: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """``[Linear → ReLU → (Dropout)]`` for each width in ``dims`` (empty ``dims``: identity)."""
    layers: list[nn.Module] = []
    prev = in_dim
    for d in dims:
        layers.append(nn.Linear(prev, d))
        layers.append(nn.ReLU())
        if dropout > 0.0:
            layers.append(nn.Dropout(dropout))
        prev = d
    return nn.Sequential(*layers)


class Tower(nn.Module):
    """A task head: MLP ``tower_dims`` (ReLU, optional dropout), then ``Linear(→ 1)``, squeezed.

    Maps ``(B, in_dim)`` to ``(B,)`` (a logit for a binary task, a prediction for regression).
    """

    def __init__(self, in_dim: int, tower_dims: Sequence[int] = (32,), dropout: float = 0.0):
        super().__init__()
        self.mlp = make_mlp(in_dim, tower_dims, dropout)
        self.out = nn.Linear(tower_dims[-1] if len(tower_dims) else in_dim, 1)

    def forward(self, h: Tensor) -> Tensor:
        logit: Tensor = self.out(self.mlp(h))
        return logit.squeeze(-1)


def _parts(x: Features | Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``(numeric, categorical)`` of a model input: :class:`Features`, a ``(numeric,
    categorical)`` pair, or a float tensor of numeric columns."""
    if isinstance(x, Features):
        numeric, categorical = x.numeric, x.categorical
    elif isinstance(x, Tensor):
        numeric, categorical = x, None
    elif isinstance(x, (tuple, list)) and len(x) == 2:
        # a plain (numeric, categorical) pair, e.g. after a collate that dropped the type
        numeric, categorical = x[0], x[1]
    else:
        raise TypeError(
            "model input must be mtl.models.Features, a (numeric, categorical) pair or a "
            f"float Tensor, got {type(x).__name__}"
        )
    for part, label in ((numeric, "numeric"), (categorical, "categorical")):
        if part is not None and not isinstance(part, Tensor):
            raise TypeError(
                f"{label} features must be a torch.Tensor or None, got {type(part).__name__}"
            )
    return numeric, categorical


class FeatureEmbedding(nn.Module):
    """Turn tabular inputs into one dense vector per example.

    One ``nn.Embedding(cardinality, embedding_dim, sparse=sparse)`` per categorical column; the
    embeddings are concatenated after the numeric columns, giving ``e`` of shape
    ``(B, num_numeric + len(cardinalities) * embedding_dim)``.

    Args:
        num_numeric: number of numeric (float) columns (may be 0).
        cardinalities: number of categories of each categorical column (may be empty).
        embedding_dim: width of every embedding (default 8).
        sparse: passed to ``nn.Embedding(sparse=...)``; ``True`` gives sparse gradients (use an
            optimizer that accepts them, e.g. ``SparseAdam`` or ``Adagrad``).
    """

    def __init__(
        self,
        num_numeric: int,
        cardinalities: Sequence[int],
        embedding_dim: int = 8,
        sparse: bool = False,
    ):
        super().__init__()
        self.num_numeric = num_numeric
        self.cardinalities = tuple(cardinalities)
        self.embedding_dim = embedding_dim
        self.embeddings = nn.ModuleList(
            nn.Embedding(c, embedding_dim, sparse=sparse) for c in self.cardinalities
        )
        self.output_dim = num_numeric + len(self.cardinalities) * embedding_dim

    def forward(self, x: Features | Tensor) -> Tensor:
        numeric, categorical = self._split(x)
        parts: list[Tensor] = []
        if self.num_numeric > 0:
            assert numeric is not None
            if not numeric.is_floating_point():
                numeric = numeric.to(torch.get_default_dtype())
            parts.append(numeric)
        if self.cardinalities:
            assert categorical is not None
            for j, emb in enumerate(self.embeddings):
                parts.append(emb(categorical[:, j]))
        if len(parts) == 1 and not self.cardinalities:
            return parts[0]
        return torch.cat(parts, dim=1)

    def _split(self, x: Features | Tensor) -> tuple[Tensor | None, Tensor | None]:
        numeric, categorical = _parts(x)
        batch = self._check_numeric(numeric)
        self._check_categorical(categorical, batch)
        return numeric, categorical

    def _check_numeric(self, numeric: Tensor | None) -> int | None:
        """The numeric block against ``num_numeric``; its batch size (``None`` without one)."""
        if self.num_numeric > 0:
            if numeric is None:
                raise ValueError(
                    f"the model expects {self.num_numeric} numeric column(s) but got none"
                )
            if numeric.dim() != 2 or numeric.shape[1] != self.num_numeric:
                raise ValueError(
                    f"numeric features must have shape (B, {self.num_numeric}), "
                    f"got {tuple(numeric.shape)}"
                )
            return int(numeric.shape[0])
        if numeric is not None and numeric.numel() > 0:
            raise ValueError(
                f"the model was built with num_numeric=0 but got numeric features of shape "
                f"{tuple(numeric.shape)}"
            )
        return None

    def _check_categorical(self, categorical: Tensor | None, batch: int | None) -> None:
        """The categorical ids against ``cardinalities`` (and the numeric batch size)."""
        if not self.cardinalities:
            if categorical is not None and categorical.numel() > 0:
                raise ValueError(
                    "the model was built without categorical columns but got categorical "
                    f"features of shape {tuple(categorical.shape)}"
                )
            return
        n_cat = len(self.cardinalities)
        if categorical is None:
            raise ValueError(
                f"the model expects {n_cat} categorical column(s) but got none "
                "(pass mtl.models.Features(numeric, categorical))"
            )
        if categorical.dim() != 2 or categorical.shape[1] != n_cat:
            raise ValueError(
                f"categorical features must have shape (B, {n_cat}), got {tuple(categorical.shape)}"
            )
        if categorical.is_floating_point() or categorical.is_complex():
            raise ValueError(
                f"categorical features must be integer ids, got dtype {categorical.dtype}"
            )
        if batch is not None and categorical.shape[0] != batch:
            raise ValueError(
                f"numeric and categorical batch sizes differ: {batch} vs {categorical.shape[0]}"
            )


# --------------------------------------------------------------------------- base model


class MultiTaskModel(nn.Module):
    """Common part of the multi-task models: argument validation, input embedding, towers.

    Subclasses build ``self.towers`` (one :class:`Tower` per task), implement :meth:`forward`
    and :meth:`_shared_modules` (the modules whose parameters every task shares, at or below
    the balance point).
    """

    balance_points: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        num_numeric: int,
        cardinalities: Sequence[int],
        num_tasks: int,
        embedding_dim: int,
        sparse: bool,
        tower_dims: Sequence[int],
        dropout: float,
        balance_point: str,
    ):
        super().__init__()
        name = type(self).__name__
        self.num_numeric = check_int("num_numeric", num_numeric, minimum=0)
        if isinstance(cardinalities, (int, str, bytes)) or not isinstance(cardinalities, Sequence):
            raise ValueError(
                f"cardinalities must be a sequence of category counts (one per categorical "
                f"column), got {cardinalities!r}"
            )
        self.cardinalities = tuple(
            check_int(f"cardinalities[{i}]", c, minimum=1) for i, c in enumerate(cardinalities)
        )
        self.num_tasks = check_int("num_tasks", num_tasks, minimum=1)
        self.embedding_dim = check_int("embedding_dim", embedding_dim, minimum=1)
        if not isinstance(sparse, bool):
            raise ValueError(f"sparse must be a bool, got {sparse!r}")
        self.tower_dims = check_dims("tower_dims", tower_dims, allow_empty=True)
        self.dropout = check_dropout(dropout)
        self.balance_point = check_balance_point(balance_point, self.balance_points, name)
        if self.num_numeric == 0 and not self.cardinalities:
            raise ValueError(f"{name} needs at least one numeric or categorical column")
        if self.balance_point == "input" and not self.cardinalities:
            raise ValueError(
                f"{name}: balance_point='input' needs at least one categorical column (the "
                "embeddings are the only shared parameters below the input vector)"
            )
        self.embedding = FeatureEmbedding(
            self.num_numeric, self.cardinalities, self.embedding_dim, sparse
        )
        self.input_dim = self.embedding.output_dim

    def _output(self, rep: Tensor, heads: Heads) -> ModelOutput:
        """Run the heads on the balance point and package the output.

        In training mode with dropout, ``heads`` is made replayable: every later call
        ``out.heads(z)`` draws the same dropout masks as this forward (the random state from
        just before the heads is restored in a forked RNG, so the caller's stream is untouched).
        That is what a perturbation regularizer or MARIGOLD's extra forward needs: the only
        difference between the two evaluations is the change of the representation.
        """
        replay = _replayable(heads, rep.device) if self.training and self.dropout > 0 else heads
        return ModelOutput(task_outputs=heads(rep), representation=rep, heads=replay)

    def _make_towers(self, in_dim: int) -> nn.ModuleList:
        return nn.ModuleList(
            Tower(in_dim, self.tower_dims, self.dropout) for _ in range(self.num_tasks)
        )

    def _shared_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters at or below the balance point that every task shares (no duplicates)."""
        seen: set[int] = set()
        for module in self._shared_modules():
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """All other parameters: towers, gates, task-specific experts (the "heads")."""
        shared = {id(p) for p in self.shared_parameters()}
        for p in self.parameters():
            if id(p) not in shared:
                yield p

    def forward(self, x: Features | Tensor) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"num_numeric={self.num_numeric}, cardinalities={self.cardinalities}, "
            f"num_tasks={self.num_tasks}, balance_point={self.balance_point!r}"
        )


def _replayable(heads: Heads, device: torch.device) -> Heads:
    """``heads`` with the random state of now (call it just before the forward's own call)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

    def replay(z: Tensor) -> list[Tensor]:
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            for d, st in zip(devices, cuda_states):
                torch.cuda.set_rng_state(st, d)
            return heads(z)

    return replay
