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
from typing import Any

import torch

from tasks.registry import DataError

from . import config as cfgmod
from . import report
from ._args import (  # noqa: F401  (re-exported)
    _FLAGS,
    UsageError,
    _apply_flags,
    _check_counts,
    _config_from_args,
    _config_name,
    _Flag,
    _options,
    _param,
    _resolve,
    _seeds,
    _tuned_variants,
)
from ._output import OutputDir, OutputError, atomic_write, locked
from ._parser import CSV_HELP, OUT_HELP, TASK_HELP, _common, build_parser  # noqa: F401

__all__ = ["main", "build_parser"]


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
