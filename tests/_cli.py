"""Command-line arguments shared by the experiment CLI tests."""

from __future__ import annotations

# the CLI flags that shrink the synthetic task to a few milliseconds per run (epochs not set)
TINY_SYNTHETIC: list[str] = [
    "--set", "data.num_samples=240",
    "--set", "data.n_valid=80",
    "--set", "data.n_test=80",
    "--set", "data.dim=8",
    "--set", "data.num_sin=2",
    "--set", "model.expert_dims=[8]",
    "--set", "model.tower_dims=[4]",
    "--set", "model.num_experts=2",
    "--batch-size", "80",
]  # fmt: skip
