"""Building blocks of ``python -m experiments bench``: model, data, modes, interleaved timing.

Nothing here prints; :mod:`experiments.bench` orchestrates, reports and plots.

Vocabulary:

* a *section* is one model configuration (embedding tables sparse or dense, rows per table);
* a *group* is one section at one number of tasks K: one model, one inner optimizer, a pool of
  batches, and several *modes* (plain step, a balancer at one level, a peer library...) that all
  train the same model in turn;
* a *mode* is a zero-argument callable that performs ONE full training step (forward, losses,
  backward, optimizer step) and returns whatever the backward returned (``BalanceInfo`` for our
  balancers).

Timing (:func:`interleaved_timings`): warm-up rounds, then ``repeats`` rounds; in every round
each mode runs one block of ``steps`` consecutive steps, round-robin, the starting mode rotating
by one each round. A mode's time of a round is its block's wall time divided by its steps. Ratios
are taken per round against the baseline mode of the same round (:func:`ratio_summary`) and
reported as the median with the min and max over rounds.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
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
    "BenchModelConfig",
    "CombinedOptimizer",
    "Group",
    "ModeSpec",
    "build_group",
    "count_backward_syncs",
    "device_clock",
    "interleaved_timings",
    "make_mode",
    "ratio_summary",
    "sparse_aware_gram",
]

Clock = Callable[[], float]


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


@dataclass(frozen=True)
class ModeSpec:
    """One way of doing a training step.

    Attributes:
        name: unique label, e.g. ``"plain"``, ``"rep:mgda"``, ``"param:gradops"``,
            ``"torchjd:upgrad:emb"``, ``"rechub:metabalance"``, ``"rep:mgda+tracker"``.
        kind: ``"plain"``, ``"ours"``, ``"tracker"`` (ours + ConflictTracker), ``"torchjd"``,
            ``"rechub"``.
        method: balancer registry name (ours) or aggregator name (torchjd).
        level: ``"representation"``, ``"parameters"`` or ``"-"`` (plain).
        options: keyword options of the balancer / peer.
        include_embeddings: torchjd only: whether the embedding tables are in the shared set.
    """

    name: str
    kind: str
    method: str = "-"
    level: str = "-"
    options: tuple[tuple[str, Any], ...] = ()
    include_embeddings: bool = True
    steps: int | None = None  # block length override (the tracker uses ``every`` steps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModeSpec:
        d = dict(d)
        d["options"] = tuple(sorted(dict(d.get("options") or {}).items()))
        return cls(**d)


# ---------------------------------------------------------------------- optimizer
def make_inner_optimizer(model: nn.Module, cfg: BenchModelConfig, sparse: bool) -> Optimizer:
    """Plain SGD (or SparseAdam, sparse tables only) for the embedding tables, Adam for the rest.

    SGD accepts sparse and dense gradients and keeps no state, so the tables cost the same
    update in every mode; Adam over 8 x 1M x 16 dense table entries would triple the memory
    traffic of the dense sections without telling anything about balancing.
    """
    emb = list(model.embedding.parameters())  # type: ignore[union-attr]
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
            sparse=embedding.embeddings[0].sparse if cfg.fields else False,
            bottom_dims=cfg.bottom,
            tower_dims=cfg.tower,
        )
    model.embedding = embedding
    model.cardinalities = embedding.cardinalities
    return model


def make_batches(
    cfg: BenchModelConfig, rows: int, num_tasks: int, seed: int
) -> list[tuple[Features, list[Tensor]]]:
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


# ---------------------------------------------------------------------- groups and modes
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
    batches: list[tuple[Features, list[Tensor]]]
    shared: list[nn.Parameter] = field(default_factory=list)
    _cursor: int = 0

    def next_batch(self) -> tuple[Features, list[Tensor]]:
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


def _bottom_parameters(model: SharedBottom) -> list[nn.Parameter]:
    return list(model.bottom.parameters())


def make_mode(spec: ModeSpec, group: Group) -> Callable[[], Any]:
    """The step callable of ``spec`` on ``group`` (raises ImportError for a missing peer)."""
    model, inner, k = group.model, group.inner, group.num_tasks
    opts = dict(spec.options)

    # ``backward_context[0]``: a context manager entered around the backward call only (None:
    # nothing); :func:`count_backward_syncs` puts a SyncCounter there for one untimed step.
    backward_context: list[Any] = [None]

    if spec.kind == "plain":

        def plain() -> None:
            x, ys = group.next_batch()
            losses = task_losses(model(x).task_outputs, ys)
            inner.zero_grad()
            ctx = backward_context[0]
            if ctx is None:
                sum(losses).backward()  # type: ignore[union-attr]
            else:
                with ctx:
                    sum(losses).backward()  # type: ignore[union-attr]
            inner.step()

        plain.backward_context = backward_context  # type: ignore[attr-defined]
        return plain

    if spec.kind in ("ours", "tracker"):
        from balancers.registry import make_balancer

        opt = make_balancer(spec.method, inner, k, **opts)
        level = spec.level
        is_marigold = spec.method.lower() == "marigold"
        shared = group.shared
        tracker = None
        if spec.kind == "tracker":
            from mtl.conflict import ConflictTracker

            tracker = ConflictTracker(every=10)
        counter = [0]

        def ours() -> Any:
            x, ys = group.next_batch()
            out = model(x)
            losses = task_losses(out.task_outputs, ys)
            opt.zero_grad()
            kwargs: dict[str, Any]
            if level == "representation":
                kwargs = {"representation": out.representation}
                if is_marigold:
                    heads = out.heads
                    kwargs["closure"] = lambda z: task_losses(heads(z), ys)  # type: ignore[misc]
            else:
                kwargs = {"shared_parameters": shared}
                if is_marigold:
                    kwargs["closure"] = lambda: task_losses(model(x).task_outputs, ys)
            ctx = backward_context[0]
            if ctx is None:
                info = opt.backward(losses, **kwargs)
            else:
                with ctx:
                    info = opt.backward(losses, **kwargs)
            opt.step()
            if tracker is not None:
                tracker.update(counter[0], info)
            counter[0] += 1
            return info

        ours.balancer = opt  # type: ignore[attr-defined]
        ours.backward_context = backward_context  # type: ignore[attr-defined]
        ours.tracker = tracker  # type: ignore[attr-defined]
        return ours

    if spec.kind == "torchjd":
        from experiments.bench_peers import torchjd_step

        params = group.shared if spec.include_embeddings else _bottom_parameters(model)
        return torchjd_step(group, spec.method, params, opts)

    if spec.kind == "rechub":
        from experiments.bench_peers import rechub_step

        return rechub_step(group, opts)

    raise ValueError(f"unknown mode kind {spec.kind!r}")


# ---------------------------------------------------------------------- devices and syncs
def device_clock(device: str | torch.device) -> Clock:
    """The clock of :func:`interleaved_timings` for ``device``.

    CPU: ``time.perf_counter``. CUDA: ``torch.cuda.synchronize(device)`` and then
    ``time.perf_counter()``, so a timed block starts after every kernel queued before it has
    finished and ends after its own kernels have (CUDA launches are asynchronous: without the
    synchronization a block would measure the launches, not the work).
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return time.perf_counter

    def cuda_clock() -> float:
        torch.cuda.synchronize(dev)
        return time.perf_counter()

    return cuda_clock


def count_backward_syncs(fn: Callable[[], Any]) -> dict[str, Any] | None:
    """Host syncs inside the backward call of ONE step of mode ``fn`` (not timed).

    ``fn`` must come from :func:`make_mode` (its ``backward_context`` slot); returns
    ``{"total": n, "by_name": {...}}``, or None for a mode without the slot (peers). The step is
    a real training step (the model moves), so call it outside the timed blocks.
    """
    from experiments.bench_syncs import SyncCounter

    slot = getattr(fn, "backward_context", None)
    if slot is None:
        return None
    counter = SyncCounter()
    slot[0] = counter
    try:
        fn()
    finally:
        slot[0] = None
    return {"total": counter.total, "by_name": dict(sorted(counter.counts.items()))}


# ---------------------------------------------------------------------- timing
@dataclass
class TimingResult:
    """Per-mode seconds per step of each timed round (``None`` where the mode had failed)."""

    times: dict[str, list[float]]
    errors: dict[str, str]
    order: list[list[str]]  # the order of the modes in each round (warm-up rounds included)


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def interleaved_timings(
    modes: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    steps: int | Mapping[str, int] = 1,
    clock: Clock = time.perf_counter,
    on_block: Callable[[str, int], None] | None = None,
    collect: bool = True,
) -> TimingResult:
    """Time several step callables fairly: interleaved, warmed up, rotated.

    ``warmup`` untimed rounds, then ``repeats`` timed rounds. In round ``r`` the modes run in
    their given order rotated by ``r`` (``modes[r % n:] + modes[:r % n]``), each as a block of
    ``steps`` consecutive calls (an int, or a per-mode mapping; default 1); the block's wall time
    (``clock``) divided by its length is the mode's seconds per step for that round. Machine load
    that drifts over the run therefore hits every mode of a round alike, and no mode always runs
    right after the same neighbour.

    A mode that raises is recorded in ``errors`` (``"Type: message"``) and skipped from then on;
    its times so far are dropped. With ``collect`` (default) the cyclic garbage collector
    runs once at the start of every round (untimed) and is disabled inside the blocks, so no
    collection pause lands in one mode's time. ``on_block(name, round)`` is called after every block (progress bars).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    names = list(modes)
    per_mode = {n: (steps if isinstance(steps, int) else int(steps.get(n, 1))) for n in names}
    for n, s in per_mode.items():
        if s < 1:
            raise ValueError(f"steps for {n!r} must be >= 1, got {s}")
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    order: list[list[str]] = []
    for r in range(warmup + repeats):
        shift = r % len(names) if names else 0
        this = names[shift:] + names[:shift]
        order.append(this)
        if collect:
            gc.collect()
        for name in this:
            if name in errors:
                continue
            fn = modes[name]
            enabled = gc.isenabled()
            if collect:
                gc.disable()
            try:
                t0 = clock()
                for _ in range(per_mode[name]):
                    fn()
                dt = clock() - t0
            except Exception as exc:  # noqa: BLE001 - a failing mode must not stop the run
                errors[name] = _describe(exc)
                times[name] = []
                continue
            finally:
                if collect and enabled:
                    gc.enable()
            if r >= warmup:
                times[name].append(dt / per_mode[name])
            if on_block is not None:
                on_block(name, r)
    return TimingResult(times=times, errors=errors, order=order)


def ratio_summary(times: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Median and min-max over rounds of ``times[r] / baseline[r]``, plus ms per step.

    Only rounds where both were measured count (the two lists are aligned by round).
    """
    pairs = [(t, b) for t, b in zip(times, baseline) if b > 0 and t > 0]
    ratios = [t / b for t, b in pairs]
    ms = [1000.0 * t for t in times]
    out: dict[str, Any] = {
        "ms_per_step": statistics.median(ms) if ms else math.nan,
        "ms_min": min(ms) if ms else math.nan,
        "ms_max": max(ms) if ms else math.nan,
        "ratio": statistics.median(ratios) if ratios else math.nan,
        "ratio_min": min(ratios) if ratios else math.nan,
        "ratio_max": max(ratios) if ratios else math.nan,
        "ratios": ratios,
        "times_ms": ms,
        "repeats": len(ratios),
    }
    return out


# ---------------------------------------------------------------------- exact MGDA reference
def sparse_aware_gram(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """Float64 Gram matrix of the per-task gradients w.r.t. ``params``, sparse tables included.

    Equal to the Gram of the densified gradients (what parameter-level balancing computes), but
    a sparse embedding gradient only contributes its touched rows: every task's coalesced
    gradient of one table has the same row set (the batch's ids), so the rows' values are
    stacked and multiplied; zero rows add nothing.
    """
    k = len(losses)
    grads = [
        torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        for loss in losses
    ]
    device = params[0].device if len(params) else torch.device("cpu")
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    for i, p in enumerate(params):
        gs = [grads[t][i] for t in range(k)]
        if all(g is None for g in gs):
            continue
        if any(g is not None and g.is_sparse for g in gs):
            co = [None if g is None else g.coalesce() for g in gs]
            ref = next(c for c in co if c is not None)
            same = all(c is None or torch.equal(c.indices(), ref.indices()) for c in co)
            if same:
                rows = torch.stack(
                    [
                        torch.zeros_like(ref.values()).reshape(-1)
                        if c is None
                        else c.values().reshape(-1)
                        for c in co
                    ]
                )
            else:
                rows = torch.stack(
                    [p.new_zeros(p.numel()) if c is None else c.to_dense().reshape(-1) for c in co]
                )
        else:
            rows = torch.stack([p.new_zeros(p.numel()) if g is None else g.reshape(-1) for g in gs])
        r = rows.to(torch.float64)
        gram += r @ r.T
    return gram
