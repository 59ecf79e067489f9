"""``python -m experiments bench``: step time and peak memory of every balancer, side by side.

What it measures (details and the method in ``docs/benchmarks.md``)::

    python -m experiments bench --out runs/bench            # full default (~8-9 min, 2 cores)
    python -m experiments bench --quick --out /tmp/bench    # tiny sizes, ~20 s (CI)
    python -m experiments.bench ...                         # the same, without the dispatcher

Model: DLRM-like :class:`mtl.models.SharedBottom`: ``--fields`` (8) categorical fields with one
``--rows`` x ``--dim`` (1M x 16) table each, ``--numeric`` (13) dense features, bottom MLP
``--bottom`` (512-256, its output is the balance point), one tower ``--tower`` (64) -> 1 logit
per task, K in ``--tasks`` (2,4,8,16), batch ``--batch-size`` (1024), binary cross-entropy.
Optimizer: Adam (lr 1e-3) for everything dense, plain SGD (lr 0.01; or ``--table-optimizer
sparseadam`` for sparse tables) for the embedding tables.

Balancers: ``--balancers`` takes names and the registry's groups as ``compare`` does (``core``,
the default: the six methods of the toolkit; ``loss``, ``baselines``, ``all``); group members
that are not available are skipped with a note.

Sections (each an interleaved timing run per K, ratios against the section's own plain step
``sum(losses).backward(); inner.step()``):

* ``rep``: sparse tables (``nn.Embedding(sparse=True)``), ``--rows`` rows: every balancer at the
  representation level, MARIGOLD at the parameter level (it needs no per-task gradient, so
  sparse tables work), MGDA-UB with a ``ConflictTracker(every=10)`` (diagnostics overhead).
* ``param``: dense tables of ``--param-rows`` rows (parameter level needs dense per-task
  gradients: K x fields x rows x dim x 4 bytes): every balancer at the parameter level,
  MGDA-UB and MultiBalance at the representation level (same model: the two cost claims),
  TorchJD (MGDA, UPGrad, PCGrad; tables in / out of the shared set) and torch-rechub MetaBalance.
* ``h2h``: dense tables of ``--rows`` rows, K in ``--h2h-tasks``: our MGDA (parameter and
  representation level) against TorchJD ``mtl_backward`` + MGDA, and the weights' agreement.
* ``overhead``: a deliberately SMALL model (:data:`~experiments.bench.model.OVERHEAD_MODEL`: 4
  dense tables of 1000 x 8, 4 numeric features, bottom 32-16, towers of width 8, batch 64; a
  step takes about a millisecond) where per-operation overhead dominates: it stands in, on the
  CPU, for what a GPU pays per kernel launch and host synchronization. Plain step vs every
  balancer at the representation level, ``--overhead-steps`` (50) steps per timed block, plus
  the host syncs (``item``, ``tolist``, ``bool``...) counted inside one untimed backward per mode
  (:mod:`experiments.bench.syncs`).

``--device cuda`` puts everything (tables, model, batches, optimizer state) on the GPU; the
timed blocks are then bracketed by ``torch.cuda.synchronize()`` and peak memory is
``torch.cuda.max_memory_allocated`` per mode (in-process) instead of the peak-RSS children.

Plus: peak RSS per mode in a child process, MARIGOLD's weights against the exact MGDA weights
along a short training run, the two cost claims as tables, and the performance budget of
DESIGN.md. Output (``--out``): ``results.json``, ``results.md``, ``bench_ratios.png``,
``bench_marigold.png``.

Modules, each importing only those above it in this list (nothing imports this package's
``__init__``, which imports nothing):

* :mod:`~experiments.bench.model`: the models, their batches, one group per K (the leaf);
* :mod:`~experiments.bench.syncs`: the host-sync counter (a leaf too);
* :mod:`~experiments.bench.timing`: interleaved timing and ratios (a leaf too);
* :mod:`~experiments.bench.progress`: progress bars (a leaf too);
* :mod:`~experiments.bench.peers`: TorchJD and torch-rechub steps;
* :mod:`~experiments.bench.modes`: how each mode runs a step;
* :mod:`~experiments.bench.options`: the options and the model they describe;
* :mod:`~experiments.bench.sections`: each section's modes and timing run;
* :mod:`~experiments.bench.child`: the memory child process (``python -m experiments.bench.child``);
* :mod:`~experiments.bench.memory`: peak memory per mode (children on the CPU, in-process on CUDA);
* :mod:`~experiments.bench.studies`: the MGDA agreement and MARIGOLD weight studies;
* :mod:`~experiments.bench.results`: reading the result rows; :mod:`~experiments.bench.derived`,
  :mod:`~experiments.bench.budget`, :mod:`~experiments.bench.tables`: the derived tables, the
  budget, the markdown; :mod:`~experiments.bench.plots`: the figures;
  :mod:`~experiments.bench.machine`: the machine record;
* :mod:`~experiments.bench.cli`: ``main``, ``run``, ``add_arguments`` (``__main__`` runs it);
* :mod:`~experiments.bench.stages`: where one step's time goes, stage by stage, on the overhead
  model (``python -m experiments.bench.stages``; a diagnostic of its own, not a section).
"""
