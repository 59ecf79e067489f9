"""``python -m experiments.bench [options]``: the benchmark without the dispatcher."""

from experiments.bench.cli import main

raise SystemExit(main())
