"""The argument parser of ``python -m experiments`` (:func:`build_parser`) and its help texts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .tune_static import DEFAULT_GRID

__all__ = ["CSV_HELP", "OUT_HELP", "TASK_HELP", "build_parser"]

TASK_HELP = (
    "synthetic | census | toy | csv (or any tasks.load_task name, e.g. census1); csv: see "
    "'CSV task' below"
)

CSV_HELP = """\
CSV task (--task csv): any delimited text file with a header row, plain or gzipped.
It has no default configuration; the file and three data options are required:
  --data-path FILE                the file (data.path)
  --set 'data.numeric=[...]'      JSON list of numeric feature columns (standardized)
  --set 'data.categorical=[...]'  JSON list of categorical feature columns ([] for none)
  --set 'data.tasks.NAME=EXPR'    one per task: "col == 'x'", "col != 'x'", "col > 0"
                                  (== != > >= < <=), "col in ('a', 'b')", "col not in
                                  (...)", or a bare numeric column (regression; a 0/1
                                  column is binary)
Optional: data.delimiter (","), data.encoding ("utf-8"; a byte-order mark is skipped;
  e.g. latin-1), data.missing_values (["?", ""]), data.invalid_numbers ("error", or
  "missing": a numeric feature cell that is inf/nan or beyond the float32 range is imputed
  like a missing value), data.task_kinds ({"NAME": "regression"}), data.fractions
  ([0.6, 0.2, 0.2]), data.name, data.group_column (a user/query id column, never an input;
  adds GAUC to the tables).
Example:
  python -m experiments compare --task csv --data-path clicks.csv --balancers equal,mgda \\
    --set 'data.numeric=["age", "watch_time"]' --set 'data.categorical=["city"]' \\
    --set "data.tasks.clicked=clicks > 0" --set "data.tasks.rich=income == '>50K'" \\
    --epochs 10 --seeds 3 --out runs/clicks
Bad input is an error naming the file, line and column: a non-numeric, infinite or
out-of-range number in a numeric column, a label that is missing or not a number under a
comparison, bytes that do not decode, a ragged row. More: docs/experiments.md.
"""

OUT_HELP = (
    "output directory; refused before training if it is a file or already holds results "
    "(see --overwrite) or another run is writing there"
)


# ---------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help=TASK_HELP)
    p.add_argument(
        "--config",
        help="configuration file or name in experiments/configs/ (default: the task's own, "
        "e.g. synthetic, census, toy; others: census_group1, census_group3)",
    )
    p.add_argument("--model", help="shared_bottom | mmoe | ple (overrides model.name)")
    p.add_argument("--epochs", type=int, help="maximum number of epochs (train.epochs)")
    p.add_argument("--steps", type=int, help="toy: optimisation steps; others: train.max_steps")
    p.add_argument("--batch-size", type=int, help="train.batch_size")
    p.add_argument("--lr", type=float, help="learning rate of the inner optimizer")
    p.add_argument(
        "--level", choices=("representation", "parameters"), help="gradient source (train.level)"
    )
    p.add_argument("--device", help="torch device for training, e.g. cuda (train.device)")
    p.add_argument("--group", help="census task group: 1, 2, 3, mixed or mixed_sparse (data.group)")
    p.add_argument(
        "--regularizer",
        choices=("none", "scr", "lspr"),
        help="perturbation regularizer on the representation (regularizer.name); options with "
        "--set regularizer.epsilon=0.05 --set regularizer.rho=0.5",
    )
    p.add_argument("--data-path", help="census/csv data file or directory (data.path)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any configuration entry, e.g. --set data.num_samples=2000 "
        "--set balancers.gradops.alpha=-2 (JSON values)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: the config's, 1)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="parallel worker processes (seeds; for the toy, seed x balancer); default 1. "
        "Step times are measured per process: compare them only between runs with the same "
        "--jobs on an otherwise idle machine",
    )
    p.add_argument("--out", help=OUT_HELP)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (its other outputs are removed)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")


_Subparsers = argparse._SubParsersAction  # the object ``add_subparsers`` returns


def _task_command(sub: _Subparsers[Any], name: str, summary: str) -> argparse.ArgumentParser:
    """Subcommand ``name`` that trains on a task: the common options (:func:`_common`) and the
    CSV task's help after them."""
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, epilog=CSV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _common(p)
    return p


def _add_run(sub: _Subparsers[Any]) -> None:
    """``run``: one model, one balancer, one task, one seed."""
    p = _task_command(sub, "run", "one model, one balancer, one task, one seed")
    p.add_argument("--balancer", default="equal", help="balancer name (default equal)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="balancer option, e.g. --option normalization=l2 (repeatable)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--single-task", action="store_true", help="also train single-task baselines (Δm)"
    )


def _add_compare(sub: _Subparsers[Any]) -> None:
    """``compare``: every balancer side by side over seeds."""
    p = _task_command(sub, "compare", "every balancer side by side over seeds")
    p.add_argument(
        "--balancers", default="core",
        help="a comma-separated list of balancers and groups: 'core' (default: the six "
        "methods of the toolkit), 'loss', 'baselines', 'all' (every registered balancer; "
        "unavailable ones are skipped)",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, help="number of seeds (default: the config's)")
    p.add_argument("--first-seed", type=int, default=0)
    st = p.add_mutually_exclusive_group()
    st.add_argument(
        "--single-task", dest="single_task", action="store_true", default=None,
        help="train single-task baselines for Δm (default: the config's single_task)",
    )  # fmt: skip
    st.add_argument("--no-single-task", dest="single_task", action="store_false")
    p.add_argument(
        "--tuned-static", metavar="DIR",
        help="also train the static weights found by `tune-static` (its output directory or "
        "tuned.json) on these seeds: a row 'static weights (tuned, N runs)'",
    )  # fmt: skip


def _add_tune_static(sub: _Subparsers[Any]) -> None:
    """``tune-static``: the grid search of fixed task weights."""
    p = _task_command(
        sub,
        "tune-static",
        "grid-search fixed task weights on the validation set (the tuned static-weight "
        "baseline; feed its --out to compare --tuned-static)",
    )
    p.add_argument(
        "--grid", default=",".join(f"{v:g}" for v in DEFAULT_GRID), metavar="V1,V2,...",
        help="values of each weight other than the anchor's (default %(default)s): "
        "len(grid)**(K-1) training runs per tuning seed",
    )  # fmt: skip
    p.add_argument("--anchor", type=int, default=0, help="the task whose weight stays 1")
    p.add_argument("--seeds", type=int, default=1, help="tuning seeds (default 1)")
    p.add_argument("--first-seed", type=int, default=0)


def _add_sweep(sub: _Subparsers[Any]) -> None:
    """``sweep``: one balancer over values of one option."""
    p = _task_command(sub, "sweep", "one balancer over values of one option")
    p.add_argument("--balancer", required=True)
    p.add_argument(
        "--param", required=True, metavar="NAME=V1,V2,...",
        help="the option and its values, e.g. alpha=-4,-3,-2,-1,0,1,2",
    )  # fmt: skip
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="fixed balancer option (repeatable)",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, help="number of seeds (default: the config's)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--single-task", action="store_true", help="single-task baselines (Δm)")


def _add_other_commands(sub: _Subparsers[Any]) -> None:
    """``list``, ``report`` and ``bench`` (whose options :mod:`experiments.bench` parses)."""
    sub.add_parser("list", help="balancers (and whether they are available), configs, tasks")
    p = sub.add_parser(
        "report",
        help="re-render results.md from the results.json of earlier compare/sweep runs "
        "(after an update of the report code; nothing is re-trained)",
    )
    p.add_argument("dirs", nargs="+", type=Path, help="output directories of earlier runs")
    sub.add_parser(
        "bench",
        help="step time and peak memory of every balancer (experiments.bench; "
        "python -m experiments bench --help)",
        add_help=False,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Multi-task gradient-balancing experiments (synthetic, Census-Income, toy, "
        "CSV files).",
        epilog=CSV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_compare(sub)
    _add_tune_static(sub)
    _add_sweep(sub)
    _add_other_commands(sub)
    return parser
