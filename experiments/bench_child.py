"""Memory child of ``python -m experiments bench``: one mode, one fresh process, peak RSS.

``python -m experiments.bench_child '<json spec>'`` builds the model of the spec, runs its
steps and prints one line ``BENCH_CHILD_RESULT {"maxrss_kb": ...}`` (``ru_maxrss``, KiB on
Linux). Started by :func:`experiments.bench.run_memory_child`; not meant to be run by hand.
"""

from __future__ import annotations

import json
import sys

from experiments.bench import CHILD_MARKER, memory_child


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m experiments.bench_child '<json spec>'", file=sys.stderr)
        return 2
    result = memory_child(json.loads(argv[0]))
    print(CHILD_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
