"""Production paths: checkpoint/resume for every balancer, gradient accumulation, sparse
embeddings with two optimizers, CPU autocast, torch.compile."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from balancers.registry import make_balancer
from mtl.models import Features, SharedBottom

sys.path.insert(0, str(Path(__file__).parent))
from _models import checkpoint_copy, registered_balancers  # noqa: E402

K = 2
LEVELS = ("representation", "parameters")


NAMES = registered_balancers()


def _model(seed: int = 0, sparse: bool = False, dropout: float = 0.0) -> SharedBottom:
    torch.manual_seed(seed)
    return SharedBottom(
        num_numeric=4,
        cardinalities=[50, 30],
        num_tasks=K,
        bottom_dims=(16, 8),
        tower_dims=(8,),
        sparse=sparse,
        dropout=dropout,
    )


def _batch(seed: int, n: int = 32) -> tuple[Features, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = Features(torch.randn(n, 4, generator=g), torch.randint(0, 30, (n, 2), generator=g))
    ys = [torch.randint(0, 2, (n,), generator=g).float() for _ in range(K)]
    return x, ys


def _losses(outputs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.binary_cross_entropy_with_logits(o, y) for o, y in zip(outputs, ys)]


def _backward(opt: Any, model: SharedBottom, x: Features, ys: list[torch.Tensor], level: str):
    out = model(x)
    losses = _losses(out.task_outputs, ys)
    kwargs: dict[str, Any] = {}
    if opt.needs_closure:  # MARIGOLD, FAMO: re-evaluate the losses
        if level == "representation" and not opt.closure_reruns_model:
            kwargs["closure"] = lambda z: _losses(out.heads(z), ys)
        else:
            kwargs["closure"] = lambda: _losses(model(x).task_outputs, ys)
    if level == "representation":
        return opt.backward(losses, representation=out.representation, **kwargs)
    return opt.backward(losses, shared_parameters=list(model.shared_parameters()), **kwargs)


def _train(opt: Any, model: SharedBottom, level: str, seeds: range) -> None:
    for s in seeds:
        x, ys = _batch(s)
        opt.zero_grad()
        _backward(opt, model, x, ys, level)
        opt.step()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_resume_is_bit_identical(name: str, level: str) -> None:
    """Save mid-training, resume in a fresh process-like setup, continue bit-identically."""
    model = _model(dropout=0.1)
    opt = make_balancer(name, torch.optim.Adam(model.parameters(), lr=1e-2), K)
    _train(opt, model, level, range(3))
    ckpt = checkpoint_copy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()},
        weights_only=False,
    )
    _train(opt, model, level, range(3, 6))
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}

    model2 = _model(seed=123, dropout=0.1)  # different init: everything must come from the file
    opt2 = make_balancer(name, torch.optim.Adam(model2.parameters(), lr=1e-2), K)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    _train(opt2, model2, level, range(3, 6))
    for n, p in model2.named_parameters():
        assert torch.equal(p, expected[n]), (name, level, n)
    assert opt2.num_steps == opt.num_steps


@pytest.mark.parametrize("name", [n for n in NAMES if n != "marigold"])
def test_gradient_accumulation_balances_each_micro_batch(name: str) -> None:
    """Documented semantics: each backward() balances its own micro-batch (weights from that
    micro-batch's Gram); the gradients of successive calls add up in .grad."""
    model = _model()
    opt = make_balancer(name, torch.optim.SGD(model.parameters(), lr=0.1), K)
    state = opt.state_dict()
    batches = [_batch(10), _batch(11)]
    opt.zero_grad()
    for x, ys in batches:
        _backward(opt, model, x, ys, "representation")
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}

    opt.load_state_dict(state)  # same balancer state for the reference
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, ys in batches:
        opt.zero_grad()
        _backward(opt, model, x, ys, "representation")
        for n, p in model.named_parameters():
            expected[n] += p.grad
    for n in expected:
        torch.testing.assert_close(accumulated[n], expected[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["mgda", "multibalance", "gradops"])
def test_sparse_embeddings_with_two_optimizers(name: str) -> None:
    """SparseAdam for the tables, Adam (wrapped) for the rest, at the representation level."""
    model = _model(sparse=True)
    tables = list(model.embedding.parameters())
    table_ids = {id(p) for p in tables}
    dense = [p for p in model.parameters() if id(p) not in table_ids]
    opt = make_balancer(name, torch.optim.Adam(dense, lr=1e-2), K)
    sparse_opt = torch.optim.SparseAdam(tables, lr=1e-2)
    before = [t.detach().clone() for t in tables]
    for s in range(3):
        x, ys = _batch(s)
        opt.zero_grad()
        sparse_opt.zero_grad()
        info = _backward(opt, model, x, ys, "representation")
        assert all(t.grad is not None and t.grad.is_sparse for t in tables)
        opt.step()
        sparse_opt.step()
    assert info.weights.shape[-1] == K
    assert any(not torch.equal(a, t) for a, t in zip(before, tables))


def test_cpu_autocast_bfloat16_trains() -> None:
    model = _model()
    opt = make_balancer("mgda", torch.optim.Adam(model.parameters(), lr=1e-2), K)
    x, ys = _batch(0, n=128)
    first = None
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            losses = _losses([o.float() for o in out.task_outputs], ys)
        opt.zero_grad()
        info = opt.backward(losses, representation=out.representation)
        opt.step()
        first = float(info.losses.sum()) if first is None else first
    assert info.gram is not None and info.gram.dtype == torch.float64
    assert float(info.losses.sum()) < first


def _has_compiler() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.mark.skipif(not _has_compiler(), reason="torch.compile (inductor) needs a C++ compiler")
def test_torch_compile_trunk_with_representation_balancing() -> None:
    """Compile the trunk: the balance point is the boundary between compiled and eager code."""
    torch._dynamo.reset()
    eager, compiled = _model(), _model()
    compiled.bottom = torch.compile(compiled.bottom)  # type: ignore[assignment]
    opts = [
        make_balancer("mgda", torch.optim.SGD(m.parameters(), lr=0.1), K) for m in (eager, compiled)
    ]
    for s in range(2):
        x, ys = _batch(s)
        infos = []
        for m, o in zip((eager, compiled), opts):
            o.zero_grad()
            infos.append(_backward(o, m, x, ys, "representation"))
            o.step()
        torch.testing.assert_close(infos[0].weights, infos[1].weights, rtol=1e-4, atol=1e-5)
    for (n, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.skipif(not _has_compiler(), reason="torch.compile (inductor) needs a C++ compiler")
def test_torch_compile_whole_model_at_parameter_level() -> None:
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model)
    opt = make_balancer("mgda", torch.optim.SGD(model.parameters(), lr=0.1), K)
    x, ys = _batch(0)
    out = compiled(x)
    opt.zero_grad()
    info = opt.backward(
        _losses(out.task_outputs, ys), shared_parameters=list(model.shared_parameters())
    )
    opt.step()
    assert torch.isfinite(info.weights).all() and info.gram is not None


def test_compiled_region_hiding_the_representation_gets_a_clear_error() -> None:
    """A fully compiled model fuses z and the heads into one autograd node: z is then an output,
    not an input, of the node the losses come from; the wrapper must say so, not train wrongly."""
    z_src = torch.randn(4, 3, requires_grad=True)
    lin = nn.Linear(3, 1)

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, w):  # type: ignore[override]
            z = a * 2
            return z, z @ w

        @staticmethod
        def backward(ctx, gz, gy):  # type: ignore[override]
            return gz * 2, None

    z, y = Fused.apply(z_src * 1.0, lin.weight.T)
    opt = make_balancer("mgda", torch.optim.SGD([z_src, lin.weight], lr=0.1), 1)
    with pytest.raises(ValueError, match="does not depend on the representation"):
        opt.backward([y.sum()], representation=z)


@pytest.mark.parametrize("name", ["mgda", "multibalance", "gradops", "pcgrad"])
def test_parameter_level_keeps_sparse_table_gradients_sparse(name: str) -> None:
    """Sparse tables at parameter level: only the touched rows enter the Gram matrix, the
    combined gradient stays sparse (SparseAdam works) and equals the dense computation."""
    results = {}
    for sparse in (False, True):
        model = _model(sparse=sparse)
        opt = make_balancer(name, torch.optim.SGD(model.parameters(), lr=0.1), K)
        x, ys = _batch(5)
        opt.zero_grad()
        info = _backward(opt, model, x, ys, "parameters")
        table = (
            model.embedding.tables[0].weight
            if hasattr(model.embedding, "tables")
            else next(model.embedding.parameters())
        )
        assert table.grad.is_sparse == sparse
        results[sparse] = (info.weights, info.gram, table.grad.to_dense())
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[True][2], results[False][2], rtol=1e-5, atol=1e-7)


def test_combined_optimizer_sparse_tables_one_balancer_checkpoint() -> None:
    """SparseAdam (tables) + Adam (rest) behind one CombinedOptimizer wrapped by one balancer:
    trains, schedules, and resumes bit-identically."""
    from mtl import CombinedOptimizer

    def build(seed: int) -> tuple[SharedBottom, Any, Any]:
        model = _model(seed=seed, sparse=True)
        tables = list(model.embedding.parameters())
        ids = {id(p) for p in tables}
        dense = [p for p in model.parameters() if id(p) not in ids]
        inner = CombinedOptimizer(
            [torch.optim.SparseAdam(tables, lr=1e-2), torch.optim.Adam(dense, lr=1e-2)]
        )
        opt = make_balancer("mgda", inner, K)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return model, opt, sched

    def train(model: SharedBottom, opt: Any, sched: Any, seeds: range) -> None:
        for s in seeds:
            x, ys = _batch(s)
            opt.zero_grad()
            _backward(opt, model, x, ys, "representation")
            opt.step()
            sched.step()

    model, opt, sched = build(0)
    train(model, opt, sched, range(3))
    assert all(g["lr"] == 5e-3 for g in opt.param_groups)  # the scheduler reached both
    ckpt = checkpoint_copy(
        {"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()},
        weights_only=False,
    )
    train(model, opt, sched, range(3, 6))
    model2, opt2, sched2 = build(9)
    model2.load_state_dict(ckpt["m"])
    opt2.load_state_dict(ckpt["o"])
    sched2.load_state_dict(ckpt["s"])
    train(model2, opt2, sched2, range(3, 6))
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
