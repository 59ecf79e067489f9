"""Tests for mtl.models: shapes, balance points, gradient flow, shared parameters, validation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mtl.models import (
    PLE,
    Features,
    MMoE,
    ModelOutput,
    MultiTaskModel,
    SharedBottom,
    build_model,
)

B = 6
NUM = 3
CARDS = (5, 7)
EMB = 4

SMALL: dict[str, dict[str, Any]] = {
    "shared_bottom": {"bottom_dims": (16, 8)},
    "mmoe": {"num_experts": 3, "expert_dims": (8,)},
    "ple": {"num_shared_experts": 2, "num_task_experts": 1, "expert_dims": (8,)},
    "ple2": {"num_levels": 2, "num_shared_experts": 2, "num_task_experts": 2, "expert_dims": (8,)},
    "ple3_no_task_experts": {
        "num_levels": 3,
        "num_shared_experts": 1,
        "num_task_experts": 0,
        "expert_dims": (8,),
    },
}
DEFAULT_POINT = {"shared_bottom": "bottom", "mmoe": "experts", "ple": "shared_experts"}


def _factory_name(variant: str) -> str:
    return "ple" if variant.startswith("ple") else variant


def make(
    variant: str,
    *,
    num_tasks: int = 2,
    num_numeric: int = NUM,
    cardinalities: tuple[int, ...] = CARDS,
    **kwargs: Any,
) -> MultiTaskModel:
    torch.manual_seed(0)
    opts = {"embedding_dim": EMB, "tower_dims": (8,), **SMALL[variant], **kwargs}
    return build_model(
        _factory_name(variant),
        num_numeric=num_numeric,
        cardinalities=cardinalities,
        num_tasks=num_tasks,
        **opts,
    )


def batch(num_numeric: int = NUM, cardinalities: tuple[int, ...] = CARDS) -> Features:
    g = torch.Generator().manual_seed(1)
    numeric = torch.randn(B, num_numeric, generator=g) if num_numeric else None
    categorical = (
        torch.stack([torch.randint(0, c, (B,), generator=g) for c in cardinalities], dim=1)
        if cardinalities
        else None
    )
    return Features(numeric, categorical)


def rep_shape(model: MultiTaskModel) -> tuple[int, ...]:
    if model.balance_point == "input":
        return (B, model.input_dim)
    if isinstance(model, SharedBottom):
        return (B, model.bottom_dims[-1])
    if isinstance(model, MMoE):
        return (B, model.num_experts, model.expert_dims[-1])
    assert isinstance(model, PLE)
    return (B, model.num_shared_experts, model.expert_dims[-1])


VARIANTS = list(SMALL)
POINTS = ["default", "input"]


def _point_kwargs(variant: str, point: str) -> dict[str, Any]:
    return {} if point == "default" else {"balance_point": point}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("num_tasks", [1, 2, 3])
def test_output_shapes(variant: str, point: str, num_tasks: int) -> None:
    model = make(variant, num_tasks=num_tasks, **_point_kwargs(variant, point))
    if point == "default":
        assert model.balance_point == DEFAULT_POINT[_factory_name(variant)]
    out = model(batch())
    assert isinstance(out, ModelOutput)
    assert len(out.task_outputs) == num_tasks
    for t in out.task_outputs:
        assert t.shape == (B,)
        assert torch.isfinite(t).all()
    assert isinstance(out.representation, torch.Tensor)
    assert out.representation.shape == rep_shape(model)
    assert out.representation.requires_grad
    assert model.input_dim == NUM + len(CARDS) * EMB


@pytest.mark.parametrize("variant", VARIANTS)
def test_numeric_only_and_plain_tensor(variant: str) -> None:
    model = make(variant, cardinalities=())
    x = batch(cardinalities=())
    out_features = model(x)
    assert x.numeric is not None
    out_tensor = model(x.numeric)
    for a, b in zip(out_features.task_outputs, out_tensor.task_outputs):
        assert a.shape == (B,)
        torch.testing.assert_close(a, b)
    assert out_tensor.representation.shape == rep_shape(model)


@pytest.mark.parametrize("variant", VARIANTS)
def test_categorical_only(variant: str) -> None:
    model = make(variant, num_numeric=0)
    out = model(batch(num_numeric=0))
    assert all(t.shape == (B,) for t in out.task_outputs)
    assert model.input_dim == len(CARDS) * EMB


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("point", POINTS)
def test_every_task_depends_on_representation(variant: str, point: str) -> None:
    model = make(variant, num_tasks=3, **_point_kwargs(variant, point))
    out = model(batch())
    rep = out.representation
    assert isinstance(rep, torch.Tensor)
    for k, y in enumerate(out.task_outputs):
        loss = (y - float(k)).pow(2).mean()
        (g,) = torch.autograd.grad(loss, rep, retain_graph=True, allow_unused=True)
        assert g is not None, f"task {k} does not depend on the representation"
        assert g.shape == rep.shape
        assert (g != 0).any(), f"task {k}: zero gradient at the representation"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_reach_embeddings(variant: str, sparse: bool) -> None:
    model = make(variant, sparse=sparse)
    out = model(batch())
    sum(y.pow(2).mean() for y in out.task_outputs).backward()
    for emb in model.embedding.embeddings:
        grad = emb.weight.grad
        assert grad is not None
        assert grad.is_sparse == sparse
        dense = grad.to_dense() if sparse else grad
        assert (dense != 0).any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_balanced_gradient_reaches_trunk_through_representation(variant: str) -> None:
    """A backward of the representation alone reaches the embeddings and the shared trunk."""
    model = make(variant)
    out = model(batch())
    rep = out.representation
    assert isinstance(rep, torch.Tensor)
    rep.backward(torch.ones_like(rep))
    shared = list(model.shared_parameters())
    for emb in model.embedding.embeddings:
        assert emb.weight.grad is not None and (emb.weight.grad != 0).any()
    assert any(p.grad is not None and (p.grad != 0).any() for p in shared)
    for tower in model.towers:
        assert all(p.grad is None for p in tower.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("point", POINTS)
def test_shared_parameters(variant: str, point: str) -> None:
    model = make(variant, **_point_kwargs(variant, point))
    all_ids = {id(p) for p in model.parameters()}
    shared = list(model.shared_parameters())
    shared_ids = [id(p) for p in shared]
    assert len(shared_ids) == len(set(shared_ids)), "duplicates in shared_parameters()"
    assert set(shared_ids) <= all_ids
    tower_ids = {id(p) for p in model.towers.parameters()}
    assert not set(shared_ids) & tower_ids
    emb_ids = {id(p) for p in model.embedding.parameters()}
    assert emb_ids <= set(shared_ids)
    task_ids = {id(p) for p in model.task_parameters()}
    assert task_ids | set(shared_ids) == all_ids
    assert not task_ids & set(shared_ids)
    if point == "input":
        assert set(shared_ids) == emb_ids
    else:
        assert len(set(shared_ids)) > len(emb_ids)
    if isinstance(model, MMoE):
        gate_ids = {id(p) for p in model.gates.parameters()}
        assert not gate_ids & set(shared_ids)


def test_ple_shared_parameters_cover_levels() -> None:
    model = make("ple2")
    assert isinstance(model, PLE)
    shared_ids = {id(p) for p in model.shared_parameters()}
    first, last = model.levels[0], model.levels[1]
    assert {id(p) for p in first.shared_experts.parameters()} <= shared_ids
    assert {id(p) for p in first.shared_gate.parameters()} <= shared_ids
    assert {id(p) for p in last.shared_experts.parameters()} <= shared_ids
    assert last.shared_gate is None
    assert not {id(p) for p in first.task_experts.parameters()} & shared_ids
    assert not {id(p) for p in first.task_gates.parameters()} & shared_ids


def test_mmoe_representation_is_stacked_experts() -> None:
    model = make("mmoe")
    assert isinstance(model, MMoE)
    x = batch()
    out = model(x)
    e = model.embedding(x)
    expected = torch.stack([f(e) for f in model.experts], dim=1)
    torch.testing.assert_close(out.representation, expected)


def test_eval_mode_is_deterministic_with_dropout() -> None:
    model = make("mmoe", dropout=0.5).eval()
    x = batch()
    a, b = model(x), model(x)
    for s, t in zip(a.task_outputs, b.task_outputs):
        torch.testing.assert_close(s, t)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_tasks": 0}, "num_tasks"),
        ({"num_tasks": 1.5}, "num_tasks"),
        ({"num_tasks": True}, "num_tasks"),
        ({"num_numeric": -1}, "num_numeric"),
        ({"cardinalities": (5, 0)}, "cardinalities"),
        ({"cardinalities": 5}, "cardinalities"),
        ({"num_numeric": 0, "cardinalities": ()}, "at least one"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"sparse": "yes"}, "sparse"),
        ({"tower_dims": (8, 0)}, "tower_dims"),
        ({"tower_dims": 8}, "tower_dims"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"balance_point": "towers"}, "balance_point"),
        ({"balance_point": "input", "cardinalities": ()}, "categorical"),
    ],
)
@pytest.mark.parametrize("variant", ["shared_bottom", "mmoe", "ple"])
def test_bad_common_arguments(variant: str, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(variant, **kwargs)


@pytest.mark.parametrize(
    "variant, kwargs, match",
    [
        ("shared_bottom", {"bottom_dims": ()}, "bottom_dims"),
        ("shared_bottom", {"balance_point": "experts"}, "balance_point"),
        ("mmoe", {"num_experts": 0}, "num_experts"),
        ("mmoe", {"expert_dims": ()}, "expert_dims"),
        ("ple", {"num_levels": 0}, "num_levels"),
        ("ple", {"num_shared_experts": 0}, "num_shared_experts"),
        ("ple", {"num_task_experts": -1}, "num_task_experts"),
    ],
)
def test_bad_model_arguments(variant: str, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(variant, **kwargs)


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build_model("transformer", num_numeric=1, cardinalities=(), num_tasks=1)
    with pytest.raises(TypeError):
        build_model("mmoe", num_numeric=1, cardinalities=(), num_tasks=1, bottom_dims=(4,))
    assert isinstance(
        build_model("shared_bottom", num_numeric=2, cardinalities=(3,), num_tasks=2), SharedBottom
    )


def test_direct_construction_and_keyword_only() -> None:
    model = PLE(num_numeric=2, cardinalities=[3], num_tasks=2, num_levels=2)
    out = model(Features(torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.long)))
    assert out.representation.shape == (4, 2, 64)
    with pytest.raises(TypeError):
        SharedBottom(2, [3], 2)  # type: ignore[misc]


@pytest.mark.parametrize(
    "x, match",
    [
        (Features(torch.randn(B, NUM), None), "categorical"),
        (Features(None, torch.zeros(B, 2, dtype=torch.long)), "numeric"),
        (Features(torch.randn(B, NUM + 1), torch.zeros(B, 2, dtype=torch.long)), "numeric"),
        (Features(torch.randn(B, NUM), torch.zeros(B, 3, dtype=torch.long)), "categorical"),
        (Features(torch.randn(B, NUM), torch.zeros(B, 2)), "integer"),
        (Features(torch.randn(B, NUM), torch.zeros(B + 1, 2, dtype=torch.long)), "batch"),
        (torch.randn(B, NUM), "categorical"),
    ],
)
def test_bad_inputs(x: Features | torch.Tensor, match: str) -> None:
    model = make("shared_bottom")
    with pytest.raises(ValueError, match=match):
        model(x)
    with pytest.raises(TypeError):
        model([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="numeric"):
        model(([0.0] * NUM, torch.zeros(B, 2, dtype=torch.long)))  # type: ignore[arg-type]


def test_plain_pair_input_matches_features() -> None:
    model = make("mmoe")
    x = batch()
    a, b = model(x), model((x.numeric, x.categorical))  # type: ignore[arg-type]
    for s, t in zip(a.task_outputs, b.task_outputs):
        torch.testing.assert_close(s, t)


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple"])
@pytest.mark.parametrize("balance_point", [None, "input"])
@pytest.mark.parametrize("num_levels", [1, 2])
def test_heads_recompute_outputs_bitwise(name: str, balance_point: str | None, num_levels: int):
    from mtl.models import build_model

    if name != "ple" and num_levels == 2:
        pytest.skip("levels only apply to PLE")
    torch.manual_seed(0)
    kw: dict = {} if balance_point is None else {"balance_point": balance_point}
    if name == "ple":
        kw["num_levels"] = num_levels
    model = build_model(name, num_numeric=3, cardinalities=[5, 7], num_tasks=3, **kw)
    x = Features(torch.randn(6, 3), torch.randint(0, 5, (6, 2)))
    out = model(x)
    assert out.heads is not None
    again = out.heads(out.representation)
    for a, b in zip(out.task_outputs, again):
        assert torch.equal(a, b)
    shifted = out.heads(out.representation + 0.1)
    assert any(not torch.equal(a, b) for a, b in zip(out.task_outputs, shifted))


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple"])
def test_heads_replay_the_dropout_masks_of_the_forward(name: str) -> None:
    from mtl.models import build_model

    torch.manual_seed(0)
    model = build_model(name, num_numeric=3, cardinalities=[5], num_tasks=2, dropout=0.5)
    model.train()
    x = Features(torch.randn(16, 3), torch.randint(0, 5, (16, 1)))
    out = model(x)
    after_forward = torch.get_rng_state()
    for a, b in zip(out.task_outputs, out.heads(out.representation)):
        assert torch.equal(a, b)  # same masks as the forward
    assert torch.equal(torch.get_rng_state(), after_forward)  # caller's stream untouched
    again = model(x)  # the stream moved on: new masks
    assert any(not torch.equal(a, b) for a, b in zip(out.task_outputs, again.task_outputs))
