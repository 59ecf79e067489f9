"""TorchRec (issue 19): a multi-task DLRM on an EmbeddingBagCollection under
DistributedModelParallel with its default data-parallel wrapper (DDP with ``static_graph=True``
and ``gradient_as_bucket_view=True``), balanced at the dense representation.

Two gloo processes on CPU run every case of :data:`CASES` in ONE spawn (the module fixture).
Each case shards the tables of ``experiments.torchrec_example.MultiTaskDLRM`` one way (table-wise,
column-wise, table-column-wise, data-parallel, or a mix), loads the same initial parameters as
an unsharded model, and trains ``STEPS`` balanced SGD steps (tables: SGD fused into the
backward; the rest: SGD in the balancer). The tests then check that the ranks hold the same
model and weights, and that both equal ONE process training the unsharded model on the global
batch (SGD over every parameter, the same balancer). ``docs/torchrec.md`` reports the numbers.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import pytest

pytest.importorskip("torchrec")
pytest.importorskip("fbgemm_gpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper  # noqa: E402

from balancers.registry import make_balancer  # noqa: E402
from experiments import torchrec_example as ex  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _spawn import spawn_ranks  # noqa: E402

WORLD = 2
STEPS = 3
B_LOCAL = 4
LR = 0.1
CFG = ex.Config(
    num_features=3, rows=20, dim=8, num_dense=4, bottom=(8,), top=(16, 8), tower=4, max_ids=3
)
SHARDINGS = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
# float32 throughout (FBGEMM's tables): the sharded run and one process sum in another order
TOLERANCE = 1e-6


class Case(NamedTuple):
    sharding: str
    method: str
    level: str = "representation"
    fused: bool = True  # False: no in-backward optimizer (data-parallel tables only)
    static_graph: bool = True  # False: DefaultDataParallelWrapper(static_graph=False)

    @property
    def key(self) -> str:
        flags = {"unfused": not self.fused, "dynamic_graph": not self.static_graph}
        extra = "".join(f" {flag}" for flag, on in flags.items() if on)
        return f"{self.sharding} {self.method} {self.level}{extra}"

    @property
    def options(self) -> dict[str, Any]:
        return {"estimator": "amortized"} if self.method == "marigold" else {}


CORRECT: list[Case] = [
    *(Case(s, m) for s in SHARDINGS for m in ("mgda", "multibalance")),
    Case("mixed", "mgda"),
    Case("mixed", "equal"),  # EqualWeight's general path behind DDP's sink
    Case("mixed", "famo"),  # a closure that re-runs the sharded model
    Case("mixed", "mgda", "parameters"),  # shared_parameters= the dense trunk
    # data-parallel tables trained by the balancer's own optimizer (the DDP TorchRec puts
    # around a data-parallel lookup, static_graph=True too, averages their gradients)
    Case("data_parallel", "mgda", fused=False),
    # the wrapper that MARIGOLD needs (below), with MGDA too
    Case("mixed", "marigold", static_graph=False),
    Case("mixed", "mgda", static_graph=False),
]

#: case -> (exception type, a phrase of its message): MARIGOLD takes its own per-task passes
#: and cannot run on the first iteration of DMP's static graph (docs/ddp.md, "Per method")
RAISES: dict[Case, tuple[str, str]] = {
    Case("mixed", "marigold"): ("ValueError", "static_graph=False"),
    Case("mixed", "marigold", "parameters"): ("RuntimeError", "static_graph=False"),
}

CASES: list[Case] = [*CORRECT, *RAISES]
assert len({c.key for c in CASES}) == len(CASES)


def _data() -> ex.SyntheticClicks:
    return ex.SyntheticClicks(CFG, seed=0)


def _train(
    case: Case,
    model: torch.nn.Module,
    core: ex.MultiTaskDLRM,
    opt: Any,
    rows: slice,
    snapshots: list[dict[str, torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """``STEPS`` balanced steps on ``rows`` of each global batch; the weights of each step.
    ``snapshots`` receives the full parameters before each step (DMP runs only)."""
    data = _data()
    weights = []
    for step in range(STEPS):
        if snapshots is not None:
            snapshots.append(ex.full_state(model))
        batch = data.batch(step, WORLD * B_LOCAL).rows(rows)
        info = ex.train_step(model, opt, batch, CFG.features, case.level, core.trunk_parameters())
        weights.append(info.weights.clone())
    return weights


def _single(case: Case) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One process, the unsharded model, the global batch, SGD over every parameter."""
    model = ex.MultiTaskDLRM(CFG)
    opt = make_balancer(case.method, torch.optim.SGD(model.parameters(), lr=LR), 3, **case.options)
    weights = _train(case, model, model, opt, slice(None))
    return weights, {n: t.detach().clone() for n, t in model.state_dict().items()}


def _case(case: Case, rank: int) -> dict[str, Any]:
    model = ex.MultiTaskDLRM(CFG)
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}
    wrapper = None if case.static_graph else DefaultDataParallelWrapper(static_graph=False)
    dmp = ex.shard(
        model,
        case.sharding,
        table_optimizer=torch.optim.SGD if case.fused else None,
        table_options={"lr": LR},
        data_parallel_wrapper=wrapper,
    )
    ex.load_full_state(dmp, initial)  # DMP re-initializes the tables it shards on the CPU
    ddp = dmp._dmp_wrapped_module
    keys: list[str] = []
    handle = dmp.module.ebc.register_forward_hook(lambda m, i, out: keys.extend(out.keys()))
    opt = ex.dense_balancer(dmp, case.method, lambda ps: torch.optim.SGD(ps, lr=LR), **case.options)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    out: dict[str, Any] = {
        "keys": keys,
        "ddp": {
            "static_graph": bool(getattr(ddp, "static_graph", False)),
            "find_unused_parameters": bool(getattr(ddp, "find_unused_parameters", True)),
        },
        "plan": ex.describe_plan(dmp),
    }
    snapshots: list[dict[str, torch.Tensor]] = []
    try:
        out["weights"] = _train(case, dmp, dmp.module, opt, rows, snapshots)
    except (RuntimeError, ValueError) as exc:
        out["error"] = (type(exc).__name__, str(exc))
        out["before"] = snapshots[-1]  # the parameters before the failing step
    handle.remove()
    out["params"] = ex.full_state(dmp)
    del out["keys"][CFG.num_features :]
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results: dict[str, Any] = {}
        for case in CASES:
            results[case.key] = _case(case, rank)
            dist.barrier()  # a case that raised on one rank only would hang here
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        Path(out_dir, f"{rank}.err").write_text(traceback.format_exc())
        raise
    os._exit(0)  # gloo's teardown can stall once the work is done


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    r0, r1 = spawn_ranks(_worker, tmp_path_factory.mktemp("torchrec"), WORLD, weights_only=False)
    return r0, r1


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("case", CORRECT, ids=lambda c: c.key)
def test_sharded_ranks_agree_and_equal_one_process(
    ranks: tuple[dict[str, Any], dict[str, Any]], case: Case
) -> None:
    """Identical ranks (every parameter, in full, and every step's weights), equal to one
    process on the global batch: parameters within 1e-6 (float32), weights within 1e-6."""
    r0, r1 = (r[case.key] for r in ranks)
    assert "error" not in r0, r0.get("error")
    assert "error" not in r1, r1.get("error")
    # DistributedModelParallel's default data-parallel wrapper, or the one the case asks for
    assert r0["ddp"] == {"static_graph": case.static_graph, "find_unused_parameters": False}
    kinds = {where.split()[0] for where in r0["plan"].values()}
    mixed = {"table_wise", "column_wise", "data_parallel"}  # one table each
    assert kinds == ({case.sharding} if case.sharding in SHARDINGS else mixed), r0["plan"]
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    for a, b in zip(r0["weights"], r1["weights"]):
        assert torch.equal(a, b)
    weights, params = _single(case)
    assert _max_diff(r0["params"], params) < TOLERANCE
    for a, b in zip(r0["weights"], weights):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the run moved every parameter (a table or layer left untrained would match trivially)
    initial = ex.MultiTaskDLRM(CFG).state_dict()
    for n, p in params.items():
        assert not torch.equal(p, initial[n]), n


@pytest.mark.parametrize("case", list(RAISES), ids=lambda c: c.key)
def test_unsupported_combination_raises_on_every_rank(
    ranks: tuple[dict[str, Any], dict[str, Any]], case: Case
) -> None:
    """Both ranks raise the same error, which names the fix; the dense parameters are left as
    they were before the failing step, and the ranks still agree."""
    kind, phrase = RAISES[case]
    r0, r1 = (r[case.key] for r in ranks)
    for r in (r0, r1):
        assert "error" in r, f"{case.key}: no error"
        name, message = r["error"]
        assert name == kind, message
        assert phrase in message, message
        for n, p in r["params"].items():
            if "embedding_bags" not in n:  # the fused optimizer updates tables in backward
                assert torch.equal(p, r["before"][n]), n
    assert r0["error"] == r1["error"]
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n


def test_sharded_collection_permutes_its_keys(
    ranks: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    """The pitfall the model avoids by reading features with ``KeyedTensor.to_dict()``: under
    the table-wise plan (t0, t2 on rank 0; t1 on rank 1) the sharded collection returns its
    keys in shard order, so ``KeyedTensor.values()`` would put f2's embedding where f1's
    belongs. (TorchRec 1.8.0; if a later version keeps the configured order, this test can
    go, and ``to_dict()`` stays correct.)"""
    keys = ranks[0][Case("table_wise", "mgda").key]["keys"]
    assert sorted(keys) == CFG.features
    assert keys == ["f0", "f2", "f1"], keys
