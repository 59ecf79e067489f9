"""Accuracy studies: our MGDA weights against TorchJD's, and MARIGOLD's weights against the exact
MGDA weights along a short training run (:func:`sparse_aware_gram` is their exact reference)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from balancers import MARIGOLD, mgda_weights
from balancers.registry import make_balancer
from experiments.bench.model import (
    BenchModelConfig,
    Group,
    build_group,
    make_embedding,
    task_losses,
)
from experiments.bench.peers import torchjd_aggregator, torchjd_backward
from experiments.bench.progress import Bar, Progress
from mtl._gram import device_gram, task_rows
from mtl.models._layers import FeatureEmbedding

__all__ = ["marigold_lambda_run", "mgda_agreement", "sparse_aware_gram"]


# ---------------------------------------------------------------------------- exact MGDA reference
def sparse_aware_gram(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """Float64 Gram matrix of the per-task gradients w.r.t. ``params``, sparse tables included.

    Equal to the Gram of the densified gradients (what parameter-level balancing computes), but
    a sparse embedding gradient only contributes its touched rows. The library's own pieces
    (:mod:`mtl._gram`): :func:`~mtl._gram.task_rows` makes each parameter's ``(K, n)`` matrix
    (a sparse table: the union of the tasks' row ids), :func:`~mtl._gram.device_gram` its Gram,
    from float64 rows (an exact reference: one float64 product, no float32 chunks).
    """
    k = len(losses)
    grads = [
        torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        for loss in losses
    ]
    device = params[0].device if len(params) else torch.device("cpu")
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    for i, p in enumerate(params):
        gs: list[Tensor | None] = [grads[t][i] for t in range(k)]
        if all(g is None for g in gs):
            continue
        rows, _ = task_rows(gs, p, densify=False)
        gram += device_gram(rows.to(torch.float64))
    return gram


# ---------------------------------------------------------------------------- MGDA agreement
def _torchjd_weights(
    group: Group,
    x: Any,
    ys: list[Tensor],
    ours: Tensor,
    gram: Tensor | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """TorchJD's MGDA weights (``options``) on the same batch, against ours."""
    group.inner.zero_grad()
    out = group.model(x)
    w = torchjd_backward(
        task_losses(out.task_outputs, ys),
        cast(Tensor, out.representation),
        group.shared,
        torchjd_aggregator("mgda", **options),
    )
    if w is None:  # MGDA is a weighted aggregator: never
        raise RuntimeError("TorchJD's MGDA returned no weights")
    w64 = w.detach().to("cpu", torch.float64)
    return {
        "options": options,
        "weights": w64.tolist(),
        "max_abs_diff": float((w64 - ours).abs().max()),
        "objective": float(w64 @ gram @ w64) if gram is not None else None,
    }


def mgda_agreement(
    args: argparse.Namespace, cfg: BenchModelConfig, peers: dict[str, Any]
) -> dict[str, Any]:
    """Our parameter-level MGDA weights vs TorchJD's MGDA weights on the same batch and model."""
    if args.no_peers or not peers["torchjd"]["available"]:
        return {
            "available": False,
            "reason": peers["torchjd"]["reason"] or "peers disabled (--no-peers)",
        }
    k = max(args.h2h_tasks)
    group = build_group("h2h", cfg, k, args.rows, False, seed=args.seed + 1)
    x, ys = group.next_batch()
    opt = make_balancer("mgda", group.inner, k)
    out = group.model(x)
    opt.zero_grad()
    info = opt.backward(task_losses(out.task_outputs, ys), shared_parameters=group.shared)
    ours = info.weights.detach().to("cpu", torch.float64)
    gram = None if info.gram is None else info.gram.detach().to("cpu", torch.float64)
    res: dict[str, Any] = {"available": True, "K": k, "rows": args.rows, "ours": ours.tolist()}
    for label, options in (
        ("torchjd_default", {}),
        ("torchjd_tight", {"epsilon": 1e-12, "max_iters": 100_000}),
    ):
        res[label] = _torchjd_weights(group, x, ys, ours, gram, options)
    if gram is not None:
        res["objective_ours"] = float(ours @ gram @ ours)
        exact, _ = mgda_weights(gram)
        res["ours_vs_exact_from_gram"] = float((exact - ours).abs().max())
    group.inner.zero_grad()
    return res


# ---------------------------------------------------------------------------- MARIGOLD weights
def _lambda_record(step: int, k: int, lam: Tensor, exact: Tensor, losses: Tensor) -> dict[str, Any]:
    uniform = torch.full_like(exact, 1.0 / k)
    return {
        "step": step,
        "l1": float((lam - exact).abs().sum()),
        "l1_uniform": float((uniform - exact).abs().sum()),
        "lambda": lam.tolist(),
        "mgda": exact.tolist(),
        "losses": [float(v) for v in losses.tolist()],
    }


def _lambda_steps(
    group: Group, opt: MARIGOLD, args: argparse.Namespace, record: list[dict[str, Any]], bar: Bar
) -> None:
    """Train ``--lambda-steps`` steps; every ``--lambda-every`` (and the last), before MARIGOLD's
    backward, the exact MGDA weights of the same batch, and the record of that step."""
    k, model = group.num_tasks, group.model
    for step in range(args.lambda_steps):
        x, ys = group.next_batch()
        out = model(x)
        losses = task_losses(out.task_outputs, ys)
        exact = None
        if step % args.lambda_every == 0 or step == args.lambda_steps - 1:
            gram = sparse_aware_gram(losses, group.shared).cpu()
            exact, _ = mgda_weights(gram)
            exact = exact.detach().to("cpu", torch.float64)
        opt.zero_grad()
        info = opt.backward(
            losses,
            shared_parameters=group.shared,
            closure=lambda x=x, ys=ys, m=model: task_losses(m(x).task_outputs, ys),
        )
        opt.step()
        if exact is not None:
            lam = info.weights.detach().to("cpu", torch.float64)
            record.append(_lambda_record(step, k, lam, exact, info.losses))
        bar.update(1)


def _lambda_summary(record: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean L1 distances over the recorded steps after the first (all of them if only one)."""
    later = [r for r in record if r["step"] > 0] or record
    if not later:
        return None
    return {
        "from_step": later[0]["step"],
        "mean_l1": sum(r["l1"] for r in later) / len(later),
        "mean_l1_uniform": sum(r["l1_uniform"] for r in later) / len(later),
    }


def _lambda_run_at(
    k: int,
    args: argparse.Namespace,
    cfg: BenchModelConfig,
    embedding: FeatureEmbedding,
    progress: Progress,
) -> dict[str, Any]:
    """The MARIGOLD-vs-exact-MGDA run at ``k`` tasks (``{"K", "error"}`` if MARIGOLD fails)."""
    group = build_group("lambda", cfg, k, args.rows, True, embedding=embedding, seed=args.seed + 2)
    try:
        opt = make_balancer("marigold", group.inner, k)
        if not isinstance(opt, MARIGOLD):
            raise TypeError(f"the registry's 'marigold' is {type(opt).__name__}, not MARIGOLD")
    except Exception as exc:  # noqa: BLE001
        return {"K": k, "error": f"{type(exc).__name__}: {exc}"}
    record: list[dict[str, Any]] = []
    bar = progress(total=args.lambda_steps, desc=f"marigold lambda K={k}")
    t0 = time.perf_counter()
    error = None
    try:
        _lambda_steps(group, opt, args, record, bar)
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
    bar.close()
    return {
        "K": k,
        "steps": args.lambda_steps,
        "every": args.lambda_every,
        "seconds": time.perf_counter() - t0,
        "records": record,
        "summary": _lambda_summary(record),
        "error": error,
    }


def marigold_lambda_run(
    args: argparse.Namespace, cfg: BenchModelConfig, progress: Progress
) -> dict[str, Any]:
    """Train with MARIGOLD (parameter level, fd, sparse tables) and compare lam with exact MGDA.

    Every ``--lambda-every`` steps, before MARIGOLD's backward, the exact parameter-level MGDA
    weights of the same batch are computed from the Gram matrix of the per-task gradients
    (tables included, :func:`sparse_aware_gram`); the L1 distance to the lam MARIGOLD applies at
    that step is recorded, and so is the distance of uniform weights (what a fixed equal
    weighting would be) as a yardstick.
    """
    if "marigold" not in args.balancers:
        return {"skipped": "marigold not in --balancers"}
    embedding = make_embedding(cfg, args.rows, True, args.seed + 2)
    runs = [_lambda_run_at(k, args, cfg, embedding, progress) for k in args.lambda_tasks]
    return {"rows": args.rows, "level": "parameters", "estimator": "fd", "runs": runs}
