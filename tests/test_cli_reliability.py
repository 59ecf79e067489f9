"""The command line neither loses nor corrupts results, and refuses bad input (issue 16, row 12).

- ``--out``: checked before any training (a file, a path under a file, a directory holding
  results without ``--overwrite``); locked while a run writes there (a second run is refused,
  a stale lock from a dead process is taken over); files written atomically.
- ``--set``: unknown keys and non-integers in integer fields are usage errors (exit 2, one
  ``error:`` line, "did you mean"), as are a bad ``--option``, an unknown task, a section
  replaced by a number and ``--threads -1``.
- the CSV task: documented in ``--help`` and docs/experiments.md; missing required options
  are named; bad cells (``inf``, ``1e200``, ``1e999``, ``nan`` labels), undecodable bytes, huge
  fields and corrupted gzip files are errors naming the file (and line and column); a UTF-8
  byte-order mark is accepted.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import experiments.runner
import experiments.toy
from experiments import config as cfgmod
from experiments._output import LOCK_NAME, atomic_save, atomic_write, locked
from experiments.cli import main
from tasks import load_census, load_csv, load_task
from tasks.registry import DataError

sys.path.insert(0, str(Path(__file__).parent))
from _cli import TINY_SYNTHETIC  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY = [*TINY_SYNTHETIC, "--epochs", "1"]

TOY_COMPARE = ["compare", "--task", "toy", "--balancers", "equal", "--steps", "10", "--quiet"]

COMMANDS = {
    "compare": TOY_COMPARE,
    "sweep": ["sweep", "--task", "toy", "--balancer", "gradops", "--param", "alpha=0,1",
              "--steps", "10", "--quiet"],
    "run": ["run", "--task", "toy", "--balancer", "equal", "--steps", "10", "--quiet"],
}  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads() -> Any:
    """The CLI sets torch's thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any data loading or training fails the test: the error must come first."""

    def trained(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("training started before the bad input was reported")

    for name in ("run_compare", "run_sweep", "train_one", "load_splits"):
        monkeypatch.setattr(experiments.runner, name, trained)
    monkeypatch.setattr(experiments.toy, "run_toy", trained)


def _usage_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``error:`` line of a usage error (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ============================================================================ --out
@pytest.mark.parametrize("command", list(COMMANDS))
def test_out_that_is_or_lies_under_a_file_fails_before_training(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    _forbid_training(monkeypatch)
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    for out in (f, f / "sub"):
        assert main([*COMMANDS[command], "--out", str(out)]) == 2
        err = _usage_error(capsys)
        assert str(f) in err and "not a directory" in err
    assert f.read_text() == "keep me"


def test_out_holding_results_is_refused_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"first": "run"}')
    with monkeypatch.context() as m:
        _forbid_training(m)
        assert main([*TOY_COMPARE, "--no-plots", "--out", str(out)]) == 2
    err = _usage_error(capsys)
    assert "already holds the results" in err and "--overwrite" in err
    assert (out / "results.json").read_text() == '{"first": "run"}'
    # --overwrite replaces them, and removes the earlier run's files this one does not write
    (out / "metrics.png").write_bytes(b"from the first run")
    assert main([*TOY_COMPARE, "--no-plots", "--overwrite", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "toy" and res["runs"]
    assert not (out / "metrics.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]  # no lock


_HOLDER = """
import sys, time
from pathlib import Path
from experiments._output import locked
with locked(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_concurrent_run_is_refused_and_a_dead_runs_lock_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        assert lock.read_text().split()[0] == str(holder.pid)
        with monkeypatch.context() as m:
            _forbid_training(m)
            # even --overwrite does not let a second run into a directory in use
            assert main([*TOY_COMPARE, "--no-plots", "--overwrite", "--out", str(out)]) == 2
        err = _usage_error(capsys)
        assert "in use" in err and str(holder.pid) in err
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # the killed holder could not remove it: a stale lock
    assert main([*TOY_COMPARE, "--no-plots", "--out", str(out)]) == 0
    assert (out / "results.json").exists() and not lock.exists()


def test_same_process_lock_and_report_respect_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    assert main([*TOY_COMPARE, "--no-plots", "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    with locked(out):
        assert main(["report", str(out)]) == 2
        assert "in use" in _usage_error(capsys)
        with monkeypatch.context() as m:
            _forbid_training(m)
            assert main([*TOY_COMPARE, "--overwrite", "--out", str(out)]) == 2
            assert "in use" in _usage_error(capsys)
    assert not (out / LOCK_NAME).exists()
    assert main(["report", str(out)]) == 0
    assert (out / "results.md").read_text() == md


def test_results_are_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main([*TOY_COMPARE, "--no-plots", "--out", str(out)]) == 0
    before = (out / "results.json").read_text()
    import experiments.cli as cli

    # the next run fails half-way through serializing its results
    monkeypatch.setattr(cli, "_jsonable", lambda obj: {"runs": [1, 2], "bad": object()})
    with pytest.raises(TypeError):
        main([*TOY_COMPARE, "--no-plots", "--overwrite", "--out", str(out)])
    assert (out / "results.json").read_text() == before  # whole, and the first run's
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]


def test_atomic_save_keeps_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "fig.png"
    atomic_write(path, "old")

    def half(tmp: Path) -> None:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # same directory and format
        tmp.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save(path, half)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]
    atomic_write(path, "new")
    assert path.read_text() == "new"


# ============================================================================ --set and flags
@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("train.epoch=1", "Did you mean 'train.epochs'?"),
        ("trian.lr=5", "Did you mean 'train'?"),
        ("bogus=1", "Valid keys at the top level: balancers, data"),
        ("data.num_sample=100", "Did you mean 'data.num_samples'?"),
        ("model.num_expert=2", "Did you mean 'model.num_experts'?"),
        ("balancers.mgda.normalisation=l2", "Did you mean 'balancers.mgda.normalization'"),
    ],
)
def test_unknown_set_keys_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    item: str,
    expected: str,
) -> None:
    _forbid_training(monkeypatch)
    rc = main(["compare", "--task", "synthetic", "--balancers", "equal", "--quiet", *TINY,
               "--set", item])  # fmt: skip
    assert rc == 2
    err = _usage_error(capsys)
    assert "unknown configuration key" in err and f"--set {item}" in err and expected in err
    assert "Valid keys" in err
    with pytest.raises(cfgmod.ConfigError, match="unknown configuration key"):
        cfgmod.load_config(task="synthetic", overrides=[item])


def test_integer_fields_reject_fractions(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_training(monkeypatch)
    assert main(["run", "--task", "synthetic", "--quiet", "--set", "train.epochs=1.7"]) == 2
    err = _usage_error(capsys)
    assert "'train.epochs' must be an integer, got 1.7" in err and "--set train.epochs=1.7" in err
    for item in ("train.batch_size=12.5", "seeds=2.5", "toy.steps=0.5"):
        with pytest.raises(cfgmod.ConfigError, match="must be an integer"):
            cfgmod.load_config(task="toy" if "toy" in item else "synthetic", overrides=[item])
    cfg = cfgmod.load_config(task="synthetic", overrides=["train.epochs=2.0"])
    assert cfg["train"]["epochs"] == 2 and isinstance(cfg["train"]["epochs"], int)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--task", "synthetic", "--balancer", "mgda", "--option", "normalisation=l2"],
         "Did you mean 'normalization'"),
        (["compare", "--task", "imagenet", "--balancers", "equal"], "unknown task 'imagenet'"),
        (["compare", "--task", "synthtic", "--balancers", "equal"], "Did you mean 'synthetic'"),
        (["run", "--task", "synthetic", "--set", "train=5"], "'train' is a section"),
        (["run", "--task", "synthetic", "--threads", "-1"], "'threads' must be >= 1"),
        (["run", "--task", "synthetic", "--batch-size", "0"], "'train.batch_size' must be >= 1"),
        (["sweep", "--task", "synthetic", "--balancer", "gradops", "--param", "alhpa=0,1"],
         "Did you mean 'alpha'"),
        (["run", "--task", "synthetic", "--seed", "-1"], "--seed must be >= 0"),
        (["run", "--task", "synthetic", "--set", "regularizer.epsilon=0.1"],
         "no regularizer is chosen"),
    ],
)  # fmt: skip
def test_bad_flags_are_usage_errors_not_tracebacks(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    expected: str,
) -> None:
    _forbid_training(monkeypatch)
    assert main([*argv, "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert expected in _usage_error(capsys)
    assert not (tmp_path / "o").exists()


def test_shipped_configs_still_validate() -> None:
    for name in cfgmod.available_configs():
        cfgmod.validate_config(cfgmod.load_config(name))


# ============================================================================ CSV task
def _csv_text(
    n: int = 40, *, x: str | None = None, y: str | None = None, c: str | None = None
) -> str:
    """``x,c,y`` rows; the cells given replace those of data row 4 (line 5)."""
    lines = ["x,c,y"]
    for i in range(n):
        cells = [f"{(i * 7) % 11 - 5:.1f}", "ab"[i % 2], f"{(i * 5) % 9 - 4:.1f}"]
        if i == 3:
            cells = [v if v is not None else d for v, d in zip((x, c, y), cells)]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


_CSV_KW: dict[str, Any] = {"numeric": ["x"], "categorical": ["c"], "tasks": {"t": "y"}}
_CSV_SET = ["--set", 'data.numeric=["x"]', "--set", 'data.categorical=["c"]',
            "--set", "data.tasks.t=y", "--set", "data.tasks.pos=y > 0"]  # fmt: skip


def test_csv_task_is_documented(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["compare", "--help"], ["run", "--help"], ["sweep", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "CSV task (--task csv)" in text
        for key in ("--data-path", "data.numeric", "data.categorical", "data.tasks.NAME"):
            assert key in text, (argv, key)
        assert "invalid_numbers" in text and "docs/experiments.md" in text
    doc = (ROOT / "docs" / "experiments.md").read_text(encoding="utf-8")
    assert "## The CSV task (`--task csv`)" in doc
    for word in ("invalid_numbers", "encoding", "--overwrite", ".experiments.lock"):
        assert word in doc


def test_csv_required_options_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d.csv"
    path.write_text(_csv_text())
    with monkeypatch.context() as m:
        _forbid_training(m)
        assert main(["compare", "--task", "csv", "--balancers", "equal", "--quiet"]) == 2
        err = _usage_error(capsys)
        for key in ("data.path", "data.numeric", "data.categorical", "data.tasks"):
            assert key in err
        assert "--data-path FILE" in err and "TypeError" not in err
        rc = main(["compare", "--task", "csv", "--data-path", str(path), "--balancers", "equal",
                   "--quiet", "--set", 'data.numeric=["x"]'])  # fmt: skip
        assert rc == 2
        err = _usage_error(capsys)
        assert "data.categorical, data.tasks" in err and "data.path" not in err
    with pytest.raises(DataError, match="needs the options numeric, categorical, tasks"):
        load_task("csv", path=path)
    with pytest.raises(DataError, match=r"no option 'numerics'.*did you mean 'numeric'"):
        load_task("csv", path=path, numerics=["x"], categorical=[], tasks={"t": "y"})
    # and with them, the task runs end to end
    out = tmp_path / "out"
    rc = main(["compare", "--task", "csv", "--data-path", str(path), "--balancers", "equal",
               "--seeds", "1", "--epochs", "1", "--batch-size", "8", "--no-plots", "--quiet",
               "--out", str(out), *_CSV_SET])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [t["name"] for t in res["tasks"]] == ["t", "pos"]


@pytest.mark.parametrize("cell", ["inf", "-inf", "1e200", "1e999", "nan", "NaN"])
def test_csv_out_of_range_feature_cell_names_file_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cell: str
) -> None:
    path = tmp_path / "d.csv"
    path.write_text(_csv_text(x=cell))
    with pytest.raises(DataError) as exc:
        load_csv(path, **_CSV_KW)
    msg = str(exc.value)
    assert str(path) in msg and "line 5 (data row 4)" in msg and "column 'x'" in msg
    assert repr(cell) in msg and "invalid_numbers='missing'" in msg
    # the documented option: such cells are imputed like missing ones
    s = load_csv(path, **_CSV_KW, invalid_numbers="missing")
    xs = torch.cat([s.train.x_num, s.valid.x_num, s.test.x_num])  # type: ignore[list-item]
    assert bool(torch.isfinite(xs).all()) and float(xs.std()) > 0.5  # not a column of zeros
    # the command line: exit 2 before any training, with the same message
    rc = main(["compare", "--task", "csv", "--data-path", str(path), "--balancers", "equal",
               "--seeds", "1", "--epochs", "1", "--no-plots", "--quiet", *_CSV_SET,
               "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 2
    err = _usage_error(capsys)
    assert str(path) in err and "column 'x'" in err and "non-finite loss" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("task", "cell"),
    [("y > 0", "nan"), ("y >= 1", "?"), ("y == 1", "nan"), ("y in (1, 2)", "NaN"),
     ("y", "nan"), ("y", "inf"), ("y", "")],
)  # fmt: skip
def test_csv_bad_label_names_file_line_and_column(tmp_path: Path, task: str, cell: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text(_csv_text(y=cell))
    with pytest.raises(DataError) as exc:
        load_csv(path, numeric=["x"], categorical=["c"], tasks={"t": task})
    msg = str(exc.value)
    assert str(path) in msg and "line 5 (data row 4)" in msg and "column 'y'" in msg
    # the missing-value option does not apply to labels
    with pytest.raises(DataError, match="column 'y'"):
        load_csv(path, numeric=["x"], categorical=["c"], tasks={"t": task},
                 invalid_numbers="missing")  # fmt: skip


def test_csv_utf8_bom_is_accepted(tmp_path: Path) -> None:
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    plain.write_text(_csv_text(), encoding="utf-8")
    bom.write_bytes(b"\xef\xbb\xbf" + _csv_text().encode("utf-8"))
    a, b = load_csv(plain, **_CSV_KW), load_csv(bom, **_CSV_KW)
    assert b.schema.numeric == ["x"]
    torch.testing.assert_close(a.train.x_num, b.train.x_num)
    gz = tmp_path / "bom.csv.gz"
    gz.write_bytes(gzip.compress(b"\xef\xbb\xbf" + _csv_text().encode("utf-8")))
    assert load_csv(gz, **_CSV_KW).schema.numeric == ["x"]


def test_csv_latin1_bytes_name_the_line_or_take_an_encoding(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(_csv_text(c="caf\xe9").encode("latin-1"))
    with pytest.raises(DataError) as exc:
        load_csv(path, **_CSV_KW)
    msg = str(exc.value)
    assert str(path) in msg and "line 5" in msg and "encoding='latin-1'" in msg
    s = load_csv(path, **_CSV_KW, encoding="latin-1")
    assert "café" in s.info["categories"]["c"]


def test_csv_huge_field_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(_csv_text(c="z" * (200 * 1024)))
    with pytest.raises(DataError) as exc:
        load_csv(path, **_CSV_KW)
    msg = str(exc.value)
    assert str(path) in msg and "line 5" in msg and "field" in msg


def test_corrupted_gzip_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = gzip.compress(("".join(f"{i}, a, b\n" for i in range(20000))).encode())
    truncated = tmp_path / "census-income.test.gz"
    truncated.write_bytes(data[: len(data) // 2])
    crc = tmp_path / "crc" / "census-income.test.gz"
    crc.parent.mkdir()
    crc.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:])
    for bad in (truncated, crc):
        with pytest.raises(DataError) as exc:
            load_census(path=bad)
        assert str(bad) in str(exc.value) and "corrupted" in str(exc.value)
    csv_gz = tmp_path / "d.csv.gz"
    full = gzip.compress(_csv_text(4000).encode())
    csv_gz.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="corrupted") as exc2:
        load_csv(csv_gz, **_CSV_KW)
    assert str(csv_gz) in str(exc2.value)
    # the command line: exit 2, naming the file
    rc = main(["compare", "--task", "census", "--data-path", str(truncated), "--balancers",
               "equal", "--seeds", "1", "--no-single-task", "--no-plots", "--quiet",
               "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 2
    assert str(truncated) in _usage_error(capsys)


def test_standardize_never_hides_an_overflow_as_zeros() -> None:
    from tasks._preprocess import standardize

    x = np.array([[1.0], [2.0], [3.0e38], [-3.0e38]])
    with pytest.raises(DataError, match="column 'v'"):
        standardize(x, np.array([0, 1]), ["v"])
    z, mean, std = standardize(np.array([[1.0], [np.nan], [3.0]]), np.arange(3), ["v"])
    assert z[1, 0] == 0.0 and mean[0] == 2.0
