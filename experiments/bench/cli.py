"""The benchmark's command line: ``python -m experiments bench [options]`` (or
``python -m experiments.bench``): parse, measure every section and study, write
``results.json``, ``results.md`` and the figures, print the tables."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.bench.budget import budget_table
from experiments.bench.derived import derived_tables
from experiments.bench.machine import loadavg, machine
from experiments.bench.memory import run_memory
from experiments.bench.model import BenchModelConfig
from experiments.bench.options import add_arguments, model_config, resolve, section_config
from experiments.bench.peers import INSTALL_HINT, peer_status
from experiments.bench.plots import make_plots
from experiments.bench.progress import Progress, make_progress
from experiments.bench.sections import run_section
from experiments.bench.studies import marigold_lambda_run, mgda_agreement
from experiments.bench.tables import render_markdown

__all__ = ["add_arguments", "build_parser", "main", "run"]


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN -> None, inf -> "inf", tuples -> lists."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _load_note(load_before: str, quiet: bool) -> None:
    """On stderr: a loaded machine with several torch threads (spin-waiting OpenMP threads)."""
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1) / 2
    except OSError:
        busy = False
    if busy and torch.get_num_threads() > 1 and not quiet:
        print(
            f"note: load average {load_before} on {os.cpu_count()} CPUs with "
            f"{torch.get_num_threads()} torch threads: OpenMP threads that spin-wait for a "
            "busy core can make steps 10-20x slower; consider --threads 1 (or "
            "OMP_WAIT_POLICY=PASSIVE)",
            file=sys.stderr,
        )


def _peer_notes(peers: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    """On stderr: the peers not installed (unless ``--no-peers``)."""
    if not args.no_peers:
        for key, p in peers.items():
            if not p["available"]:
                print(
                    f"note: {key} is not installed, its side-by-side rows are skipped. "
                    f"Install the bench extra: {INSTALL_HINT}",
                    file=sys.stderr,
                )


def _balancer_notes(args: argparse.Namespace) -> None:
    """On stderr: the balancers of a ``--balancers`` group that are not available (skipped)."""
    for name, why in getattr(args, "unavailable_balancers", {}).items():
        print(f"note: balancer {name!r} is unavailable and skipped ({why})", file=sys.stderr)


def _measure(
    args: argparse.Namespace,
    cfg: BenchModelConfig,
    peers: dict[str, dict[str, Any]],
    progress: Progress,
    phases: dict[str, float],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The sections, the MARIGOLD weight study, the MGDA agreement and the memory runs, each
    phase's seconds into ``phases``; returns the sections, the study and the agreement."""
    sections: dict[str, dict[str, Any]] = {}
    for section in args.sections:
        t0 = time.perf_counter()
        sections[section] = run_section(
            section, args, section_config(section, args, cfg), peers, progress
        )
        phases[f"section {section}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lambda_run = marigold_lambda_run(args, cfg, progress)
    phases["marigold lambda"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    agreement = (
        mgda_agreement(args, cfg, peers)
        if "h2h" in args.sections
        else {"available": False, "reason": "section h2h not run"}
    )
    phases["mgda agreement"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.memory != "none" or args.memory_modes:
        run_memory(sections, args, cfg, progress)
    phases["memory"] = time.perf_counter() - t0
    return sections, lambda_run, agreement


def _command(args: argparse.Namespace) -> str:
    argv = getattr(args, "_argv", None)
    if argv is None:  # dispatched by `python -m experiments bench ...`
        argv = sys.argv[1:]
        if argv and argv[0] == "bench":
            argv = argv[1:]
    return "python -m experiments bench " + " ".join(argv or [])


def _write(results: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    """The figures (unless ``--no-plots``), ``results.md`` and ``results.json``; the tables on
    stdout unless ``--quiet``."""
    if not args.no_plots:
        try:
            results["meta"]["plots"] = make_plots(results, out)
        except Exception as exc:  # noqa: BLE001 - plots are a convenience
            results["meta"]["plots_error"] = f"{type(exc).__name__}: {exc}"
    md = render_markdown(results)
    (out / "results.md").write_text(md, encoding="utf-8")
    with open(out / "results.json", "w", encoding="utf-8") as f:
        json.dump(_clean(results), f, indent=1, allow_nan=False)
    if not args.quiet:
        print(md)
        print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args`` (see :func:`add_arguments`); exit status."""
    t_start = time.perf_counter()
    try:
        args = resolve(args)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = make_progress(args.quiet)
    load_before = loadavg()
    _load_note(load_before, args.quiet)
    peers = peer_status()
    _peer_notes(peers, args)
    _balancer_notes(args)
    cfg = model_config(args)
    phases: dict[str, float] = {}
    sections, lambda_run, agreement = _measure(args, cfg, peers, progress, phases)
    derived = derived_tables(sections, args)
    budget = budget_table(sections, derived, agreement, args)
    results: dict[str, Any] = {
        "meta": {
            "command": _command(args),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "device": args.device,
            "balancers": list(args.balancers),
            "unavailable_balancers": dict(getattr(args, "unavailable_balancers", {})),
            "machine": machine(load_before, args.device),
            "model": cfg.to_dict(),
            "options": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "elapsed_s": 0.0,
            "phases_s": phases,
        },
        "peers": peers,
        "sections": sections,
        "derived": derived,
        "marigold_lambda": lambda_run,
        "mgda_agreement": agreement,
        "budget": budget,
    }
    results["meta"]["machine"]["loadavg_after"] = loadavg()
    results["meta"]["elapsed_s"] = time.perf_counter() - t_start
    _write(results, out, args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m experiments bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments bench",
        description="Step time and peak memory of every balancer vs a plain summed-loss step.",
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m experiments.bench [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv
    return run(args)
