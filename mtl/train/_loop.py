"""The training loop: :func:`fit`."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor, nn

from .._optimizer import BalancedOptimizer
from ._checkpoint import Checkpointer, fingerprint
from ._closure import get_rng, make_closure, rng_devices
from ._evaluate import evaluate, selection_score
from ._losses import LossContext, forward_losses, task_loss_fns
from ._options import (
    CheckpointOptions,
    EvalOptions,
    FitOptions,
    LogOptions,
    TrainOptions,
    resolve_options,
)
from ._result import TrainResult, build_result
from ._state import Accum, RunState, epoch_record

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._options import FitKeywords

__all__ = ["fit"]


class _SharedModel(Protocol):
    def shared_parameters(self) -> Iterable[Tensor]: ...


def fit(
    model: nn.Module,
    splits: Any,
    optimizer: BalancedOptimizer,
    *,
    train: TrainOptions | None = None,
    evaluation: EvalOptions | None = None,
    checkpoint: CheckpointOptions | None = None,
    log: LogOptions | None = None,
    **keywords: Unpack[FitKeywords],
) -> TrainResult:
    """Train ``model`` on ``splits.train`` with a balancer; select on ``splits.valid``.

    Each step: forward, the K task losses (:func:`task_loss_fns`: BCE-with-logits for binary
    tasks, MSE for regression; or a regularizer), ``optimizer.zero_grad()``,
    ``optimizer.backward(losses, representation=out.representation)`` (``level=
    "representation"``) or ``shared_parameters=model.shared_parameters()`` (``"parameters"``),
    ``optimizer.step()``. The time of backward + step is measured per step. Per-epoch
    validation, early stopping, restore of the best state, a per-epoch history,
    checkpoint/resume.

    Args:
        model: a multi-task model (``model(features)`` returns ``task_outputs`` and
            ``representation``; ``shared_parameters()`` for the parameter level).
        splits: a :class:`tasks.DataSplits` (``train``, ``valid``, ``test``, ``tasks``).
        optimizer: any :class:`mtl.BalancedOptimizer` over the model's parameters. Its class
            flag ``needs_closure`` (MARIGOLD) makes ``fit`` pass ``closure=`` to ``backward``.
        train: :class:`TrainOptions`: ``level``, ``epochs``, ``batch_size``, ``seed``,
            ``max_steps``, ``device``, ``regularizer``, ``use_closure``, ``scheduler``.
            A perturbation regularizer (LSPR/SCR, or a user-written one) is recognised by its
            class attribute ``perturbs_representation = True``.
        evaluation: :class:`EvalOptions`: ``early_stopping_patience``, ``eval_every``,
            ``selection_metric``, ``restore_best``, ``eval_batch_size``, ``evaluate_test``.
        checkpoint: :class:`CheckpointOptions`: ``path`` (keyword ``checkpoint_path``),
            ``resume``, ``every`` (keyword ``checkpoint_every``). Checkpoints are written
            atomically and loaded with ``torch.load(weights_only=True)``; an unreadable,
            truncated or unsafe file raises :class:`CheckpointError` naming it.
        log: :class:`LogOptions`: ``progress``, ``desc``, ``on_step``, ``before_backward``,
            ``trace_points``.
        **keywords: any field of the four groups by its ``fit`` keyword (``epochs=5``,
            ``checkpoint_path="run.pt"`` ...); a keyword overrides the field of a dataclass
            passed alongside it. The dataclasses document every field.

    Returns:
        A :class:`TrainResult`.
    """
    opts = resolve_options(train, evaluation, checkpoint, log, keywords)
    run = _Run(model, splits, optimizer, opts)
    interrupted = False
    with _progress_bar(opts.log, run.total_steps(), run.state.step) as bar:
        run.bar = bar
        run.t_start = time.perf_counter() - run.state.train_time_s
        while not interrupted and run.more_epochs():
            interrupted = not run.train_epoch()
            if not interrupted:
                run.end_epoch()
        run.end_training(interrupted)
    return run.result()


class _Run:
    """One call of :func:`fit`: its options, data, loop state and bookkeeping."""

    def __init__(
        self, model: nn.Module, splits: Any, optimizer: BalancedOptimizer, opts: FitOptions
    ) -> None:
        if not isinstance(optimizer, BalancedOptimizer):
            raise TypeError(
                f"optimizer must be a BalancedOptimizer (e.g. balancers.EqualWeight), got "
                f"{type(optimizer).__name__}"
            )
        t = opts.train
        self.opts, self.model, self.optimizer, self.splits = opts, model, optimizer, splits
        self.tasks = list(splits.tasks)
        k = len(self.tasks)
        if optimizer.num_tasks is not None and optimizer.num_tasks != k:
            raise ValueError(f"optimizer has num_tasks={optimizer.num_tasks} but the data has {k}")
        self.task_names = [task.name for task in self.tasks]
        kinds = [task.kind for task in self.tasks]
        self.losses = LossContext(model, task_loss_fns(self.tasks), kinds, t.regularizer)
        self.device = torch.device(t.device)
        model.to(self.device)
        self.train_data, self.valid = splits.train.to(self.device), splits.valid.to(self.device)
        self.shared = (
            list(cast(_SharedModel, model).shared_parameters()) if t.level == "parameters" else None
        )
        needs = type(optimizer).needs_closure
        self.closure_on = needs if t.use_closure is None else bool(t.use_closure)
        self.rng_devices = rng_devices(self.device)
        self.generator = torch.Generator(device=self.device)
        self.checkpointer = self._checkpointer(k)
        self.state = self._initial_state(k)
        self.bar: Any = None
        self.t_start = time.perf_counter()
        self.t_epoch = self.t_start

    def _checkpointer(self, k: int) -> Checkpointer | None:
        t, path = self.opts.train, self.opts.checkpoint.path
        if path is None:
            return None
        return Checkpointer(
            Path(path),
            self.model,
            self.optimizer,
            t.scheduler,
            t.regularizer,
            self.generator,
            fingerprint(t.level, t.batch_size, t.seed, k),
            self.rng_devices,
        )

    def _initial_state(self, k: int) -> RunState:
        ckpt = self.checkpointer
        if self.opts.checkpoint.resume and ckpt is not None and ckpt.path.exists():
            return ckpt.load()
        self.generator.manual_seed(int(self.opts.train.seed))
        torch.manual_seed(int(self.opts.train.seed))
        return RunState(num_tasks=k)

    # ------------------------------------------------------------------ loop
    def total_steps(self) -> int:
        t = self.opts.train
        total = t.epochs * int(self.train_data.num_batches(t.batch_size))
        return total if t.max_steps is None else min(total, t.max_steps)

    def more_epochs(self) -> bool:
        return not self.state.stopped_early and self.state.epoch < self.opts.train.epochs

    def _step_limit_reached(self) -> bool:
        max_steps = self.opts.train.max_steps
        return max_steps is not None and self.state.step >= max_steps

    def train_epoch(self) -> bool:
        """Train the (rest of the) current epoch; ``False`` when ``max_steps`` cut it short."""
        st = self.state
        if self._step_limit_reached():
            return False
        if st.batch_in_epoch == 0:
            st.epoch_gen_state = self.generator.get_state()
            st.accum = Accum(len(self.tasks))
        else:  # resumed mid-epoch: replay the epoch's shuffle
            assert st.epoch_gen_state is not None
            self.generator.set_state(st.epoch_gen_state)
        self.model.train()
        self.t_epoch = time.perf_counter()
        batches = self.train_data.batches(
            self.opts.train.batch_size, shuffle=True, generator=self.generator
        )
        for b, (features, targets) in enumerate(batches):
            if b < st.batch_in_epoch:
                continue  # resumed mid-epoch: these batches were already trained on
            if self._step_limit_reached():
                return False
            self._step(b, features, targets)
        return True

    def _step(self, b: int, features: Any, targets: Any) -> None:
        log = self.opts.log
        t_iter = time.perf_counter()
        rng_state = get_rng(self.rng_devices) if self.closure_on else None
        losses, out = forward_losses(self.losses, features, targets)
        self.optimizer.zero_grad()
        kwargs: dict[str, Any] = (
            {"representation": out.representation}
            if self.shared is None
            else {"shared_parameters": self.shared}
        )
        if rng_state is not None:
            # FAMO re-runs the model at both levels; MARIGOLD maps a shifted representation
            reruns = type(self.optimizer).closure_reruns_model
            kwargs["closure"] = make_closure(
                "parameters" if reruns else self.opts.train.level, self.losses, out, features,
                targets, rng_state, self.rng_devices,
            )  # fmt: skip
        if log.before_backward is not None:
            log.before_backward(self.state.step + 1, losses, out)
        t0 = time.perf_counter()
        info = self.optimizer.backward(losses, **kwargs)
        self.optimizer.step()
        t1 = time.perf_counter()
        self.state.record_step(b, info, t1 - t0, t1 - t_iter)
        if log.on_step is not None:
            log.on_step(self.state.step, info)
        if self.bar is not None:
            self.bar.update(1)

    def end_epoch(self) -> None:
        """Book a completed epoch: history, validation, scheduler, checkpoint."""
        st, epochs = self.state, self.opts.train.epochs
        assert st.accum is not None
        st.epoch += 1
        st.batch_in_epoch = 0
        rec = epoch_record(st, st.accum, self.task_names, time.perf_counter() - self.t_epoch)
        rec["lr"] = float(self.optimizer.param_groups[0]["lr"])
        ev = self.opts.evaluation
        if st.epoch % ev.eval_every == 0 or st.epoch == epochs:
            self._validate(rec, ev.early_stopping_patience)
        st.history.append(rec)
        if self.bar is not None:
            self.bar.set_postfix(epoch=st.epoch, score=f"{st.best_score:.4g}", refresh=False)
        st.accum = None
        if self.opts.train.scheduler is not None:
            self.opts.train.scheduler.step()
        last = st.stopped_early or st.epoch == epochs
        st.train_time_s = time.perf_counter() - self.t_start
        if last or st.epoch % self.opts.checkpoint.every == 0:
            self._save(finished=last)

    def end_training(self, interrupted: bool) -> None:
        """After the loop; when ``max_steps`` stopped it, checkpoint and evaluate the partial
        epoch (for the returned result only: the checkpoint holds the state before this
        evaluation, so a resumed run is unaffected)."""
        st = self.state
        st.train_time_s = time.perf_counter() - self.t_start
        if not interrupted:
            return
        self._save(finished=False)
        if st.batch_in_epoch > 0 and st.accum is not None:
            rec = epoch_record(st, st.accum, self.task_names, 0.0)
            rec["epoch"] = st.epoch + 1
            rec["partial"] = True
            self._validate(rec, None)
            st.history.append(rec)

    def _validate(self, rec: dict[str, Any], patience: int | None) -> None:
        ev = self.opts.evaluation
        t0 = time.perf_counter()
        metrics = evaluate(self.model, self.valid, ev.eval_batch_size)
        score = selection_score(metrics, self.tasks, ev.selection_metric)
        rec["valid"] = metrics
        rec["score"] = score
        rec["eval_time_s"] = time.perf_counter() - t0
        self.state.record_score(score, rec["epoch"], self.model, patience)

    def _save(self, finished: bool) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(self.state, finished)

    def result(self) -> TrainResult:
        """Restore the best state (``restore_best``), evaluate, and summarise the run."""
        st, ev = self.state, self.opts.evaluation
        if ev.restore_best and st.best_state is not None:
            self.model.load_state_dict(st.best_state)
        valid_metrics = evaluate(self.model, self.valid, ev.eval_batch_size)
        test_metrics = None
        test = getattr(self.splits, "test", None)
        if ev.evaluate_test and test is not None and len(test) > 0:
            test_metrics = evaluate(self.model, test.to(self.device), ev.eval_batch_size)
        return build_result(
            st, self.task_names, valid_metrics, test_metrics, self.opts.log.trace_points
        )


def _progress_enabled(progress: bool | None) -> bool:
    if progress is None:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False
    return bool(progress)


@contextmanager
def _progress_bar(log: LogOptions, total: int, initial: int) -> Iterator[Any]:
    """A tqdm bar on stderr (``None`` when disabled), closed on exit."""
    if not _progress_enabled(log.progress):
        yield None
        return
    tqdm = importlib.import_module("tqdm.auto").tqdm
    bar = tqdm(
        total=total,
        initial=min(initial, total),
        desc=log.desc,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        unit="step",
    )
    try:
        yield bar
    finally:
        bar.close()
