"""The float64 Gram matrix from float32 gradients, and the autograd-graph dependency walk."""

from __future__ import annotations

import pytest
import torch

from mtl import depends_on, gram_matrix


@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1.0, 1e8, 1e30])
@pytest.mark.parametrize("chunk", [7, 1 << 15])
def test_gram_float32_matches_float64_at_any_scale(scale: float, chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 3000, generator=g) * torch.logspace(-3, 3, 5)[:, None] * scale
    rows = rows.float()
    ref = rows.double() @ rows.double().T
    got = gram_matrix(rows, chunk=chunk)
    assert got.dtype == torch.float64
    norm = (ref.diagonal()[:, None] * ref.diagonal()[None, :]).sqrt()
    assert float(((got - ref).abs() / norm).max()) < 1e-6


def test_gram_zero_rows_bfloat16_and_nonfinite() -> None:
    rows = torch.zeros(3, 10)
    rows[1] = 2.0
    assert torch.equal(gram_matrix(rows), torch.diag(torch.tensor([0.0, 40.0, 0.0])).double())
    bf = torch.randn(2, 100).bfloat16()
    torch.testing.assert_close(gram_matrix(bf), bf.double() @ bf.double().T, rtol=1e-6, atol=0)
    rows[2, 3] = float("nan")
    assert torch.isnan(gram_matrix(rows)[2, 2])
    rows[2, 3] = float("inf")
    assert not torch.isfinite(gram_matrix(rows)[2, 2])


def test_depends_on_is_a_graph_property() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    lin = torch.nn.Linear(3, 5)
    z = torch.relu(lin(x))
    losses = [(2 * z).sum(), (0 * z).sum(), (z.detach().sum() * x).sum(), lin.weight.sum()]
    assert depends_on(losses, [z]) == [True, True, False, False]
    assert depends_on(losses, [x]) == [True, True, True, False]
    assert depends_on([lin.weight.sum()], [lin.weight]) == [True]
