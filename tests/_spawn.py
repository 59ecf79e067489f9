"""Shared plumbing of the multi-process tests: spawn the ranks, wait, collect what they saved."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn_ranks(
    worker: Callable[..., None],
    tmp: Path,
    world: int,
    *,
    timeout: float = 240.0,
    weights_only: bool = True,
) -> list[Any]:
    """Run ``worker(rank, init_file, out_dir)`` in ``world`` spawned gloo processes and return
    what each rank saved as ``out_dir/rank{r}.pt``.

    A rank that fails writes its traceback to ``out_dir/{rank}.err`` (the test fails with it);
    a rank still alive after ``timeout`` seconds is killed and the test fails ("a rank hung"):
    a distributed bug shows up as a failure, never as a hanging suite.
    """
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available on this platform")
    sys.path.insert(0, str(Path(__file__).parent))  # the spawned children import the test module
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.start_processes(
        worker, args=(str(tmp / "init"), str(tmp)), nprocs=world, join=False, start_method="spawn"
    )
    for proc in ctx.processes:
        proc.join(timeout=timeout)
    hung = [p for p in ctx.processes if p.is_alive()]
    for p in hung:
        p.kill()
    errors = [f.read_text() for f in sorted(tmp.glob("*.err"))]
    assert not errors, errors
    assert not hung, "a rank hung"
    return [torch.load(tmp / f"rank{r}.pt", weights_only=weights_only) for r in range(world)]
