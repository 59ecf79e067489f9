"""DDP in all its modes (issue 19, item 2): every mode either gives identical ranks equal to one
process on the global batch, or raises an error that names the mode and the fix; a step never
runs on gradients that DDP did not synchronize.

Two gloo processes on CPU run every case of :data:`CASES` in ONE spawn (the module fixture);
each case records, per rank, the final parameters or the error and whether the parameters were
left as they were before the failing step. The tests then compare the ranks with each other and
with a single process on the global batch. ``docs/ddp.md`` explains each mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.distributed as dist
from torch import nn

from balancers.registry import make_balancer
from mtl.models import ModelOutput

sys.path.insert(0, str(Path(__file__).parent))
from _spawn import spawn_ranks  # noqa: E402

WORLD = 2
K = 3
B_LOCAL = 6
STEPS = 3
MICRO = 2  # micro-batches per step in the accumulating schedules

# DDP options, each set to True
STATIC = ("static_graph",)
UNUSED = ("find_unused_parameters",)
BUCKET = ("gradient_as_bucket_view",)


@dataclasses.dataclass
class Out:
    """A model output DDP cannot look into (a dataclass is a leaf of torch's pytree)."""

    representation: torch.Tensor
    task_outputs: list[torch.Tensor]


class Net(nn.Module):
    def __init__(self, output: str = "tuple", unused: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.output = output
        self.trunk = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(K))
        # a layer the forward never uses: DDP needs find_unused_parameters=True for it
        self.spare = nn.Linear(6, 1) if unused else None

    def forward(self, x: torch.Tensor) -> Any:
        z = self.trunk(x)
        self.consumed = z  # the tensor the heads consume (DDP's outputs may be copies of it)
        outs = [h(z).squeeze(-1) for h in self.heads]
        if self.output == "model_output":  # the toolkit's own models return this
            return ModelOutput(outs, z)
        return Out(z, outs) if self.output == "dataclass" else (z, outs)


class Case(NamedTuple):
    """One training run: DDP options, the model's output, method, level and schedule.

    Schedules: ``plain`` (one synced backward per step), ``accumulate`` (``MICRO`` backward
    calls per step, all but the last under ``no_sync()``), ``accumulate_later`` (``plain``
    first, then ``accumulate``), ``no_sync`` (every backward under ``no_sync()``), ``bypass``
    (the forward calls ``ddp.module``, so DDP's hooks are never prepared). Outputs: ``tuple``,
    ``dataclass`` (:class:`Out`), ``consumed`` (a tuple, but the balance point passed is the
    tensor the heads consumed, not the one DDP returned).
    """

    ddp: tuple[str, ...]
    method: str
    level: str
    schedule: str = "plain"
    output: str = "tuple"
    unused: bool = False
    fused: bool = False
    float32: bool = False
    direct: bool = False  # parameter_update="direct"

    @property
    def key(self) -> str:
        mode = "+".join(self.ddp) or "default"
        flags = {
            self.output: self.output != "tuple",
            "unused": self.unused,
            "fused": self.fused,
            "float32": self.float32,
            "direct": self.direct,
        }
        extra = "".join(f" {flag}" for flag, on in flags.items() if on)
        return f"{mode} {self.method} {self.level} {self.schedule}{extra}"


LEVELS = ("representation", "parameters")
# the paths of a balanced step: Gram (MGDA), plain (EqualWeight), loss level (UW), a closure
# that re-runs the DDP model (FAMO), MARIGOLD's own passes
METHODS = ("mgda", "equal", "uw", "famo")

CORRECT: list[Case] = [
    *(Case(STATIC, m, lvl) for m in METHODS for lvl in LEVELS),
    *(Case(UNUSED, m, lvl, unused=True) for m in METHODS for lvl in LEVELS),
    *(Case(BUCKET, m, lvl) for m in METHODS for lvl in LEVELS),
    *(Case(STATIC + BUCKET, "mgda", lvl) for lvl in LEVELS),
    Case(STATIC, "mgda", "representation", output="consumed"),
    # mtl.models.ModelOutput is a registered pytree node: DDP looks into it like a tuple
    *(Case(STATIC, "mgda", lvl, output="model_output") for lvl in LEVELS),
    Case(UNUSED, "mgda", "representation", output="consumed", unused=True),
    *(Case(UNUSED, "mgda", lvl, output="dataclass", unused=True) for lvl in LEVELS),
    Case(UNUSED, "mgda", "representation", unused=True, float32=True),
    Case((), "mgda", "representation", float32=True),
    *(Case(UNUSED, "marigold", "parameters", unused=True),),
    *(Case(BUCKET, "marigold", lvl) for lvl in LEVELS),
    # no_sync accumulation whose last backward is synced: DDP averages the whole window
    *(Case((), m, lvl, "accumulate") for m in ("mgda", "equal") for lvl in LEVELS),
    *(Case(UNUSED, "mgda", lvl, "accumulate", unused=True) for lvl in LEVELS),
    *(Case(BUCKET, "mgda", lvl, "accumulate") for lvl in LEVELS),
    *(Case(STATIC, "mgda", lvl, "accumulate_later") for lvl in LEVELS),
]

#: case -> (exception type, a phrase of its message)
RAISES: dict[Case, tuple[str, str]] = {
    **{
        Case((), m, lvl, "no_sync"): ("RuntimeError", "gradients differ across ranks")
        for m in ("mgda", "equal")
        for lvl in LEVELS
    },
    Case((), "mgda", "representation", "no_sync", fused=True): (
        "RuntimeError",
        "gradients differ across ranks",
    ),
    **{
        Case((), "mgda", lvl, "bypass"): ("RuntimeError", "bypassed the DDP wrapper")
        for lvl in LEVELS
    },
    Case(UNUSED, "mgda", "representation", "no_sync", unused=True): (
        "RuntimeError",
        "no_sync()",
    ),
    **{
        Case(STATIC, "mgda", lvl, "accumulate"): ("RuntimeError", "static_graph=False")
        for lvl in LEVELS
    },
    # a layer the forward skips, without find_unused_parameters: DDP never finishes reducing
    Case((), "mgda", "representation", unused=True): (
        "RuntimeError",
        "find_unused_parameters=True",
    ),
    # the combined shared gradient written into .grad outside DDP's backward
    Case((), "mgda", "parameters", direct=True): ("RuntimeError", "parameter_update='direct'"),
    # MARIGOLD takes its own per-task passes: it cannot look through DDP's sink
    Case(STATIC, "marigold", "representation"): ("ValueError", "find_unused_parameters=False"),
    Case(UNUSED, "marigold", "representation", unused=True): (
        "ValueError",
        "find_unused_parameters=False",
    ),
    Case(STATIC, "marigold", "parameters"): ("RuntimeError", "gradients differ across ranks"),
}

# DDP itself never synchronizes a static graph whose output it cannot look into; whatever a
# torch version does there, a balanced step must not let the ranks drift apart silently
NEVER_SILENT: list[Case] = [Case(STATIC, "mgda", lvl, output="dataclass") for lvl in LEVELS]

CASES: list[Case] = [*CORRECT, *RAISES, *NEVER_SILENT]
assert len({c.key for c in CASES}) == len(CASES), "two cases share a key"


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """``(STEPS, MICRO, WORLD * B_LOCAL, ...)`` inputs and targets; rank r owns rows
    ``r * B_LOCAL : (r + 1) * B_LOCAL`` of every micro-batch."""
    g = torch.Generator().manual_seed(1)
    shape = (STEPS, MICRO, WORLD * B_LOCAL)
    return (
        torch.randn(*shape, 5, generator=g, dtype=torch.float64),
        torch.randn(*shape, K, generator=g, dtype=torch.float64),
    )


def _micro_batches(case: Case, step: int) -> int:
    accumulate = case.schedule in ("accumulate", "no_sync") or (
        case.schedule == "accumulate_later" and step > 0
    )
    return MICRO if accumulate else 1


def _params(core: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in core.named_parameters()}


def _train(case: Case, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    """STEPS balanced steps. Returns the final parameters, or ``(error, parameters before the
    failing step, parameters after it)``."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    core: Any = model.module if ddp else model
    options: dict[str, Any] = {"estimator": "amortized"} if case.method == "marigold" else {}
    if case.direct:
        options["parameter_update"] = "direct"
    inner = (
        torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
        if case.fused
        else torch.optim.SGD(model.parameters(), lr=0.1)
    )
    opt = make_balancer(case.method, inner, K, **options)
    before = _params(core)
    try:
        for step in range(STEPS):
            before = _params(core)
            opt.zero_grad()
            n = _micro_batches(case, step)
            for m in range(n):
                unsynced = ddp and (case.schedule == "no_sync" or m < n - 1)
                with model.no_sync() if unsynced else contextlib.nullcontext():
                    forward = core if (ddp and case.schedule == "bypass") else model
                    out = forward(x[step, m])
                    z, outs = (
                        (out.representation, out.task_outputs)
                        if isinstance(out, (Out, ModelOutput))
                        else out
                    )
                    losses = [
                        nn.functional.mse_loss(o, y[step, m][:, k]) for k, o in enumerate(outs)
                    ]
                    extra: dict[str, Any] = {}
                    if opt.needs_closure and opt.closure_reruns_model:  # FAMO
                        xs, ys = x[step, m], y[step, m]

                        def closure(xs: torch.Tensor = xs, ys: torch.Tensor = ys) -> list[Any]:
                            o = model(xs)
                            outs = o.task_outputs if isinstance(o, (Out, ModelOutput)) else o[1]
                            return [nn.functional.mse_loss(p, ys[:, k]) for k, p in enumerate(outs)]

                        extra["closure"] = closure
                    if case.level == "representation":
                        opt.backward(losses, representation=z, **extra)
                    else:
                        opt.backward(
                            losses, shared_parameters=list(core.trunk.parameters()), **extra
                        )
            opt.step()
        if case.fused:
            opt.state_dict()  # settles the verdict of the last fused step
    except (RuntimeError, ValueError) as exc:
        return (type(exc).__name__, str(exc)), before, _params(core)
    return _params(core)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        x, y = _data()
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        results = {}
        for case in CASES:
            net = _net(case)
            model = nn.parallel.DistributedDataParallel(net, **dict.fromkeys(case.ddp, True))
            results[case.key] = _train(case, model, *_cast(case, x[:, :, rows], y[:, :, rows]))
            dist.barrier()  # a case that raised on one rank only would hang the next one here
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        Path(out_dir, f"{rank}.err").write_text(traceback.format_exc())
        raise
    # gloo's teardown can stall on some torch versions once the work is done
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    r0, r1 = spawn_ranks(_worker, tmp_path_factory.mktemp("ddp_modes"), WORLD)
    return r0, r1


def _net(case: Case) -> Net:
    net = Net(case.output, case.unused)
    return net if case.float32 else net.double()


def _cast(case: Case, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.float() if case.float32 else t for t in tensors)


def _single(case: Case) -> dict[str, torch.Tensor]:
    out = _train(case, _net(case), *_cast(case, *_data()))
    assert isinstance(out, dict), out
    return out


def _tolerance(case: Case) -> float:
    return 1e-5 if case.float32 else 1e-12


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("case", CORRECT, ids=lambda c: c.key)
def test_mode_is_correct(ranks: tuple[dict[str, Any], dict[str, Any]], case: Case) -> None:
    """Identical ranks, equal to one process on the global batch (same micro-batches)."""
    r0, r1 = (r[case.key] for r in ranks)
    assert isinstance(r0, dict), r0[0]
    assert isinstance(r1, dict), r1[0]
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n
    assert _max_diff(r0, _single(case)) < _tolerance(case)


@pytest.mark.parametrize("case", list(RAISES), ids=lambda c: c.key)
def test_mode_raises(ranks: tuple[dict[str, Any], dict[str, Any]], case: Case) -> None:
    """Both ranks raise the same error, naming the mode and the fix, and the failing step
    did not change the parameters."""
    kind, phrase = RAISES[case]
    for result in (r[case.key] for r in ranks):
        assert isinstance(result, tuple), f"{case.key}: no error"
        (name, message), before, after = result
        assert name == kind, message
        assert phrase in message, message
        assert _max_diff(before, after) == 0.0
    assert ranks[0][case.key][0] == ranks[1][case.key][0]


@pytest.mark.parametrize("case", NEVER_SILENT, ids=lambda c: c.key)
def test_mode_never_diverges_silently(
    ranks: tuple[dict[str, Any], dict[str, Any]], case: Case
) -> None:
    r0, r1 = (r[case.key] for r in ranks)
    if isinstance(r0, tuple) or isinstance(r1, tuple):
        assert isinstance(r0, tuple) and isinstance(r1, tuple)
        assert r0[0][0] == r1[0][0] == "RuntimeError"
        assert "static_graph=False" in r0[0][1]
        return
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n
    assert _max_diff(r0, _single(case)) < 1e-12
