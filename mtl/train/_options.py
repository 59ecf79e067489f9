"""The options of :func:`mtl.train.fit`, in four small groups.

``fit`` takes each group as a frozen dataclass (``train=``, ``evaluation=``, ``checkpoint=``,
``log=``) and, for compatibility, every one of its historical keywords (``epochs=``,
``checkpoint_path=`` ...): :data:`KEYWORDS` maps each keyword onto its group and field, and a
keyword overrides the field of a dataclass passed alongside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, TypeAlias, TypedDict

import torch
from torch import Tensor

from .._info import BalanceInfo

__all__ = [
    "KEYWORDS",
    "LEVELS",
    "CheckpointOptions",
    "EvalOptions",
    "FitKeywords",
    "FitOptions",
    "Level",
    "LogOptions",
    "Regularizer",
    "SelectionMetric",
    "TrainOptions",
    "resolve_options",
]

Level: TypeAlias = Literal["representation", "parameters"]
LEVELS: tuple[str, ...] = ("representation", "parameters")
#: ``callable(model, features, targets, loss_fns)`` or a perturbation regularizer (LSPR/SCR).
Regularizer: TypeAlias = Callable[..., Any]
SelectionMetric: TypeAlias = str | Callable[[Mapping[str, Mapping[str, float]]], float] | None


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class TrainOptions:
    """What is trained, and how.

    Attributes:
        level: gradient source, ``"representation"`` (default: ``optimizer.backward(losses,
            representation=out.representation)``) or ``"parameters"``
            (``shared_parameters=model.shared_parameters()``).
        epochs: maximum number of epochs (a resumed run continues up to this number).
        batch_size: training batch size (batches are shuffled every epoch).
        seed: seeds the shuffling generator and torch's global RNG (dropout) at the start of a
            fresh run (model initialisation is the caller's business).
        max_steps: stop after this many optimizer steps in total (a checkpoint written at that
            point resumes mid-epoch exactly).
        device: where the model and the data are moved.
        regularizer: the K losses to balance instead of the plain per-task losses. Either
            ``callable(model, features, targets, loss_fns)`` returning the K losses (the
            representation is then taken from the first forward call of the model inside it)
            or ``(losses, model_output)``; or a perturbation regularizer (LSPR, SCR): a class
            whose class attribute ``perturbs_representation`` is ``True``, called as
            ``reg(out.representation, out.heads, targets, loss_fns, outputs=..., kinds=...)``
            and offering ``closure(heads, targets, loss_fns, kinds=...)``, ``state_dict()``
            and ``load_state_dict()`` (its state is checkpointed). A user-written regularizer
            of that shape sets ``perturbs_representation: ClassVar[bool] = True``.
        use_closure: pass ``closure=`` to ``optimizer.backward`` (MARIGOLD): at the parameter
            level a zero-argument callable re-running the model on the same batch (same
            dropout masks) and returning the K losses; at the representation level a callable
            mapping a shifted representation to the K losses. ``None`` (default): when the
            optimizer's class sets ``needs_closure``.
        scheduler: a learning-rate scheduler of the inner optimizer (e.g.
            ``torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)``), stepped once at
            the end of every epoch and saved in checkpoints.
    """

    level: Level = "representation"
    epochs: int = 10
    batch_size: int = 256
    seed: int = 0
    max_steps: int | None = None
    device: torch.device | str = "cpu"
    regularizer: Regularizer | None = None
    use_closure: bool | None = None
    scheduler: Any = None

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        _check_int("epochs", self.epochs, 0)
        _check_int("batch_size", self.batch_size, 1)
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")


@dataclass(frozen=True)
class EvalOptions:
    """Validation, model selection and the final evaluation.

    Attributes:
        early_stopping_patience: stop after this many evaluations without improvement of the
            validation score (``None``: never stop early).
        eval_every: evaluate on the validation split every this many epochs (the last epoch is
            always evaluated).
        selection_metric: validation score to maximise (see :func:`mtl.train.selection_score`):
            ``None`` = mean of AUC (binary) / −MSE (regression); or a metric name,
            ``"task/metric"``, or a callable.
        restore_best: load the best validation state into the model at the end.
        eval_batch_size: batch size of evaluation.
        evaluate_test: compute ``TrainResult.test_metrics`` on ``splits.test`` at the end.
    """

    early_stopping_patience: int | None = None
    eval_every: int = 1
    selection_metric: SelectionMetric = None
    restore_best: bool = True
    eval_batch_size: int = 4096
    evaluate_test: bool = True

    def __post_init__(self) -> None:
        _check_int("eval_every", self.eval_every, 1)
        patience = self.early_stopping_patience
        if patience is not None and patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1, got {patience}")


@dataclass(frozen=True)
class CheckpointOptions:
    """Checkpoint and resume (``fit`` keywords ``checkpoint_path``, ``resume``,
    ``checkpoint_every``).

    Attributes:
        path: write a checkpoint (model, ``optimizer.state_dict()``, scheduler and regularizer
            state, RNG states, epoch/step, history, best state) after every ``every`` epochs,
            at the end, and when ``max_steps`` stops the run. It is written atomically (a
            temporary file in the same directory, then :func:`os.replace`) and holds only
            tensors, numbers, strings and containers, so resuming loads it with
            ``torch.load(weights_only=True)`` and never runs code from the file.
        resume: continue from ``path`` when it exists (fresh start otherwise); the continuation
            is exact (same parameters as an uninterrupted run on CPU). ``level``,
            ``batch_size``, ``seed`` and K must match the checkpoint.
        every: epochs between checkpoints.
    """

    path: str | os.PathLike[str] | None = None
    resume: bool = False
    every: int = 1

    def __post_init__(self) -> None:
        _check_int("checkpoint_every", self.every, 1)
        if self.resume and self.path is None:
            raise ValueError("resume=True needs a checkpoint_path (CheckpointOptions.path)")


@dataclass(frozen=True)
class LogOptions:
    """Progress display, callbacks and the recorded weight trace.

    Attributes:
        progress: tqdm progress bar on stderr; ``None`` (default): only when stderr is a TTY.
        desc: label of the progress bar.
        on_step: ``callback(step, info)`` after every optimizer step (``step`` counts from 1).
        before_backward: ``callback(step, losses, output)`` after ``zero_grad()`` and before
            the balanced backward of every step (the same ``step`` number ``on_step`` gets
            next), with the K task losses and the model output while their graph is alive:
            e.g. ``lambda s, losses, out: tracker.update_parameter_level(s, losses,
            model.shared_parameters())`` for parameter-level conflict probes. It must not free
            the graph (use ``retain_graph=True`` or ``autograd.grad``).
        trace_points: resolution of ``TrainResult.weights_trace``.
    """

    progress: bool | None = None
    desc: str | None = None
    on_step: Callable[[int, BalanceInfo], Any] | None = None
    before_backward: Callable[[int, list[Tensor], Any], Any] | None = None
    trace_points: int = 200


@dataclass(frozen=True)
class FitOptions:
    """All four groups, as :func:`resolve_options` returns them."""

    train: TrainOptions = field(default_factory=TrainOptions)
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    log: LogOptions = field(default_factory=LogOptions)


class FitKeywords(TypedDict, total=False):
    """The keywords of :func:`mtl.train.fit` (each one a field of an options dataclass)."""

    level: Level
    epochs: int
    batch_size: int
    seed: int
    max_steps: int | None
    device: torch.device | str
    regularizer: Regularizer | None
    use_closure: bool | None
    scheduler: Any
    early_stopping_patience: int | None
    eval_every: int
    selection_metric: SelectionMetric
    restore_best: bool
    eval_batch_size: int
    evaluate_test: bool
    checkpoint_path: str | os.PathLike[str] | None
    resume: bool
    checkpoint_every: int
    progress: bool | None
    desc: str | None
    on_step: Callable[[int, BalanceInfo], Any] | None
    before_backward: Callable[[int, list[Tensor], Any], Any] | None
    trace_points: int


_GROUPS: dict[str, type[Any]] = {
    "train": TrainOptions,
    "evaluation": EvalOptions,
    "checkpoint": CheckpointOptions,
    "log": LogOptions,
}
_RENAMED = {"checkpoint_path": "path", "checkpoint_every": "every"}

#: ``fit`` keyword -> (group, field).
KEYWORDS: dict[str, tuple[str, str]] = {
    key: (group, _RENAMED.get(key, key))
    for key in FitKeywords.__annotations__
    for group, cls in _GROUPS.items()
    if _RENAMED.get(key, key) in {f.name for f in fields(cls)}
}


def resolve_options(
    train: TrainOptions | None,
    evaluation: EvalOptions | None,
    checkpoint: CheckpointOptions | None,
    log: LogOptions | None,
    keywords: Mapping[str, Any],
) -> FitOptions:
    """The options of one ``fit`` call: the given dataclasses (defaults for those not given),
    with the fields named by ``keywords`` replaced."""
    groups: dict[str, Any] = {
        "train": TrainOptions() if train is None else train,
        "evaluation": EvalOptions() if evaluation is None else evaluation,
        "checkpoint": CheckpointOptions() if checkpoint is None else checkpoint,
        "log": LogOptions() if log is None else log,
    }
    for name, cls in _GROUPS.items():
        if not isinstance(groups[name], cls):
            raise TypeError(f"{name}= must be a {cls.__name__}, got {type(groups[name]).__name__}")
    changes: dict[str, dict[str, Any]] = {}
    for key, value in keywords.items():
        if key not in KEYWORDS:
            raise TypeError(f"fit() got an unexpected keyword argument {key!r}")
        group, name = KEYWORDS[key]
        changes.setdefault(group, {})[name] = value
    for group, fields_ in changes.items():
        groups[group] = replace(groups[group], **fields_)
    return FitOptions(**groups)
