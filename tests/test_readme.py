"""The README's quick start runs as written, with every balancer in its place (a core test: the
compatibility run under the oldest supported torch executes it too)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README.md has no python block under '## Quick start'"
    return blocks[0]


def test_quick_start_runs_as_written() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_quick_start(), str(README), "exec"), namespace)
    info = namespace["info"]
    weights = info.weights  # type: ignore[attr-defined]
    assert weights.shape == (2,) and bool(torch.isfinite(weights).all())
    assert abs(float(weights.sum()) - 1.0) < 1e-9  # MGDA's weights lie on the simplex


@pytest.mark.parametrize("name", ["EqualWeight", "MultiBalance", "GradOPS", "PCGrad"])
def test_quick_start_with_every_gram_balancer(name: str) -> None:
    """The same lines with another balancer: 'every method has the same shape'."""
    code = _quick_start().replace("from balancers import MGDA", f"from balancers import {name}")
    code = code.replace("opt = MGDA(", f"opt = {name}(")
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert bool(torch.isfinite(namespace["info"].weights).all())  # type: ignore[attr-defined]
