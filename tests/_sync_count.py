"""The host-sync counter the tests share: the benchmark's own (``experiments/bench/syncs.py``).

Usage::

    with SyncCounter() as sync:
        opt.backward(losses, representation=z)
    assert sync.count <= 1, sync.calls
"""

from __future__ import annotations

from experiments.bench.syncs import SYNC_NAMES, SyncCounter

__all__ = ["SYNC_NAMES", "SyncCounter"]
