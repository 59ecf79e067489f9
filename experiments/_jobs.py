"""Running a function over argument tuples, in this process or in spawned worker processes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["Log", "run_jobs"]

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    return None


def _worker_init(threads: int) -> None:
    torch.set_num_threads(max(1, int(threads)))


def _in_worker(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, list[str]]:
    lines: list[str] = []
    return fn(*args, progress=False, log=lines.append), lines


def run_jobs(
    fn: Callable[..., Any],
    arg_list: Sequence[tuple[Any, ...]],
    *,
    jobs: int = 1,
    progress: bool | None = None,
    log: Log = _quiet,
) -> list[Any]:
    """``[fn(*args, progress=..., log=...) for args in arg_list]``, in ``jobs`` processes.

    With ``jobs > 1`` the calls run in spawned worker processes (one torch thread each, no
    progress bars); their log lines are printed when a call finishes. Results keep the order
    of ``arg_list``.
    """
    if jobs <= 1 or len(arg_list) <= 1:
        return [fn(*args, progress=progress, log=log) for args in arg_list]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    results: list[Any] = [None] * len(arg_list)
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(arg_list)),
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(torch.get_num_threads(),),
    ) as pool:
        futures = {pool.submit(_in_worker, fn, args): i for i, args in enumerate(arg_list)}
        for fut in as_completed(futures):
            value, lines = fut.result()
            for line in lines:
                log(line)
            results[futures[fut]] = value
    return results
