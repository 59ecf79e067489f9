"""The state of a training run: what a checkpoint saves and a resumed run continues from."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._info import BalanceInfo

__all__ = ["Accum", "RunState", "epoch_record", "mean_weights"]


def mean_weights(w: Tensor) -> list[float]:
    """Balancer coefficients as K floats (averaged over blocks for per-block methods)."""
    w = w.detach().to(torch.float64)
    if w.dim() == 2:
        w = w.mean(0)
    values: list[float] = w.reshape(-1).tolist()
    return values


@dataclass
class Accum:
    """Running sums over the current epoch."""

    num_tasks: int
    loss_sum: list[float] = field(default_factory=list)
    weight_sum: list[float] = field(default_factory=list)
    count: int = 0
    skipped: int = 0
    step_time_sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.loss_sum:
            self.loss_sum = [0.0] * self.num_tasks
        if not self.weight_sum:
            self.weight_sum = [0.0] * self.num_tasks

    def add(self, info: BalanceInfo, step_time: float) -> None:
        self.step_time_sum += step_time
        if info.skipped:
            self.skipped += 1
            return
        losses = info.losses.tolist()
        weights = mean_weights(info.weights)
        for k in range(self.num_tasks):
            self.loss_sum[k] += losses[k]
            self.weight_sum[k] += weights[k]
        self.count += 1

    def state(self) -> dict[str, Any]:
        return {
            "loss_sum": list(self.loss_sum),
            "weight_sum": list(self.weight_sum),
            "count": self.count,
            "skipped": self.skipped,
            "step_time_sum": self.step_time_sum,
        }

    @classmethod
    def from_state(cls, num_tasks: int, st: Mapping[str, Any]) -> Accum:
        return cls(
            num_tasks,
            [float(v) for v in st["loss_sum"]],
            [float(v) for v in st["weight_sum"]],
            int(st["count"]),
            int(st["skipped"]),
            float(st["step_time_sum"]),
        )


@dataclass
class RunState:
    """Counters, history, the best state so far and per-step measurements."""

    num_tasks: int
    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # batches of the current (incomplete) epoch already trained
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int | None = None
    best_state: dict[str, Tensor] | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    epoch_gen_state: Tensor | None = None
    accum: Accum | None = None
    weights_steps: list[list[float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    iter_times: list[float] = field(default_factory=list)
    train_time_s: float = 0.0

    def record_step(
        self, batch: int, info: BalanceInfo, step_time: float, iter_time: float
    ) -> None:
        """Book one optimizer step on batch ``batch`` of the current epoch."""
        assert self.accum is not None
        self.step += 1
        self.batch_in_epoch = batch + 1
        self.step_times.append(step_time)
        self.iter_times.append(iter_time)
        self.accum.add(info, step_time)
        self.weights_steps.append(mean_weights(info.weights))

    def record_score(
        self, score: float, epoch: int, model: nn.Module, patience: int | None
    ) -> None:
        """Keep the model state when ``score`` improves; count evaluations without improvement
        and set ``stopped_early`` after ``patience`` of them."""
        if math.isfinite(score) and score > self.best_score:
            self.best_score = score
            self.best_epoch = epoch
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.bad_evals = 0
        else:
            self.bad_evals += 1
            if patience is not None and self.bad_evals >= patience:
                self.stopped_early = True


def epoch_record(
    state: RunState, accum: Accum, task_names: list[str], epoch_time: float
) -> dict[str, Any]:
    """One ``TrainResult.history`` entry (without the validation part)."""
    n = max(accum.count, 1)
    steps = accum.count + accum.skipped
    return {
        "epoch": state.epoch,
        "step": state.step,
        "train_loss": {
            name: (accum.loss_sum[k] / n if accum.count else float("nan"))
            for k, name in enumerate(task_names)
        },
        "weights_mean": [
            (accum.weight_sum[k] / n if accum.count else float("nan"))
            for k in range(len(task_names))
        ],
        "step_time_s": accum.step_time_sum / steps if steps else float("nan"),
        "epoch_time_s": epoch_time,
        "skipped": accum.skipped,
    }
