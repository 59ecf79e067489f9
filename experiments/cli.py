"""Command line of the experiments: ``python -m experiments {run,compare,sweep,list,bench} ...``.

Examples (from the repository root)::

    python -m experiments compare --task synthetic --balancers all --seeds 3 --out runs/synthetic
    python -m experiments compare --task census --config census_group1 --balancers equal,mgda \\
        --seeds 5 --out runs/census1
    python -m experiments run --task synthetic --model mmoe --balancer gradops --option alpha=-2
    python -m experiments compare --task toy --balancers all --out runs/toy --steps 35000
    python -m experiments sweep --task toy --balancer gradops \\
        --param alpha=-4,-3,-2,-1,0,1,2 --seeds 1 --out runs/toy-sweep
    python -m experiments list
    python -m experiments bench --quick --out /tmp/bench     # experiments.bench (own options)

Outputs of ``compare`` (``--out DIR``): ``results.json``, ``results.md`` (also printed),
``metrics.png`` (per-task metrics per balancer, error bars over seeds), ``weights.png`` (task
weights over training), ``curves.png`` (validation score per epoch); for the toy task
``trajectories.png``. ``sweep`` writes ``results.json``, ``results.md``, ``sweep_metrics.png``
and ``sweep_front.png``.

The output directory is checked before any training (:mod:`experiments._output`): a file, a
path under a file, or a directory that already holds results (without ``--overwrite``) is a
usage error. While a run writes there it holds a lock file (a second run into the same
directory is refused), and every file is written to a temporary name and renamed into place.

Exit status: 0 success; 1 some runs failed (they are listed in the table); 2 bad arguments,
configuration, balancer name or option, data file or output directory (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tasks.registry import DataError

from . import config as cfgmod
from . import report
from ._output import OutputDir, OutputError, atomic_write, locked
from .tune_static import DEFAULT_GRID

__all__ = ["main", "build_parser"]

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


class UsageError(Exception):
    """A user error: reported as ``error: ...`` with exit status 2."""


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Multi-task gradient-balancing experiments (synthetic, Census-Income, toy, "
        "CSV files).",
        epilog=CSV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    task_cmd: dict[str, Any] = {
        "epilog": CSV_HELP,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }

    p = sub.add_parser("run", help="one model, one balancer, one task, one seed", **task_cmd)
    _common(p)
    p.add_argument("--balancer", default="equal", help="balancer name (default equal)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="balancer option, e.g. --option normalization=l2 (repeatable)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--single-task", action="store_true", help="also train single-task baselines (Δm)"
    )

    p = sub.add_parser("compare", help="every balancer side by side over seeds", **task_cmd)
    _common(p)
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

    p = sub.add_parser(
        "tune-static",
        help="grid-search fixed task weights on the validation set (the tuned static-weight "
        "baseline; feed its --out to compare --tuned-static)",
        **task_cmd,
    )
    _common(p)
    p.add_argument(
        "--grid", default=",".join(f"{v:g}" for v in DEFAULT_GRID), metavar="V1,V2,...",
        help="values of each weight other than the anchor's (default %(default)s): "
        "len(grid)**(K-1) training runs per tuning seed",
    )  # fmt: skip
    p.add_argument("--anchor", type=int, default=0, help="the task whose weight stays 1")
    p.add_argument("--seeds", type=int, default=1, help="tuning seeds (default 1)")
    p.add_argument("--first-seed", type=int, default=0)

    p = sub.add_parser("sweep", help="one balancer over values of one option", **task_cmd)
    _common(p)
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
    return parser


# ---------------------------------------------------------------------------- config
class _Flag(NamedTuple):
    """A command-line flag that sets one configuration entry (``section.key``; ``None``
    section = top level); the toy task has its own entry, or none (``toy_error``)."""

    attr: str
    flag: str
    entry: tuple[str | None, str]
    toy_entry: tuple[str | None, str] | None = None
    toy_error: str | None = None


_FLAGS: tuple[_Flag, ...] = (
    _Flag("model", "--model", ("model", "name"), ("model", "name")),
    _Flag("epochs", "--epochs", ("train", "epochs"),
          toy_error="the toy task counts steps, not epochs: use --steps"),
    _Flag("steps", "--steps", ("train", "max_steps"), ("toy", "steps")),
    _Flag("batch_size", "--batch-size", ("train", "batch_size"), ("train", "batch_size")),
    _Flag("lr", "--lr", ("optimizer", "lr"), ("toy", "lr")),
    _Flag("level", "--level", ("train", "level"), ("toy", "level")),
    _Flag("device", "--device", ("train", "device"), toy_error="the toy task runs on the CPU only"),
    _Flag("group", "--group", ("data", "group"), ("data", "group")),
    _Flag("data_path", "--data-path", ("data", "path"), ("data", "path")),
    _Flag("threads", "--threads", (None, "threads"), (None, "threads")),
    _Flag("regularizer", "--regularizer", ("regularizer", "name"),
          toy_error="the toy task has no representation to perturb"),
)  # fmt: skip


def _config_name(task: str, args: argparse.Namespace) -> str | None:
    """``--config``, else a census group's own configuration (its description and notes
    match the data), else ``None`` (the task's default)."""
    if args.config is None and task == "census" and args.group is not None:
        g = str(args.group).strip().lower().replace("-", "_")
        return f"census_group{g}" if g.isdigit() else f"census_{g}"
    return str(args.config) if args.config is not None else None


def _check_counts(args: argparse.Namespace) -> None:
    if getattr(args, "jobs", 1) < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    for flag in ("first_seed", "seed"):
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")


def _apply_flags(cfg: dict[str, Any], args: argparse.Namespace, is_toy: bool) -> dict[str, str]:
    """Write the flags given on the command line into ``cfg``; returns ``{dotted key: the
    flag that set it}`` for error messages."""
    origins: dict[str, str] = {}
    for f in _FLAGS:
        value = getattr(args, f.attr, None)
        if value is None or value is False or value == "":
            continue
        entry = f.toy_entry if is_toy else f.entry
        if entry is None:
            raise UsageError(f.toy_error or f"{f.flag} does not apply to the toy task")
        section, key = entry
        if f.attr == "group":
            value = cfgmod.parse_value(value)
        node = cfg if section is None else cfg.setdefault(section, {})
        if node is None and section == "regularizer":  # "regularizer": null in the config
            node = cfg[section] = {}
        if not isinstance(node, dict):
            raise UsageError(f"{f.flag}: configuration key {section!r} is not a section")
        node[key] = value
        origins[key if section is None else f"{section}.{key}"] = f"{f.flag} {value}"
    return origins


def _config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    task = str(args.task).strip().lower()
    try:
        cfg = cfgmod.load_config(
            _config_name(task, args), task=task, overrides=args.set, validate=False
        )
    except cfgmod.ConfigError as e:
        raise UsageError(str(e)) from e
    _check_counts(args)
    origins = _apply_flags(cfg, args, task == "toy")
    try:
        cfgmod.validate_config(cfg, args.set, origins)
    except cfgmod.ConfigError as e:
        raise UsageError(str(e)) from e
    return cfg


def _options(items: Sequence[str], balancer: str) -> dict[str, Any]:
    """The ``--option KEY=VALUE`` items, checked against the options ``balancer`` takes."""
    out: dict[str, Any] = {}
    for item in items:
        try:
            k, v = cfgmod.parse_assignment(item)
            cfgmod.check_balancer_options(balancer, {k: v}, f"--option {item}")
        except cfgmod.ConfigError as e:
            raise UsageError(str(e)) from e
        out[k] = v
    return out


def _param(text: str, balancer: str) -> tuple[str, list[Any]]:
    if "=" not in text:
        raise UsageError(f"--param must look like NAME=V1,V2,..., got {text!r}")
    name, _, values = text.partition("=")
    vals = [cfgmod.parse_value(v.strip()) for v in values.split(",") if v.strip()]
    if not name.strip() or not vals:
        raise UsageError(f"--param must look like NAME=V1,V2,..., got {text!r}")
    try:
        cfgmod.check_balancer_options(balancer, {name.strip(): None}, f"--param {text}")
    except cfgmod.ConfigError as e:
        raise UsageError(str(e)) from e
    return name.strip(), vals


# ---------------------------------------------------------------------------- output
def _jsonable(obj: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, numpy scalars -> Python (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _jsonable(obj.item())
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    return obj


def _json_text(data: Any) -> str:
    return json.dumps(_jsonable(data), indent=1, allow_nan=False) + "\n"


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` as strict JSON, atomically (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, _json_text(data))


def _out_dir(args: argparse.Namespace, default: str | None) -> Path | None:
    if args.out:
        return Path(args.out)
    return None if default is None else Path("runs") / default


def _output(out: Path | None, overwrite: bool) -> contextlib.AbstractContextManager[Any]:
    """The checked and locked output directory (``None``: nothing is written)."""
    return contextlib.nullcontext(None) if out is None else OutputDir(out, overwrite=overwrite)


class _Console:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    @staticmethod
    def warn(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)


def _finish_compare(
    results: dict[str, Any], out: OutputDir | None, plots: bool, console: _Console
) -> int:
    from . import plots as plotmod

    task = results["task"]
    if task == "toy":
        from . import toy

        table = toy.toy_table(results)
    else:
        summary = report.summarize(results)
        table = report.compare_table(results, summary)
    print(table, flush=True)
    if out is not None:
        out.write("results.json", _json_text(results))
        out.write("results.md", table)
        written = ["results.json", "results.md"]
        if plots:
            if task == "toy":
                written += _toy_plots(results, out)
            else:
                out.save("metrics.png", lambda p: plotmod.plot_compare_metrics(results, summary, p))
                out.save("weights.png", lambda p: plotmod.plot_weights(results, p))
                out.save("curves.png", lambda p: plotmod.plot_curves(results, p))
                written += ["metrics.png", "weights.png", "curves.png"]
        out.finish(written)
        console.log(f"wrote {', '.join(str(out.file(w)) for w in written)}")
    return 1 if any(r.get("error") for r in results.get("runs", [])) else 0


def _toy_plots(results: dict[str, Any], out: OutputDir) -> list[str]:
    from tasks.toy import loss_grid

    from . import plots as plotmod
    from . import toy

    scales = results["config"]["toy"]["scales"]
    out.save(
        "trajectories.png",
        lambda p: plotmod.plot_toy_trajectories(
            results, p, grid=loss_grid((-10.0, 10.0), 160, scales), pareto=toy._pareto(200)
        ),
    )
    return ["trajectories.png"]


# ---------------------------------------------------------------------------- commands
def _seeds(args: argparse.Namespace, cfg: dict[str, Any]) -> list[int]:
    n = args.seeds if args.seeds is not None else int(cfg.get("seeds", 1))
    if n < 1:
        raise UsageError(f"--seeds must be >= 1, got {n}")
    return list(range(args.first_seed, args.first_seed + n))


def _resolve(spec: str | Sequence[str]) -> tuple[list[str], dict[str, str]]:
    from .runner import BalancerError, resolve_balancers

    try:
        return resolve_balancers(spec)
    except BalancerError as e:
        raise UsageError(str(e)) from e


def cmd_compare(args: argparse.Namespace) -> int:
    from . import runner

    cfg = _config_from_args(args)
    torch.set_num_threads(int(cfg.get("threads") or 1))
    console = _Console(args.quiet)
    names, unavailable = _resolve(args.balancers)
    for name, why in unavailable.items():
        console.warn(f"note: balancer {name!r} is unavailable and skipped ({why})")
    if not names:
        raise UsageError("no available balancer to run")
    seeds = _seeds(args, cfg)
    single = cfg.get("single_task", False) if args.single_task is None else args.single_task
    progress = False if args.quiet else None
    extra = _tuned_variants(args, cfg) if cfg["task"] != "toy" else []
    with _output(_out_dir(args, f"compare-{cfg['task']}"), args.overwrite) as out:
        if cfg["task"] == "toy":
            from . import toy

            results = toy.run_toy(
                cfg, names, seeds, unavailable=unavailable, progress=progress, log=console.log,
                jobs=args.jobs,
            )  # fmt: skip
        else:
            results = runner.run_compare(
                cfg, names, seeds, single_task=bool(single), unavailable=unavailable,
                progress=progress, log=console.log, jobs=args.jobs, extra_variants=extra,
            )  # fmt: skip
        return _finish_compare(results, out, not args.no_plots, console)


def _tuned_variants(args: argparse.Namespace, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``--tuned-static`` run, checked against this comparison's settings."""
    if not getattr(args, "tuned_static", None):
        return []
    from .tune_static import load_tuned, tuned_label

    try:
        tuned = load_tuned(args.tuned_static, cfg)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return [
        {
            "balancer": "equal",
            "options": {"weights": tuned["weights"]},
            "label": tuned_label(tuned["num_runs"]),
        }
    ]


def cmd_tune_static(args: argparse.Namespace) -> int:
    from . import tune_static

    cfg = _config_from_args(args)
    if cfg["task"] == "toy":
        raise UsageError("tune-static needs a task with a validation split (not the toy)")
    torch.set_num_threads(int(cfg.get("threads") or 1))
    console = _Console(args.quiet)
    try:
        grid = [float(v) for v in str(args.grid).split(",") if v.strip()]
    except ValueError as e:
        raise UsageError(f"--grid must be comma-separated numbers, got {args.grid!r}") from e
    seeds = _seeds(args, cfg)
    progress = False if args.quiet else None
    out_path = _out_dir(args, f"tune-static-{cfg['task']}")
    assert out_path is not None
    with OutputDir(out_path, overwrite=args.overwrite) as out:
        try:
            results = tune_static.run_tune_static(
                cfg, seeds, grid=grid, anchor=args.anchor, progress=progress,
                log=console.log, jobs=args.jobs,
            )  # fmt: skip
        except ValueError as e:
            raise UsageError(str(e)) from e
        table = tune_static.tune_table(results)
        print(table, flush=True)
        out.write("results.json", _json_text(results))
        out.write(tune_static.TUNED_FILE, _json_text(results["tuned"]))
        out.write("results.md", table)
        written = ["results.json", tune_static.TUNED_FILE, "results.md"]
        out.finish(written)
        console.log(f"wrote {', '.join(str(out.file(w)) for w in written)}")
    return 1 if any(r.get("error") for r in results.get("runs", [])) else 0


def cmd_run(args: argparse.Namespace) -> int:
    from . import runner

    cfg = _config_from_args(args)
    torch.set_num_threads(int(cfg.get("threads") or 1))
    console = _Console(args.quiet)
    names, _ = _resolve(args.balancer)
    name = names[0]
    options = {
        **dict((cfg.get("balancers") or {}).get(name) or {}),
        **_options(args.option, name),
    }
    cfg.setdefault("balancers", {})[name] = options
    progress = False if args.quiet else None
    with _output(_out_dir(args, None), args.overwrite) as out:
        if cfg["task"] == "toy":
            from . import toy

            results = toy.run_toy(cfg, [name], [args.seed], progress=progress, log=console.log)
        else:
            t0 = time.perf_counter()
            splits = runner.load_splits(cfg, args.seed)
            cfg = runner.with_group_metrics(cfg, splits.has_groups)
            baselines: list[dict[str, Any]] = []
            if args.single_task:
                baselines = runner.single_task_baselines(
                    cfg, splits, args.seed, progress=progress, log=console.log
                )
            rec = runner.train_one(
                cfg,
                splits,
                name,
                options,
                args.seed,
                progress=progress,
                desc=f"{name} seed {args.seed}",
            )
            runner._attach_delta_m(rec, baselines, splits.tasks, cfg)
            results = {
                "task": cfg["task"],
                "tasks": [{"name": t.name, "kind": t.kind} for t in splits.tasks],
                "data": runner._json_info(splits),
                "config": cfg,
                "balancers": [name],
                "seeds": [args.seed],
                "runs": [rec],
                "single_task": baselines,
                "unavailable": {},
                "environment": runner.environment(),
                "wall_time_s": time.perf_counter() - t0,
            }
        return _finish_compare(results, out, not args.no_plots, console)


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import plots as plotmod
    from . import runner

    cfg = _config_from_args(args)
    torch.set_num_threads(int(cfg.get("threads") or 1))
    console = _Console(args.quiet)
    names, _ = _resolve(args.balancer)
    name = names[0]
    param, values = _param(args.param, name)
    fixed = _options(args.option, name)
    if fixed:
        cfg.setdefault("balancers", {})[name] = {
            **dict((cfg.get("balancers") or {}).get(name) or {}),
            **fixed,
        }
    seeds = _seeds(args, cfg)
    progress = False if args.quiet else None
    out_path = _out_dir(args, f"sweep-{cfg['task']}-{name}-{param}")
    assert out_path is not None
    with OutputDir(out_path, overwrite=args.overwrite) as out:
        if cfg["task"] == "toy":
            from . import toy

            results = toy.run_toy(
                cfg, [name], seeds, progress=progress, log=console.log, param=param,
                values=values, jobs=args.jobs,
            )  # fmt: skip
            table = toy.toy_sweep_table(results)
        else:
            results = runner.run_sweep(
                cfg, name, param, values, seeds, single_task=args.single_task,
                progress=progress, log=console.log, jobs=args.jobs,
            )  # fmt: skip
            table = report.sweep_table(results)
        print(table, flush=True)
        out.write("results.json", _json_text(results))
        out.write("results.md", table)
        written = ["results.json", "results.md"]
        if not args.no_plots:
            out.save_many(
                ["sweep_metrics.png", "sweep_front.png"],
                lambda paths: plotmod.plot_sweep(results, paths[0], paths[1]),
            )
            written += ["sweep_metrics.png", "sweep_front.png"]
            if cfg["task"] == "toy":
                written += _toy_plots(results, out)
        out.finish(written)
        console.log(f"wrote {', '.join(str(out.file(w)) for w in written)}")
    return 1 if any(r.get("error") for r in results.get("runs", [])) else 0


def cmd_list(_args: argparse.Namespace) -> int:
    from balancers.registry import BALANCERS

    from .runner import balancer_status

    print("balancers:")
    for name in BALANCERS:
        why = balancer_status(name)
        print(f"  {name:14s} {report.DISPLAY_NAMES.get(name, name):14s} "
              f"{'available' if why is None else 'UNAVAILABLE: ' + why}")  # fmt: skip
    print("configs (experiments/configs/):")
    for name in cfgmod.available_configs():
        print(f"  {name}")
    try:
        from tasks import available_tasks

        print("tasks (tasks.load_task) + toy:")
        for name, desc in available_tasks().items():
            print(f"  {name:14s} {desc}")
    except ImportError as e:  # pragma: no cover - tasks not importable
        print(f"tasks: not importable ({e})")
    return 0


def render_report(results: Mapping[str, Any]) -> str:
    """The markdown table of a compare or sweep result (toy or not), as the run wrote it."""
    toy_task = results.get("task") == "toy"
    if "param" in results:  # a sweep
        if toy_task:
            from . import toy

            return toy.toy_sweep_table(results)
        return report.sweep_table(results)
    if toy_task:
        from . import toy

        return toy.toy_table(results)
    return report.compare_table(results)


def cmd_report(args: argparse.Namespace) -> int:
    for d in args.dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise UsageError(f"{path} not found (give the --out directory of a compare/sweep run)")
        with locked(Path(d)):  # not while a run writes there
            try:
                results = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UsageError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(results, dict) or "runs" not in results:
                raise UsageError(f"{path} is not the results.json of a compare or sweep run")
            table = render_report(results)
            atomic_write(Path(d) / "results.md", table)
        print(table, flush=True)
    return 0


_COMMANDS = {
    "run": cmd_run,
    "compare": cmd_compare,
    "sweep": cmd_sweep,
    "list": cmd_list,
    "report": cmd_report,
    "tune-static": cmd_tune_static,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``) and run the command.

    Returns the exit status (0 ok, 1 some runs failed, 2 usage error).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the benchmark has its own parser (experiments.bench)
        try:
            from .bench.cli import main as bench_main
        except ImportError as e:
            print(f"error: the benchmark is not available ({e})", file=sys.stderr)
            return 2
        return int(bench_main(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (UsageError, OutputError, cfgmod.ConfigError, DataError) as e:
        # DataError: a data file or data option (tasks.load_task), possibly from a worker
        return _usage_error(e)
    except FileNotFoundError as e:  # e.g. the census file
        return _usage_error(e)


def _usage_error(e: BaseException) -> int:
    msg = " ".join(str(e).split("\n"))
    print(f"error: {msg}", file=sys.stderr)
    return 2
