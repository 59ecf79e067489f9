"""The benchmark's models and data: the DLRM-like model, its batch pool, one group per K.

Vocabulary:

* a *section* is one model configuration (embedding tables sparse or dense, rows per table);
* a *group* is one section at one number of tasks K: one model, one inner optimizer, a pool of
  batches, and several *modes* (:mod:`experiments.bench.modes`) that all train the same model in
  turn.

Nothing here knows about balancers, timing or reports: this is the leaf of the package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from mtl import CombinedOptimizer
from mtl.models import Features, SharedBottom
from mtl.models._layers import FeatureEmbedding

__all__ = [
    "OVERHEAD_MODEL",
    "Batch",
    "BenchModelConfig",
    "Group",
    "build_group",
    "make_batches",
    "make_embedding",
    "make_inner_optimizer",
    "make_model",
    "overhead_config",
    "task_losses",
]

#: one training batch: the features and one label tensor per task
Batch = tuple[Features, list[Tensor]]

#: the overhead section's model: small enough that per-operation overhead dominates a step
OVERHEAD_MODEL: dict[str, Any] = {
    "fields": 4,
    "rows": 1000,
    "dim": 8,
    "numeric": 4,
    "bottom": (32, 16),
    "tower": (8,),
    "batch_size": 64,
    "sparse": False,
}


# ---------------------------------------------------------------------- configuration
@dataclass
class BenchModelConfig:
    """The DLRM-like model and the training set-up shared by every section.

    ``fields`` categorical fields, each with its own ``nn.Embedding(rows, dim)`` table (``rows``
    is set per section), ``numeric`` dense features, a bottom MLP ``bottom`` (ReLU) whose output
    is the balance point, and one tower ``tower`` -> 1 logit per task (binary cross-entropy).
    """

    fields: int = 8
    dim: int = 16
    numeric: int = 13
    bottom: tuple[int, ...] = (512, 256)
    tower: tuple[int, ...] = (64,)
    batch_size: int = 1024
    table_optimizer: str = "sgd"  # "sgd" | "sparseadam" (sparse tables only)
    table_lr: float = 0.01
    dense_lr: float = 1e-3
    num_batches: int = 4  # batches in the pool each group cycles through
    id_skew: float = 2.0  # ids = floor(rows * u**skew): a few hot rows, a long tail
    label_correlation: float = 0.5  # correlation of the tasks' teacher weight vectors
    seed: int = 0
    device: str = "cpu"  # where model, tables, batches and optimizer state live

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bottom"] = list(self.bottom)
        d["tower"] = list(self.tower)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchModelConfig:
        d = dict(d)
        d["bottom"] = tuple(d["bottom"])
        d["tower"] = tuple(d["tower"])
        return cls(**d)


def overhead_config(seed: int, device: str) -> BenchModelConfig:
    """The small model of section ``overhead`` (:data:`OVERHEAD_MODEL`)."""
    m = OVERHEAD_MODEL
    return BenchModelConfig(
        fields=m["fields"],
        dim=m["dim"],
        numeric=m["numeric"],
        bottom=tuple(m["bottom"]),
        tower=tuple(m["tower"]),
        batch_size=m["batch_size"],
        table_optimizer="sgd",
        seed=seed,
        device=device,
    )


# ---------------------------------------------------------------------- optimizer
def make_inner_optimizer(model: SharedBottom, cfg: BenchModelConfig, sparse: bool) -> Optimizer:
    """Plain SGD (or SparseAdam, sparse tables only) for the embedding tables, Adam for the rest.

    SGD accepts sparse and dense gradients and keeps no state, so the tables cost the same
    update in every mode; Adam over 8 x 1M x 16 dense table entries would triple the memory
    traffic of the dense sections without telling anything about balancing.
    """
    emb = list(model.embedding.parameters())
    ids = {id(p) for p in emb}
    rest = [p for p in model.parameters() if id(p) not in ids]
    if cfg.table_optimizer == "sparseadam" and sparse:
        tables: Optimizer = torch.optim.SparseAdam(emb, lr=cfg.table_lr)
    elif cfg.table_optimizer in ("sgd", "sparseadam"):
        tables = torch.optim.SGD(emb, lr=cfg.table_lr)
    else:
        raise ValueError(
            f"table_optimizer must be 'sgd' or 'sparseadam', got {cfg.table_optimizer!r}"
        )
    return CombinedOptimizer([tables, torch.optim.Adam(rest, lr=cfg.dense_lr)])


# ---------------------------------------------------------------------- model and data
def make_embedding(cfg: BenchModelConfig, rows: int, sparse: bool, seed: int) -> FeatureEmbedding:
    """The ``fields`` tables of ``rows`` x ``dim`` (built once per section, shared by its groups)."""
    torch.manual_seed(seed)
    with torch.device(cfg.device):
        return FeatureEmbedding(cfg.numeric, [rows] * cfg.fields, cfg.dim, sparse)


def make_model(
    cfg: BenchModelConfig, num_tasks: int, embedding: FeatureEmbedding, seed: int
) -> SharedBottom:
    """A :class:`mtl.models.SharedBottom` with K towers around the given embedding tables.

    The model is built with one-row tables (cheap) and then given ``embedding``: initialising
    8 x 1M x 16 entries costs seconds, and every K of a section shares the tables.
    """
    torch.manual_seed(seed + 1000 * num_tasks)
    with torch.device(cfg.device):
        model = SharedBottom(
            num_numeric=cfg.numeric,
            cardinalities=[1] * cfg.fields,
            num_tasks=num_tasks,
            embedding_dim=cfg.dim,
            sparse=bool(embedding.embeddings[0].sparse) if cfg.fields else False,
            bottom_dims=cfg.bottom,
            tower_dims=cfg.tower,
        )
    model.embedding = embedding
    model.cardinalities = embedding.cardinalities
    return model


def make_batches(cfg: BenchModelConfig, rows: int, num_tasks: int, seed: int) -> list[Batch]:
    """A small pool of batches with learnable, correlated binary labels.

    Ids: ``floor(rows * u**id_skew)`` per field (``u ~ U[0, 1)``): hot rows near 0 repeat within
    a batch, as in click logs. Labels: a fixed random teacher
    ``h = tanh(x_num A + sum_f T_f[id_f mod 997])`` (8 hidden units), task logits
    ``h . w_k`` with ``w_k = sqrt(rho) w_0 + sqrt(1 - rho) u_k``, ``y_k ~ Bernoulli(sigmoid)``.
    Drawn on the CPU (same batches on every device), then moved to ``cfg.device``.
    """
    g = torch.Generator().manual_seed(seed + 7919 * num_tasks)
    hidden = 8
    a = torch.randn(cfg.numeric, hidden, generator=g) / math.sqrt(max(cfg.numeric, 1))
    tables = torch.randn(cfg.fields, 997, hidden, generator=g) / math.sqrt(max(cfg.fields, 1))
    rho = cfg.label_correlation
    w0 = torch.randn(hidden, generator=g)
    ws = [
        math.sqrt(rho) * w0 + math.sqrt(1 - rho) * torch.randn(hidden, generator=g)
        for _ in range(num_tasks)
    ]
    out = []
    for _ in range(cfg.num_batches):
        b = cfg.batch_size
        num = torch.randn(b, cfg.numeric, generator=g)
        u = torch.rand(b, cfg.fields, generator=g)
        ids = (rows * u.pow(cfg.id_skew)).long().clamp_(0, rows - 1)
        h = num @ a
        for f in range(cfg.fields):
            h = h + tables[f][ids[:, f] % 997]
        h = torch.tanh(h)
        ys = [torch.bernoulli(torch.sigmoid(2.0 * (h @ w)), generator=g) for w in ws]
        dev = torch.device(cfg.device)
        out.append((Features(num, ids).to(dev), [y.to(dev) for y in ys]))
    return out


def task_losses(outputs: Sequence[Tensor], ys: Sequence[Tensor]) -> list[Tensor]:
    """Binary cross-entropy with logits, one scalar per task."""
    return [F.binary_cross_entropy_with_logits(p, y) for p, y in zip(outputs, ys)]


# ---------------------------------------------------------------------- groups
@dataclass
class Group:
    """One model at one K with its optimizer, batch pool and the modes that train it."""

    section: str
    num_tasks: int
    rows: int
    sparse: bool
    cfg: BenchModelConfig
    model: SharedBottom
    inner: Optimizer
    batches: list[Batch]
    shared: list[nn.Parameter] = field(default_factory=list)
    _cursor: int = 0

    def next_batch(self) -> Batch:
        b = self.batches[self._cursor % len(self.batches)]
        self._cursor += 1
        return b

    def shared_bytes(self) -> int:
        """Bytes of one dense copy of the shared parameters (one per-task gradient)."""
        return sum(p.numel() * p.element_size() for p in self.shared)

    def per_task_gradient_bytes(self) -> int:
        """Bytes of one task's gradient of the shared parameters as the balancers hold it: dense
        tensors in full, a sparse table (``nn.Embedding(sparse=True)``) only its touched rows
        (at most one per example and field) plus their int64 indices."""
        sparse = {id(e.weight) for e in self.model.embedding.embeddings if e.sparse}
        total = 0
        for p in self.shared:
            if id(p) in sparse:
                rows = min(p.shape[0], self.cfg.batch_size)
                total += rows * (p[0].numel() * p.element_size() + 8)
            else:
                total += p.numel() * p.element_size()
        return total


def build_group(
    section: str,
    cfg: BenchModelConfig,
    num_tasks: int,
    rows: int,
    sparse: bool,
    embedding: FeatureEmbedding | None = None,
    seed: int | None = None,
) -> Group:
    """Model (with the given or fresh tables), inner optimizer and batch pool for one K."""
    seed = cfg.seed if seed is None else seed
    if embedding is None:
        embedding = make_embedding(cfg, rows, sparse, seed)
    model = make_model(cfg, num_tasks, embedding, seed)
    model.train()
    inner = make_inner_optimizer(model, cfg, sparse)
    batches = make_batches(cfg, rows, num_tasks, seed)
    return Group(
        section=section,
        num_tasks=num_tasks,
        rows=rows,
        sparse=sparse,
        cfg=cfg,
        model=model,
        inner=inner,
        batches=batches,
        shared=list(model.shared_parameters()),
    )
