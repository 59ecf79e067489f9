"""Task-conflict diagnostics: pure functions of the Gram matrix, and a streaming tracker.

Every metric here is a function of the ``(K, K)`` float64 Gram matrix ``M_ij = <g_i, g_j>`` of
the task gradients ``g_1 .. g_K`` (at the balance point, or at the shared parameters) and,
for the update cosines, of the coefficients ``c`` of the applied update ``d = sum_k c_k g_k``.
A balanced backward pass already computes ``M`` (:attr:`mtl.BalanceInfo.gram`), so the
diagnostics cost no extra backward pass::

    |g_i|        = sqrt(M_ii)
    cos_ij       = M_ij / (|g_i| |g_j|)
    conflict     = share of pairs i < j with cos_ij < 0
    GMS_ij       = 2 |g_i| |g_j| / (|g_i|^2 + |g_j|^2)           (Yu et al. 2020)
    kappa(G)     = sqrt(lambda_max(M) / lambda_min(M))            (G: the K task gradients)
    cos(d, g_i)  = (M c)_i / (|g_i| sqrt(c^T M c))

Conventions for degenerate inputs (documented once, used everywhere):

* a task whose gradient norm is ``<= eps`` (default ``0``: exactly zero) is a *zero task*: its
  cosine with every task, itself included, is ``0``; it never counts as a conflict;
* statistics over task pairs (conflict rate, min/mean cosine, min/mean magnitude similarity)
  are ``nan`` when ``K = 1`` (there is no pair);
* the condition number is ``inf`` when ``M`` is numerically rank-deficient (duplicate or
  linearly dependent gradients, a zero gradient); :func:`aligned_condition_number` stays finite.

:class:`ConflictTracker` records these metrics every ``every`` steps from the
:class:`~mtl.BalanceInfo` of the step, optionally with a (costly) parameter-level probe, and
saves its history as JSON or CSV. Each record also carries rolling-window statistics (the
conflict rate and the cosine matrix averaged over the last ``window`` sampled steps), and can be
written to logging sinks as a flat ``{key: float}`` dict: :class:`TensorBoardSink`,
:class:`DictSink` (W&B, Lightning's ``log_dict``), :class:`CSVSink`, or any :class:`Sink`.
:class:`BalanceLogger` logs a :class:`~mtl.BalanceInfo`'s weights, losses and extras without a
tracker. :func:`plot_dashboard` draws the tracker's four-panel figure. See
``docs/diagnostics.md``.
"""

from ._dashboard import plot_dashboard
from ._metrics import (
    aligned_condition_number,
    condition_number,
    conflict_rate,
    cosine_matrix,
    magnitude_similarity,
    magnitude_similarity_summary,
    pair_values,
    summarize,
    task_norms,
    update_cosines,
    update_norm,
)
from ._records import record_columns, record_scalars, scalar_keys
from ._sinks import (
    BalanceLogger,
    CSVSink,
    DictSink,
    HeatmapSink,
    Sink,
    TensorBoardSink,
    balance_scalars,
)
from ._tracker import ConflictTracker

__all__ = [
    "BalanceLogger",
    "CSVSink",
    "ConflictTracker",
    "DictSink",
    "HeatmapSink",
    "Sink",
    "TensorBoardSink",
    "aligned_condition_number",
    "balance_scalars",
    "condition_number",
    "conflict_rate",
    "cosine_matrix",
    "magnitude_similarity",
    "magnitude_similarity_summary",
    "pair_values",
    "plot_dashboard",
    "record_columns",
    "record_scalars",
    "scalar_keys",
    "summarize",
    "task_norms",
    "update_cosines",
    "update_norm",
]
