"""A small training loop for multi-task models with any balancer: :func:`fit` and :func:`evaluate`.

One step of :func:`fit` is the loop of DESIGN.md::

    out = model(features)                                   # K task outputs + the balance point
    losses = [loss_k(out.task_outputs[k], y_k) for k]       # BCE-with-logits / MSE per TaskSpec
    optimizer.zero_grad()
    info = optimizer.backward(losses, representation=out.representation)   # or shared_parameters=
    optimizer.step()

with per-epoch validation, early stopping, restore of the best state, a per-epoch history,
checkpoint/resume and step-time measurement. Usage::

    from balancers import MGDA
    from mtl.models import build_model
    from mtl.train import fit
    from tasks import make_synthetic

    splits = make_synthetic(num_samples=4000, seed=0)
    model = build_model("mmoe", **splits.model_kwargs())
    opt = MGDA(torch.optim.Adam(model.parameters(), lr=1e-3), num_tasks=splits.num_tasks)
    result = fit(model, splits, opt, epochs=10, batch_size=256, early_stopping_patience=3)
    result.test_metrics            # {"task0": {"mse": ...}, "task1": {"mse": ...}}

The options come in four groups, :class:`TrainOptions`, :class:`EvalOptions`,
:class:`CheckpointOptions` and :class:`LogOptions`; ``fit`` takes them as dataclasses
(``fit(model, splits, opt, train=TrainOptions(epochs=10), log=LogOptions(progress=False))``)
or field by field as keywords (``epochs=10, progress=False``).

Nothing here prints; the only output is an optional tqdm progress bar on stderr (``progress``).

Modules: :mod:`._loop` (``fit``), :mod:`._options`, :mod:`._losses`, :mod:`._closure`,
:mod:`._evaluate`, :mod:`._state`, :mod:`._checkpoint`, :mod:`._result`.
"""

from ._checkpoint import CheckpointError
from ._closure import _make_closure as _make_closure  # pre-package private spelling
from ._evaluate import HIGHER_IS_BETTER, evaluate, selection_score
from ._loop import fit
from ._losses import task_loss_fns
from ._options import CheckpointOptions, EvalOptions, FitKeywords, LogOptions, TrainOptions
from ._result import TrainResult

__all__ = [
    "HIGHER_IS_BETTER",
    "CheckpointError",
    "CheckpointOptions",
    "EvalOptions",
    "FitKeywords",
    "LogOptions",
    "TrainOptions",
    "TrainResult",
    "evaluate",
    "fit",
    "selection_score",
    "task_loss_fns",
]
