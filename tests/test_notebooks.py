"""Execute every notebook in ``notebooks/`` at the smoke-test size, and check the committed files.

Each notebook runs in a fresh kernel of the *current* interpreter (a kernelspec pointing at
``sys.executable`` is written to a temporary ``JUPYTER_PATH``, so a stale or foreign ``python3``
kernelspec cannot pick another environment) with ``MTL_NOTEBOOK_SMALL=1``; a cell that raises
fails the test. The test is skipped, with the reason, only when no kernel can be started.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 120
KERNEL_NAME = "mtl-notebook-tests"
EXPECTED = {
    "01_conflict_diagnostics_census.ipynb",
    "02_toy_trajectories.ipynb",
    "03_geometry.ipynb",
}


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernelspec for the running interpreter, visible through ``JUPYTER_PATH``."""
    try:
        from ipykernel.kernelspec import write_kernel_spec
    except ImportError as exc:  # pragma: no cover - ipykernel is a test dependency
        pytest.skip(f"ipykernel is not installed, no kernel can be started: {exc}")
    data_dir = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(
        data_dir / "kernels" / KERNEL_NAME,
        overrides={"display_name": f"Python {sys.version_info[0]}.{sys.version_info[1]} (tests)"},
    )
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(data_dir), *([old] if old else [])])
    try:
        yield KERNEL_NAME
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


def _execute(path: Path, kernel: str, env: dict[str, str]) -> nbformat.NotebookNode:
    """Run ``path`` in a fresh kernel with ``env`` added to the environment; return the result."""
    nb = nbformat.read(path, as_version=4)
    started: list[bool] = []
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=kernel,
        resources={"metadata": {"path": str(path.parent)}},
        on_notebook_start=lambda **_: started.append(True),  # called once the kernel is ready
    )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel process inherits the environment
    try:
        client.execute()
    except Exception as exc:
        if started:
            raise  # the kernel ran: a cell failed, timed out or killed it
        pytest.skip(f"no Jupyter kernel could be started for {sys.executable}: {exc!r}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _stream_text(nb: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream"
    )


def test_expected_notebooks_exist() -> None:
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name}: cell {i} has outputs (strip them)"
        assert cell.get("execution_count") is None, f"{path.name}: cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, kernel_name: str) -> None:
    nb = _execute(path, kernel_name, {"MTL_NOTEBOOK_SMALL": "1", "MPLBACKEND": "Agg"})
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors, errors


def test_census_notebook_skips_without_data(kernel_name: str, tmp_path: Path) -> None:
    """Without the Census-Income file the notebook prints a note and runs to the end."""
    path = NOTEBOOK_DIR / "01_conflict_diagnostics_census.ipynb"
    env = {
        "MTL_NOTEBOOK_SMALL": "1",
        "MPLBACKEND": "Agg",
        "MTL_CENSUS_DIR": str(tmp_path / "no-census-here"),
    }
    nb = _execute(path, kernel_name, env)
    assert "Census-Income data not found" in _stream_text(nb)
