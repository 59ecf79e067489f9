"""Checkpoint and resume for :func:`mtl.train.fit`.

A checkpoint holds only tensors, ``None``/bool/int/float/str and dicts, lists and tuples of
them (NumPy values are converted on the way in: the NumPy and Python RNG states become tensors
and ints), so it is read back with ``torch.load(weights_only=True)``: loading a crafted file
cannot run code. It is written atomically: to a temporary file in the same directory, flushed
to disk, then moved over the old one with :func:`os.replace`, so a crash mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._optimizer import BalancedOptimizer
from ._losses import is_perturbation
from ._state import Accum, RunState

__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "Checkpointer", "fingerprint", "to_plain"]

#: 2: weights-only payload (format 1 pickled NumPy's RNG state as an ndarray).
CHECKPOINT_VERSION = 2

_REQUIRED = (
    "version", "fingerprint", "finished", "model", "optimizer", "scheduler", "regularizer", "rng",
    "epoch", "batch_in_epoch", "step", "history", "best_score", "best_epoch", "best_state",
    "bad_evals", "stopped_early", "accum", "weights_steps", "step_times", "iter_times",
    "train_time_s",
)  # fmt: skip
_SCALARS = (type(None), bool, int, float, str)
_TORCH_LEAVES = (Tensor, nn.Parameter, torch.Size, torch.dtype, torch.device)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: unreadable, truncated, from another format, or
    holding objects a weights-only load refuses. The message names the file."""


def fingerprint(level: str, batch_size: int, seed: int, num_tasks: int) -> dict[str, Any]:
    """The settings a resumed run must share with the run that wrote the checkpoint."""
    return {
        "level": level,
        "batch_size": int(batch_size),
        "seed": int(seed),
        "num_tasks": num_tasks,
    }


# ---------------------------------------------------------------------------- plain values
def to_plain(obj: Any, where: str) -> Any:
    """``obj`` with NumPy values converted (scalars to Python numbers, numeric arrays to
    tensors, 16-64-bit unsigned arrays to lists of ints); ``obj`` itself when nothing needed
    converting. Raises :class:`TypeError` naming the entry (``where`` and the keys below it) for
    anything a weights-only load would refuse."""
    try:
        return _plain(obj)
    except _Refused as err:
        at = where + "".join(reversed(err.path))
        kind = f"{type(err.obj).__module__}.{type(err.obj).__qualname__}"
        raise TypeError(
            f"{at} is a {kind}: a checkpoint holds only tensors, None, bool, int, float, str and "
            "dicts/lists/tuples of them (return such values from state_dict())"
        ) from None


class _Refused(Exception):
    """An object a weights-only load would refuse; ``path`` collects the keys on the way up."""

    def __init__(self, obj: Any) -> None:
        super().__init__()
        self.obj = obj
        self.path: list[str] = []


def _plain(obj: Any) -> Any:
    if type(obj) in _SCALARS or type(obj) in _TORCH_LEAVES:
        return obj
    if isinstance(obj, Tensor):  # a tensor subclass
        return obj.detach().as_subclass(Tensor)
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return obj.item()
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
        if obj.dtype.kind == "u" and obj.dtype.itemsize > 1:
            return obj.tolist()
        return torch.from_numpy(np.array(obj, copy=True))
    if isinstance(obj, dict):
        return _plain_dict(obj)
    if type(obj) not in (list, tuple):
        raise _Refused(obj)
    items = [_at(i, v) for i, v in enumerate(obj)]
    if all(a is b for a, b in zip(items, obj)):
        return obj
    return items if type(obj) is list else tuple(items)


def _at(key: Any, value: Any, note: str = "") -> Any:
    """``_plain(value)``, adding ``[key]`` to the path of a refusal."""
    try:
        return _plain(value)
    except _Refused as err:
        err.path.append(f"[{key!r}]{note}")
        raise


def _plain_dict(obj: dict[Any, Any]) -> dict[Any, Any]:
    out = {_at(k, k, " (a key)"): _at(k, v) for k, v in obj.items()}
    if not isinstance(obj, OrderedDict):
        same = type(obj) is dict
        return obj if same and _unchanged(out, obj) else out
    attrs = _at("__dict__", vars(obj))  # a module state dict's _metadata
    if type(obj) is OrderedDict and _unchanged(out, obj) and attrs is vars(obj):
        return obj
    new: OrderedDict[Any, Any] = OrderedDict(out)
    vars(new).update(attrs)
    return new


def _unchanged(out: dict[Any, Any], obj: dict[Any, Any]) -> bool:
    return len(out) == len(obj) and all(
        k is k2 and obj[k2] is v for (k, v), k2 in zip(out.items(), obj)
    )


def _numpy_rng_state() -> dict[str, Any]:
    legacy: tuple[str, np.ndarray[Any, Any], int, int, float]
    legacy = np.random.get_state(legacy=True)  # type: ignore[assignment]  # noqa: NPY002
    kind, keys, pos, has_gauss, gauss = legacy
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _set_numpy_rng_state(st: dict[str, Any]) -> None:
    keys = st["keys"].numpy().astype(np.uint32)
    state = (st["kind"], keys, int(st["pos"]), int(st["has_gauss"]), float(st["gauss"]))
    np.random.set_state(state)  # noqa: NPY002


def _python_rng_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {
        "version": int(version),
        "internal": torch.tensor(internal, dtype=torch.int64),
        "gauss_next": gauss_next,
    }


def _set_python_rng_state(st: dict[str, Any]) -> None:
    internal = tuple(int(v) for v in st["internal"].tolist())
    random.setstate((int(st["version"]), internal, st["gauss_next"]))


# ---------------------------------------------------------------------------- files
def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then :func:`os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if os.name == "posix":  # make the rename itself durable
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of ``path``, loaded with ``weights_only=True``; :class:`CheckpointError`
    naming the file when it is truncated, unreadable, unsafe or of another format."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((ln for ln in str(err).splitlines() if "nsupported" in ln), "")
        raise CheckpointError(
            f"refusing to resume from checkpoint {path}: it holds objects other than tensors, "
            "numbers, strings and containers, and loading them could run code from the file"
            + (f" ({reason.strip()})" if reason else "")
            + ". Checkpoints written by mtl before checkpoint format 2 stored NumPy state "
            "this way; delete or move the file to start afresh."
        ) from err
    except Exception as err:
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated, or not a checkpoint of mtl.train.fit): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        version = payload.get("version") if isinstance(payload, dict) else None
        raise CheckpointError(
            f"{path}: unsupported checkpoint version {version!r} (expected {CHECKPOINT_VERSION})"
        )
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks the entries {missing}")
    return payload


# ---------------------------------------------------------------------------- save / load
@dataclass
class Checkpointer:
    """Writes and reads the checkpoint of one run."""

    path: Path
    model: nn.Module
    optimizer: BalancedOptimizer
    scheduler: Any
    regularizer: Any
    generator: torch.Generator
    fingerprint: dict[str, Any]
    devices: list[int]

    def save(self, state: RunState, finished: bool) -> None:
        """Write the checkpoint of ``state`` (atomically)."""
        reg = self.regularizer
        payload: dict[str, Any] = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            "finished": finished,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "regularizer": reg.state_dict() if is_perturbation(reg) else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": [torch.cuda.get_rng_state(d) for d in self.devices],
                "generator": self.generator.get_state(),
                "epoch_generator": state.epoch_gen_state,
                "numpy": _numpy_rng_state(),
                "python": _python_rng_state(),
            },
            **_state_entries(state),
        }
        try:
            payload = to_plain(payload, "checkpoint")
        except TypeError as err:
            raise TypeError(f"cannot write checkpoint {self.path}: {err}") from err
        _atomic_save(payload, self.path)

    def load(self) -> RunState:
        """Restore the model, optimizer, scheduler, regularizer and RNG states from the
        checkpoint; returns the loop state to continue from."""
        path = self.path
        payload = read_checkpoint(path)
        saved = payload["fingerprint"]
        diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"cannot resume from {path}: settings differ ({detail})")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if is_perturbation(self.regularizer):
            if payload["regularizer"] is None:
                raise CheckpointError(f"{path}: the checkpoint holds no regularizer state")
            self.regularizer.load_state_dict(payload["regularizer"])
        if self.scheduler is not None:
            if payload["scheduler"] is None:
                raise CheckpointError(f"{path}: the checkpoint holds no scheduler state")
            self.scheduler.load_state_dict(payload["scheduler"])
        try:
            self._restore_rng(payload["rng"])
            return _state_from_entries(payload, int(self.fingerprint["num_tasks"]))
        except (KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(
                f"{path}: malformed checkpoint ({type(err).__name__}: {err})"
            ) from err

    def _restore_rng(self, rng: dict[str, Any]) -> None:
        torch.set_rng_state(rng["torch"])
        for d, st in zip(self.devices, rng.get("cuda") or []):
            torch.cuda.set_rng_state(st, d)
        self.generator.set_state(rng["generator"])
        _set_numpy_rng_state(rng["numpy"])
        _set_python_rng_state(rng["python"])


def _state_entries(state: RunState) -> dict[str, Any]:
    return {
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "step": state.step,
        "history": state.history,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "best_state": state.best_state,
        "bad_evals": state.bad_evals,
        "stopped_early": state.stopped_early,
        "accum": None if state.accum is None else state.accum.state(),
        "weights_steps": state.weights_steps,
        "step_times": state.step_times,
        "iter_times": state.iter_times,
        "train_time_s": state.train_time_s,
    }


def _state_from_entries(payload: dict[str, Any], k: int) -> RunState:
    accum = payload["accum"]
    best_epoch = payload["best_epoch"]
    return RunState(
        num_tasks=k,
        epoch=int(payload["epoch"]),
        batch_in_epoch=int(payload["batch_in_epoch"]),
        step=int(payload["step"]),
        history=list(payload["history"]),
        best_score=float(payload["best_score"]),
        best_epoch=None if best_epoch is None else int(best_epoch),
        best_state=payload["best_state"],
        bad_evals=int(payload["bad_evals"]),
        stopped_early=bool(payload["stopped_early"]),
        epoch_gen_state=payload["rng"]["epoch_generator"],
        accum=None if accum is None else Accum.from_state(k, accum),
        weights_steps=[list(w) for w in payload["weights_steps"]],
        step_times=list(payload["step_times"]),
        iter_times=list(payload["iter_times"]),
        train_time_s=float(payload["train_time_s"]),
    )
