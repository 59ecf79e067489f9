"""The benchmark's options: the argument parser, the defaults (or ``--quick`` sizes) that fill
the unset ones, their checks, and the model configuration they describe."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch

from experiments.bench.model import BenchModelConfig, overhead_config
from experiments.runner import BalancerError, resolve_balancers

__all__ = [
    "DEFAULT_BALANCERS",
    "DEFAULTS",
    "QUICK",
    "SECTIONS",
    "add_arguments",
    "check_device",
    "model_config",
    "resolve",
    "section_config",
]

#: ``--balancers`` when unset: the six core methods (``balancers.registry.GROUPS["core"]``),
#: the set every number in docs/benchmarks.md was measured with
DEFAULT_BALANCERS = "core"
SECTIONS = ("rep", "param", "h2h", "overhead")

#: the values of the options left unset (``None``) on the command line
DEFAULTS: dict[str, object] = {
    "rows": 1_000_000,
    "param_rows": 100_000,
    "tasks": "2,4,8,16",
    "h2h_tasks": "4",
    "batch_size": 1024,
    "bottom": "512,256",
    "tower": "64",
    "repeats": 5,
    "steps": 3,
    "param_repeats": 3,
    "param_steps": 1,
    "warmup": 1,
    "memory_modes": None,
    "memory_steps": 2,
    "lambda_tasks": "4,16",
    "lambda_steps": 100,
    "lambda_every": 10,
    "overhead_steps": 50,
}

#: ``--quick``: the sizes of a tiny CI run, over :data:`DEFAULTS`
QUICK: dict[str, object] = {
    "rows": 2000,
    "param_rows": 1000,
    "tasks": "2,4",
    "h2h_tasks": "2",
    "batch_size": 128,
    "bottom": "64,32",
    "tower": "16",
    "repeats": 2,
    "steps": 1,
    "param_repeats": 2,
    "param_steps": 1,
    "warmup": 1,
    "memory_modes": "rep/plain,rep/rep:mgda",
    "memory_steps": 1,
    "lambda_tasks": "2",
    "lambda_steps": 10,
    "lambda_every": 5,
    "overhead_steps": 5,
    "threads": 1,
}

#: options that must be >= 1 after resolution
_POSITIVE = (
    "rows",
    "param_rows",
    "batch_size",
    "repeats",
    "steps",
    "param_repeats",
    "param_steps",
    "memory_steps",
    "lambda_steps",
    "lambda_every",
    "overhead_steps",
    "fields",
    "dim",
)


# ---------------------------------------------------------------------------- the parser
def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda / cuda:N: where tables, model, batches and optimizer "
        "state live; on CUDA the timing is synchronized and peak memory is "
        "torch.cuda.max_memory_allocated per mode",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny CI-sized run (< 1 min): small tables and MLP, K=2,4, 2 repeats",
    )


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", help="K values, comma-separated (default 2,4,8,16)")
    p.add_argument(
        "--rows", type=int, help="rows per table, sections rep and h2h (default 1000000)"
    )
    p.add_argument(
        "--param-rows",
        type=int,
        help="rows per (dense) table in the parameter-level section (default 100000)",
    )
    p.add_argument("--h2h-tasks", help="K values of the TorchJD head-to-head at --rows (default 4)")
    p.add_argument("--fields", type=int, default=8, help="categorical fields (default 8)")
    p.add_argument("--dim", type=int, default=16, help="embedding dim (default 16)")
    p.add_argument("--numeric", type=int, default=13, help="dense features (default 13)")
    p.add_argument("--bottom", help="bottom MLP widths (default 512,256)")
    p.add_argument("--tower", help="tower hidden widths (default 64)")
    p.add_argument("--batch-size", type=int, help="batch size (default 1024)")
    p.add_argument(
        "--table-optimizer",
        choices=("sgd", "sparseadam"),
        default="sgd",
        help="optimizer of the embedding tables (sparseadam: sparse tables only; "
        "dense tables always use SGD). Everything else: Adam",
    )


def _add_timing_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--balancers",
        default=DEFAULT_BALANCERS,
        help="comma-separated balancers and groups (as compare takes them): 'core' (default: "
        "the six methods of the toolkit), 'loss', 'baselines', 'all' (every registered "
        "balancer); members of a group that are not available are skipped with a note",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated subset of rep,param,h2h,overhead (default all)",
    )
    p.add_argument(
        "--repeats", type=int, help="timed rounds, sections rep and overhead (default 5)"
    )
    p.add_argument("--steps", type=int, help="steps per block, section rep (default 3)")
    p.add_argument(
        "--param-repeats", type=int, help="timed rounds, sections param and h2h (default 3)"
    )
    p.add_argument(
        "--param-steps", type=int, help="steps per block, sections param and h2h (default 1)"
    )
    p.add_argument(
        "--overhead-steps",
        type=int,
        help="steps per block, section overhead (default 50: a step there is ~1 ms)",
    )
    p.add_argument("--warmup", type=int, help="untimed warm-up rounds (default 1)")


def _add_memory_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--memory",
        choices=("key", "all", "none"),
        default="key",
        help="peak-RSS children: key (every rep-section mode, the main modes of the "
        "others; default), all, none",
    )
    p.add_argument(
        "--memory-modes",
        help="comma-separated modes to measure, NAME (every section) or SECTION/NAME, "
        "e.g. rep/plain,rep/rep:mgda (overrides --memory)",
    )
    p.add_argument(
        "--memory-tasks", type=int, help="K of the memory runs (default: largest --tasks)"
    )
    p.add_argument("--memory-steps", type=int, help="steps each memory child runs (default 2)")
    p.add_argument(
        "--memory-timeout",
        type=float,
        default=900.0,
        help="seconds before a memory child is killed (default 900)",
    )


def _add_study_and_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lambda-tasks", help="K values of the MARIGOLD-vs-MGDA weight run (default 4,16)"
    )
    p.add_argument("--lambda-steps", type=int, help="training steps of that run (default 100)")
    p.add_argument("--lambda-every", type=int, help="exact MGDA weights every N steps (default 10)")
    p.add_argument("--no-peers", action="store_true", help="skip TorchJD and torch-rechub")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the ConflictTracker mode")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars, notes or final table")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (used by ``python -m experiments bench``)."""
    _add_run_arguments(parser)
    _add_model_arguments(parser)
    _add_timing_arguments(parser)
    _add_memory_arguments(parser)
    _add_study_and_output_arguments(parser)


# ---------------------------------------------------------------------------- resolution
def _fill_defaults(args: argparse.Namespace) -> None:
    defaults = dict(DEFAULTS)
    if args.quick:
        defaults.update(QUICK)
    defaults.setdefault("threads", None)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _int_list(value: str | Iterable[int]) -> list[int]:
    return _ints(value) if isinstance(value, str) else list(value)


def _parse_lists(args: argparse.Namespace) -> None:
    args.tasks = _int_list(args.tasks)
    args.h2h_tasks = _int_list(args.h2h_tasks)
    args.lambda_tasks = _int_list(args.lambda_tasks)
    args.bottom = tuple(_int_list(args.bottom))
    args.tower = tuple(_int_list(args.tower))


def _parse_balancers(args: argparse.Namespace) -> None:
    """``args.balancers`` as registry names (groups expanded, aliases resolved, in order), and
    ``args.unavailable_balancers`` (``{name: why}``: group members that do not import)."""
    spec = args.balancers
    if spec is None:
        spec = DEFAULT_BALANCERS
    try:
        names, unavailable = resolve_balancers(spec)
    except BalancerError as exc:
        raise ValueError(str(exc)) from None
    if not names:
        raise ValueError(
            f"no available balancer in --balancers {spec!r}: "
            + "; ".join(f"{n}: {why}" for n, why in unavailable.items())
        )
    args.balancers = names
    args.unavailable_balancers = unavailable


def _parse_choices(args: argparse.Namespace) -> None:
    _parse_balancers(args)
    args.sections = [s.strip() for s in str(args.sections).split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"unknown section(s) {bad}; choose from {list(SECTIONS)}")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the defaults (or the --quick sizes) and check them."""
    _fill_defaults(args)
    _parse_lists(args)
    _parse_choices(args)
    if args.memory_tasks is None:
        args.memory_tasks = max(args.tasks)
    for name in _POSITIVE:
        if int(getattr(args, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    args.device = check_device(getattr(args, "device", None) or "cpu")
    return args


def check_device(text: str) -> str:
    """``text`` as a device string, or ValueError naming the problem (before anything runs)."""
    try:
        dev = torch.device(str(text).strip())
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {text}: CUDA is not available on this machine "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}, "
            f"torch.cuda.is_available() is False); run with --device cpu"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"--device {text}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return str(dev)


# ---------------------------------------------------------------------------- model config
def model_config(args: argparse.Namespace) -> BenchModelConfig:
    """The main model of the run (sections rep, param, h2h and the studies)."""
    return BenchModelConfig(
        fields=args.fields,
        dim=args.dim,
        numeric=args.numeric,
        bottom=args.bottom,
        tower=args.tower,
        batch_size=args.batch_size,
        table_optimizer=args.table_optimizer,
        seed=args.seed,
        device=args.device,
    )


def section_config(
    section: str, args: argparse.Namespace, cfg: BenchModelConfig
) -> BenchModelConfig:
    """The model of ``section``: the overhead section's own small one, else ``cfg``."""
    return overhead_config(args.seed, args.device) if section == "overhead" else cfg
