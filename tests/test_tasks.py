"""Tests of the task package: dataset abstraction, synthetic, Census-Income, toy, CSV, registry."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tasks
from mtl.models import Features, ModelOutput
from tasks import (
    TOY_SCALES,
    TOY_STARTS,
    DataSplits,
    FeatureSchema,
    TabularDataset,
    TaskSpec,
    ToyModel,
    load_census,
    load_csv,
    load_task,
    make_synthetic,
    pareto_front,
    stratified_split,
    toy_losses,
)
from tasks.census import CENSUS_COLUMNS, EDUCATION_POSITIVE, default_census_dir
from tasks.tabular_csv import TaskExpression, parse_task_expression
from tasks.toy import LOWER

# ======================================================================= dataset abstraction


def _tiny_dataset(n: int = 23, k: int = 2) -> TabularDataset:
    x_num = torch.stack([torch.arange(n, dtype=torch.float32), torch.randn(n)], dim=1)
    x_cat = torch.stack([torch.arange(n) % 3, torch.arange(n) % 5], dim=1)
    y = torch.stack([(torch.arange(n) % 2).float()] + [torch.randn(n) for _ in range(k - 1)], 1)
    schema = FeatureSchema(["row", "noise"], ["c3", "c5"], [3, 5])
    specs = [TaskSpec("a", "binary")] + [TaskSpec(f"r{j}", "regression") for j in range(k - 1)]
    return TabularDataset(x_num, x_cat, y, schema, specs)


def test_taskspec_and_schema_validation() -> None:
    assert TaskSpec("ctr", "binary").kind == "binary"
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("ctr", "classification")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        TaskSpec("", "binary")
    schema = FeatureSchema(["a", "b"], ["c"], [4])
    assert schema.num_numeric == 2 and schema.num_categorical == 1
    with pytest.raises(ValueError, match="cardinalities"):
        FeatureSchema(["a"], ["c", "d"], [3])
    with pytest.raises(ValueError, match="duplicate"):
        FeatureSchema(["a"], ["a"], [3])


def test_dataset_accessors_and_subset() -> None:
    ds = _tiny_dataset()
    assert len(ds) == 23 and ds.num_tasks == 2 and ds.task_names == ["a", "r0"]
    f = ds.features
    assert isinstance(f, Features) and f.numeric is not None and f.categorical is not None
    assert f.numeric.dtype == torch.float32 and f.categorical.dtype == torch.int64
    t = ds.targets
    assert len(t) == 2 and t[0].shape == (23,) and torch.equal(t[1], ds.y[:, 1])
    sub = ds.subset([3, 1, 4])
    assert sub.x_num is not None and sub.x_num[:, 0].tolist() == [3.0, 1.0, 4.0]
    mask = torch.zeros(23, dtype=torch.bool)
    mask[[2, 5]] = True
    assert ds.subset(mask).x_num[:, 0].tolist() == [2.0, 5.0]  # type: ignore[index]
    assert len(ds.subset(slice(0, 10))) == 10
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0
    with pytest.raises(IndexError):
        ds.subset([23])


def test_dataset_validation_errors() -> None:
    n = 6
    schema = FeatureSchema(["a"], ["c"], [3])
    xn, xc = torch.zeros(n, 1), torch.zeros(n, 1, dtype=torch.long)
    y = torch.zeros(n, 2)
    specs = [TaskSpec("t0", "binary"), TaskSpec("t1", "regression")]
    TabularDataset(xn, xc, y, schema, specs)
    with pytest.raises(ValueError, match="3 tasks"):
        TabularDataset(xn, xc, y, schema, specs + [TaskSpec("t2", "binary")])
    with pytest.raises(ValueError, match="x_num must have shape"):
        TabularDataset(torch.zeros(n, 2), xc, y, schema, specs)
    with pytest.raises(ValueError, match="x_cat must have shape"):
        TabularDataset(xn, torch.zeros(n + 1, 1, dtype=torch.long), y, schema, specs)
    with pytest.raises(ValueError, match="outside"):
        TabularDataset(xn, torch.full((n, 1), 3), y, schema, specs)
    with pytest.raises(ValueError, match="outside"):
        TabularDataset(xn, xc, torch.full((n, 2), 0.5), schema, specs)
    with pytest.raises(ValueError, match="both are None"):
        TabularDataset(None, None, y, FeatureSchema(), specs)
    with pytest.raises(ValueError, match="integer ids"):
        TabularDataset(xn, torch.zeros(n, 1), y, schema, specs)
    with pytest.raises(ValueError, match="duplicate task"):
        TabularDataset(xn, xc, y, schema, [TaskSpec("t", "binary"), TaskSpec("t", "binary")])
    with pytest.raises(ValueError, match="non-finite"):
        TabularDataset(xn, xc, torch.full((n, 2), float("nan")), schema, specs)
    one = TabularDataset(xn, xc, torch.zeros(n), schema, [TaskSpec("t", "binary")])
    assert one.y.shape == (n, 1)


def test_batches_cover_every_row_once_and_shuffle_is_seeded() -> None:
    ds = _tiny_dataset(n=103)
    seen = []
    for feats, ys in ds.batches(10, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert isinstance(feats, Features)
        assert len(ys) == 2 and all(y.shape == (feats.batch_size,) for y in ys)
        assert all(y.dtype == torch.float32 and y.is_contiguous() for y in ys)
        rows = feats.numeric[:, 0].long()  # type: ignore[index]
        assert torch.equal(feats.categorical[:, 0], rows % 3)  # type: ignore[index]
        assert torch.equal(ys[0], ds.y[rows, 0]) and torch.equal(ys[1], ds.y[rows, 1])
        seen.append(rows)
    allrows = torch.cat(seen)
    assert sorted(allrows.tolist()) == list(range(103))
    assert allrows.tolist() != list(range(103))

    def order(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.cat(
            [f.numeric[:, 0] for f, _ in ds.batches(16, shuffle=True, generator=g)]
        ).tolist()  # type: ignore[index]

    assert order(1) == order(1) and order(1) != order(2)
    plain = [f.numeric[:, 0] for f, _ in ds.batches(25)]  # type: ignore[index]
    assert [len(b) for b in plain] == [25, 25, 25, 25, 3]
    assert torch.cat(plain).tolist() == list(range(103))
    assert [f.batch_size for f, _ in ds.batches(25, drop_last=True)] == [25] * 4
    assert ds.num_batches(25) == 5 and ds.num_batches(25, drop_last=True) == 4
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.batches(0))


def test_stratified_split_sizes_and_strata() -> None:
    rng = np.random.default_rng(0)
    labels = np.stack([rng.random(1001) < 0.07, rng.random(1001) < 0.4], 1).astype(np.float32)
    tr, va, te = stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    assert (len(tr), len(va), len(te)) == (601, 200, 200)
    allidx = np.concatenate([tr, va, te])
    assert sorted(allidx.tolist()) == list(range(1001))
    combos = labels[:, 0] * 2 + labels[:, 1]
    for c in np.unique(combos):
        total = (combos == c).sum()
        for part, f in ((tr, 0.6), (va, 0.2), (te, 0.2)):
            assert abs((combos[part] == c).sum() - f * total) <= 1.5
    again = stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again))
    other = stratified_split(labels, (0.6, 0.2, 0.2), seed=4)
    assert not np.array_equal(tr, other[0])
    a, b = stratified_split(labels[:, 0], (0.9, 0.1), seed=0)
    assert len(a) + len(b) == 1001 and len(b) == 100
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(labels, (0.6, 0.3, 0.3))


def test_datasplits_describe_and_checks() -> None:
    ds = _tiny_dataset(n=40)
    splits = DataSplits(
        ds.subset(slice(0, 20)), ds.subset(slice(20, 30)), ds.subset(slice(30, 40)), "tiny"
    )
    d = splits.describe()
    assert d["sizes"] == {"train": 20, "valid": 10, "test": 10}
    assert d["label_stats"]["train"]["a"] == pytest.approx(0.5)
    assert set(d["label_stats"]["train"]["r0"]) == {"mean", "std"}
    corr = np.array(d["label_correlation"])
    assert corr.shape == (2, 2) and corr[0, 0] == 1.0
    assert splits.schema.num_numeric == 2 and [t.name for t in splits.tasks] == ["a", "r0"]
    assert splits.model_kwargs() == {"num_numeric": 2, "cardinalities": [3, 5], "num_tasks": 2}
    other = _tiny_dataset(n=10, k=3)
    with pytest.raises(ValueError, match="tasks"):
        DataSplits(ds, other, ds, "bad")


# ======================================================================= synthetic


def test_synthetic_shapes_and_determinism() -> None:
    s = make_synthetic(
        num_tasks=3, correlation=0.3, num_samples=500, n_valid=100, n_test=50, dim=20, seed=1
    )
    assert (len(s.train), len(s.valid), len(s.test)) == (500, 100, 50)
    assert s.train.x_num is not None and s.train.x_num.shape == (500, 20)
    assert s.train.x_cat is None and s.train.y.shape == (500, 3)
    assert [t.kind for t in s.tasks] == ["regression"] * 3
    assert s.schema.cardinalities == [] and s.schema.num_numeric == 20
    again = make_synthetic(
        num_tasks=3, correlation=0.3, num_samples=500, n_valid=100, n_test=50, dim=20, seed=1
    )
    assert torch.equal(s.test.y, again.test.y) and torch.equal(s.train.x_num, again.train.x_num)
    other = make_synthetic(
        num_tasks=3, correlation=0.3, num_samples=500, n_valid=100, n_test=50, dim=20, seed=2
    )
    assert not torch.equal(s.train.y, other.train.y)


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 1.0, -0.4])
def test_synthetic_weight_cosine_matches_p(p: float) -> None:
    s = make_synthetic(correlation=p, num_samples=10, n_valid=0, n_test=0, seed=0)
    w = s.info["weights"]
    cos = w[0] @ w[1] / (np.linalg.norm(w[0]) * np.linalg.norm(w[1]))
    assert cos == pytest.approx(p, abs=1e-9)
    assert np.linalg.norm(w, axis=1) == pytest.approx([1.0, 1.0])
    assert s.info["p"] == p and s.info["weight_cosine"][0][1] == pytest.approx(p, abs=1e-9)


def test_synthetic_correlation_matrix_k3() -> None:
    p = np.array([[1.0, 0.8, -0.2], [0.8, 1.0, 0.1], [-0.2, 0.1, 1.0]])
    s = make_synthetic(num_tasks=3, correlation=p, num_samples=10, n_valid=0, n_test=0, scale=2.0)
    w = s.info["weights"]
    cos = (w @ w.T) / np.outer(np.linalg.norm(w, axis=1), np.linalg.norm(w, axis=1))
    np.testing.assert_allclose(cos, p, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 2.0)
    with pytest.raises(ValueError, match="semidefinite"):
        make_synthetic(num_tasks=3, correlation=-0.9)
    with pytest.raises(ValueError, match="shape"):
        make_synthetic(num_tasks=3, correlation=np.eye(2))
    with pytest.raises(ValueError, match="dim"):
        make_synthetic(num_tasks=5, dim=3)


def test_synthetic_label_correlation_increases_with_p() -> None:
    measured = []
    for p in (0.0, 0.5, 0.9, 1.0):
        s = make_synthetic(correlation=p, num_samples=4000, n_valid=0, n_test=0, seed=0)
        measured.append(s.info["measured_label_correlation"])
        assert s.info["measured_label_correlation"] == pytest.approx(
            s.describe()["label_correlation"][0][1]
        )
    assert measured == sorted(measured)
    assert abs(measured[0]) < 0.1 and measured[-1] > 0.95


def test_synthetic_loss_scales_multiply_targets() -> None:
    base = make_synthetic(num_samples=200, n_valid=10, n_test=10, seed=5)
    scaled = make_synthetic(num_samples=200, n_valid=10, n_test=10, seed=5, loss_scales=(10.0, 0.1))
    expected = base.train.y * torch.tensor([10.0, 0.1])
    torch.testing.assert_close(scaled.train.y, expected)
    torch.testing.assert_close(scaled.train.x_num, base.train.x_num)
    with pytest.raises(ValueError, match="loss_scales"):
        make_synthetic(loss_scales=(1.0,))


# ======================================================================= census (fixtures)

_MARITAL = ["Never married", "Married-civilian spouse present", "Divorced", "Widowed"]
_EDUCATION = [
    "Children",
    "High school graduate",
    "Some college but no degree",
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Associates degree-occup /vocational",
    "10th grade",
]
_NUMERIC_IDX = {CENSUS_COLUMNS.index(c) for c in tasks.census.NUMERIC_COLUMNS}


def _census_rows(n: int, seed: int, extra_class: str | None = None) -> list[list[str]]:
    """Synthetic rows in the UCI format (values without the leading space)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = []
        for j, col in enumerate(CENSUS_COLUMNS):
            if col == "age":
                row.append(str(int(rng.integers(0, 90))))
            elif col == "capital_gains":
                row.append(str(int(rng.choice([0, 0, 0, 1500, 99999]))))
            elif j in _NUMERIC_IDX:
                row.append(str(int(rng.integers(0, 50))))
            elif col == "instance_weight":
                row.append(f"{rng.uniform(100, 3000):.2f}")
            elif col == "education":
                row.append(str(rng.choice(_EDUCATION)))
            elif col == "marital_stat":
                row.append(str(rng.choice(_MARITAL)))
            elif col == "income_50k":
                row.append("50000+." if rng.random() < 0.15 else "- 50000.")
            elif col == "class_worker":
                row.append(
                    extra_class
                    if extra_class and i == 0
                    else str(rng.choice(["Private", "Not in universe", "?"]))
                )
            elif col.startswith("mig_"):
                row.append(str(rng.choice(["?", "Nonmover", "MSA to MSA"])))
            else:
                row.append(f"{col}-v{int(rng.integers(0, 4))}")
        rows.append(row)
    return rows


def _write_census(path: Path, rows: list[list[str]], gz: bool) -> Path:
    text = "".join(", ".join(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def _expected_labels(rows: list[list[str]]) -> dict[str, np.ndarray]:
    col = {c: np.array([r[i] for r in rows]) for i, c in enumerate(CENSUS_COLUMNS)}
    return {
        "income": (col["income_50k"] == "50000+.").astype(np.float32),
        "never_married": (col["marital_stat"] == "Never married").astype(np.float32),
        "education": np.isin(col["education"], list(EDUCATION_POSITIVE)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def census_rows() -> list[list[str]]:
    return _census_rows(400, seed=0)


@pytest.fixture()
def census_dir(tmp_path: Path, census_rows: list[list[str]]) -> Path:
    _write_census(tmp_path / "census-income.test.gz", census_rows, gz=True)
    return tmp_path


def _all(splits: DataSplits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = (splits.train, splits.valid, splits.test)
    return (
        torch.cat([p.x_num for p in parts]),  # type: ignore[misc]
        torch.cat([p.x_cat for p in parts]),  # type: ignore[misc]
        torch.cat([p.y for p in parts]),
    )


def test_census_fixture_is_in_the_real_format(census_dir: Path) -> None:
    with gzip.open(census_dir / "census-income.test.gz", "rt") as f:
        line = f.readline()
    assert len(line.rstrip("\n").split(", ")) == 42 and line.rstrip().endswith(".")


@pytest.mark.parametrize("group", [1, 2, 3, "3task"])
def test_census_groups_tasks_and_dropped_columns(census_dir: Path, census_rows, group) -> None:
    s = load_census(group, path=census_dir, seed=0)
    expected_tasks = {
        1: ["income", "never_married"],
        2: ["education", "never_married"],
        3: ["income", "never_married", "education"],
        "3task": ["income", "never_married", "education"],
    }[group]
    assert s.task_names == expected_tasks and all(t.kind == "binary" for t in s.tasks)
    inputs = set(s.schema.numeric) | set(s.schema.categorical)
    for dropped in ("instance_weight", "income_50k", "marital_stat"):
        assert dropped not in inputs
    has_edu = "education" in expected_tasks
    assert ("education" in inputs) is not has_edu and ("hs_college" in inputs) is not has_edu
    assert s.schema.numeric == list(tasks.census.NUMERIC_COLUMNS)
    assert len(inputs) == 42 - 3 - (2 if has_edu else 0)
    assert (len(s.train), len(s.valid), len(s.test)) == (240, 80, 80)
    # labels: the multiset of label rows equals the file's
    exp = np.stack([_expected_labels(census_rows)[t] for t in expected_tasks], 1)
    _, _, y = _all(s)
    assert sorted(map(tuple, y.numpy().tolist())) == sorted(map(tuple, exp.tolist()))
    assert s.info["protocol"] == "resplit" and s.info["num_rows"] == 400


def test_census_stratification_and_standardization(census_dir: Path) -> None:
    s = load_census(3, path=census_dir, seed=1)
    _, _, y = _all(s)
    overall = y.mean(0)
    for part in (s.train, s.valid, s.test):
        assert torch.all((part.y.mean(0) - overall).abs() <= 2.0 / len(part) + 1e-6)
    xn = s.train.x_num
    assert xn is not None
    torch.testing.assert_close(xn.mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(xn.std(0, unbiased=False), torch.ones(7), atol=1e-4, rtol=0)
    assert s.info["log_columns"] == [
        "wage_per_hour",
        "capital_gains",
        "capital_losses",
        "stock_dividends",
    ]
    # capital_gains takes 3 distinct values: log1p spacing, not linear spacing
    j = s.schema.numeric.index("capital_gains")
    vals = torch.unique(torch.cat([p.x_num[:, j] for p in (s.train, s.valid, s.test)]))  # type: ignore[index]
    raw = np.log1p(np.array([0.0, 1500.0, 99999.0]))
    expected_gaps = np.diff(raw) / np.diff(raw).sum()
    np.testing.assert_allclose(
        np.diff(vals.numpy()) / float(vals[-1] - vals[0]), expected_gaps, rtol=1e-4
    )
    assert not torch.equal(s.train.y, load_census(3, path=census_dir, seed=2).train.y)


def test_census_categories_missing_and_cardinalities(census_dir: Path) -> None:
    s = load_census(2, path=census_dir, seed=0)
    _, xc, _ = _all(s)
    for j, (name, card) in enumerate(zip(s.schema.categorical, s.schema.cardinalities)):
        assert int(xc[:, j].max()) < card
        assert card == len(s.info["categories"][name]) + 1
    j = s.schema.categorical.index("class_worker")
    assert s.info["categories"]["class_worker"] == [
        "Not in universe",
        "Private",
    ]  # '?' is not a category
    assert s.schema.cardinalities[j] == 3
    assert (xc[:, j] == 0).any()  # the '?' rows
    mig = s.schema.categorical.index("mig_same")
    assert s.info["categories"]["mig_same"] == ["MSA to MSA", "Nonmover"]
    assert 0 < (xc[:, mig] == 0).float().mean() < 1


def test_census_plain_and_gzip_identical(tmp_path: Path, census_rows) -> None:
    gz = _write_census(tmp_path / "a.gz", census_rows, gz=True)
    plain = _write_census(tmp_path / "census-income.test", census_rows, gz=False)
    a, b = load_census(1, path=gz, seed=0), load_census(1, path=plain, seed=0)
    for x, y in zip(_all(a), _all(b)):
        assert torch.equal(x, y)
    c = load_census(1, path=tmp_path / "census-income.test", seed=0, max_rows=50)
    assert c.info["num_rows"] == 50
    d = load_census(1, path=plain, seed=0, subsample=0.5)
    assert d.info["num_rows"] == 200
    e = load_census(1, path=plain, seed=0, subsample=120)
    assert e.info["num_rows"] == 120


def test_census_block_reading_crlf_and_blank_lines(
    tmp_path: Path, census_rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = load_census(3, path=_write_census(tmp_path / "a.test", census_rows, gz=False), seed=0)
    text = "".join(", ".join(r) + "\r\n" for r in census_rows) + "\r\n\n"
    odd = tmp_path / "b.test"
    odd.write_bytes(text.encode())
    monkeypatch.setattr(tasks.census, "_CHUNK_BYTES", 1000)  # many blocks, lines cut across them
    got = load_census(3, path=odd, seed=0)
    for x, y in zip(_all(ref), _all(got)):
        assert torch.equal(x, y)
    assert load_census(3, path=odd, seed=0, max_rows=77).info["num_rows"] == 77
    bad = tmp_path / "c.test"
    lines = [", ".join(r) for r in census_rows[:30]]
    lines[20] = lines[20].rsplit(", ", 1)[0]
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 21 has 41"):
        load_census(3, path=bad)


def test_census_parsed_file_is_cached(census_dir: Path) -> None:
    tasks.census.clear_cache()
    load_census(1, path=census_dir, seed=0)
    info0 = tasks.census._read_table_cached.cache_info()
    load_census(2, path=census_dir, seed=5)
    info1 = tasks.census._read_table_cached.cache_info()
    assert info1.hits == info0.hits + 1 and info1.misses == info0.misses


def test_census_canonical_protocol_with_train_file(tmp_path: Path, census_rows) -> None:
    train_rows = _census_rows(300, seed=1)
    test_rows = _census_rows(100, seed=2, extra_class="Never seen in train")
    _write_census(tmp_path / "census-income.data.gz", train_rows, gz=True)
    _write_census(tmp_path / "census-income.test", test_rows, gz=False)
    s = load_census(1, path=tmp_path, seed=0)
    assert s.info["protocol"] == "canonical"
    assert (len(s.train), len(s.valid), len(s.test)) == (270, 30, 100)
    exp_test = np.stack([_expected_labels(test_rows)[t] for t in ("income", "never_married")], 1)
    np.testing.assert_array_equal(s.test.y.numpy(), exp_test)  # test file rows, in file order
    j = s.schema.categorical.index("class_worker")
    assert int(s.test.x_cat[0, j]) == 0  # type: ignore[index]  # unseen category -> 0
    assert "Never seen in train" not in s.info["categories"]["class_worker"]
    # the forced re-split of the test file ignores the training file
    r = load_census(1, path=tmp_path, seed=0, protocol="resplit")
    assert r.info["protocol"] == "resplit" and r.info["num_rows"] == 100
    # explicit file + train_path
    t = load_census(
        1, path=tmp_path / "census-income.test", train_path=tmp_path / "census-income.data.gz"
    )
    assert t.info["protocol"] == "canonical" and torch.equal(t.test.y, s.test.y)
    with pytest.raises(FileNotFoundError, match="census-income.data"):
        load_census(1, path=tmp_path / "census-income.test", protocol="canonical")


def test_census_missing_file_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_census(2, path=tmp_path)
    msg = str(err.value)
    assert "census-income.test.gz" in msg and "census-income.data.gz" in msg
    assert "MTL_CENSUS_DIR" in msg and "UCI" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_census(2, path=tmp_path / "nope")
    monkeypatch.setenv("MTL_CENSUS_DIR", str(tmp_path / "also-missing"))
    with pytest.raises(FileNotFoundError, match="MTL_CENSUS_DIR"):
        load_census(2)


def test_census_env_var_and_bad_inputs(census_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTL_CENSUS_DIR", str(census_dir))
    assert load_census(1, seed=0).info["files"]["data"].endswith("census-income.test.gz")
    with pytest.raises(ValueError, match="group"):
        load_census(7)
    with pytest.raises(ValueError, match="task list"):
        load_census(["income", "salary"])
    custom = load_census(["income", "education"], path=census_dir)
    assert "marital_stat" in custom.schema.categorical
    bad = census_dir / "bad.txt"
    bad.write_text("1, 2, 3\n")
    with pytest.raises(ValueError, match="line 1 has 3"):
        load_census(1, path=bad)


def test_census_real_file_rates() -> None:
    real = default_census_dir() / "census-income.test.gz"
    if not real.is_file():
        pytest.skip("shared Census-Income file not available")
    splits = {g: load_census(g, path=real, seed=0) for g in (1, 2, 3)}
    s = splits[3]
    assert s.info["num_rows"] == 99_762
    y = torch.cat([s.train.y, s.valid.y, s.test.y])
    rates = y.mean(0).tolist()
    for got, want in zip(rates, (0.062, 0.432, 0.195)):
        assert abs(got - want) < 0.003
    corr = np.corrcoef(y.numpy().T)
    assert corr[0, 1] == pytest.approx(-0.179, abs=0.003)  # income vs never-married
    assert corr[1, 2] == pytest.approx(-0.238, abs=0.003)  # never-married vs education
    assert (len(s.train), len(s.valid), len(s.test)) == (59_857, 19_953, 19_952)
    assert splits[1].schema.num_categorical == 32 and splits[2].schema.num_categorical == 30


# ======================================================================= toy


def _toy_by_hand(x1: float, x2: float) -> tuple[float, float]:
    f1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), LOWER)) + 6
    f2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), LOWER)) + 6
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c1 = max(math.tanh(0.5 * x2), 0.0)
    c2 = max(math.tanh(-0.5 * x2), 0.0)
    return c1 * f1 + c2 * g1, c1 * f2 + c2 * g2


def test_toy_values_at_known_points() -> None:
    # x2 < 0: only the quadratic part, c2 = tanh(1); g1 = (36 + 3.6)/10 - 20, g2 = (64 + 3.6)/10 - 20
    out = toy_losses(torch.tensor([1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(
        out, math.tanh(1.0) * torch.tensor([-16.04, -13.24], dtype=torch.float64)
    )
    # x2 > 0: only the log part, c1 = tanh(1)
    out = toy_losses(torch.tensor([1.0, 2.0], dtype=torch.float64))
    expected = math.tanh(1.0) * torch.tensor(
        [math.log(4 - math.tanh(2.0)) + 6, math.log(3 - math.tanh(2.0)) + 6], dtype=torch.float64
    )
    torch.testing.assert_close(out, expected)
    assert toy_losses(torch.zeros(2)).tolist() == [0.0, 0.0]
    pts = torch.tensor([[-8.5, 7.5], [3.0, -4.0], [9.0, 9.0]], dtype=torch.float64)
    got = toy_losses(pts, scales=TOY_SCALES)
    for p, row in zip(pts.tolist(), got.tolist()):
        h = _toy_by_hand(*p)
        assert row == pytest.approx([0.1 * h[0], h[1]], rel=1e-12)
    assert toy_losses(torch.zeros(4, 3, 2)).shape == (4, 3, 2)
    with pytest.raises(ValueError, match="shape"):
        toy_losses(torch.zeros(3))


def test_toy_lower_clamp_and_finite_gradients() -> None:
    x1 = -7 + 2 * math.tanh(1.0)  # makes 0.5(-x1 - 7) - tanh(-1) vanish at x2 = 1
    x = torch.tensor([x1, 1.0], dtype=torch.float64, requires_grad=True)
    out = toy_losses(x)
    assert out[0].item() == pytest.approx(math.tanh(0.5) * (math.log(LOWER) + 6))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()  # type: ignore[arg-type]
    pts = torch.cat([torch.tensor(TOY_STARTS), torch.randn(50, 2) * 8]).requires_grad_(True)
    for k in range(2):
        (g,) = torch.autograd.grad(toy_losses(pts, TOY_SCALES)[:, k].sum(), pts)
        assert torch.isfinite(g).all()


def test_toy_starts_scales_and_model() -> None:
    assert TOY_STARTS == ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
    assert TOY_SCALES == (0.1, 1.0)
    model = ToyModel(TOY_STARTS[0], scales=TOY_SCALES)
    out = model()
    assert isinstance(out, ModelOutput) and len(out.task_outputs) == 2
    assert all(t.dim() == 0 for t in out.task_outputs)
    torch.testing.assert_close(
        torch.stack(out.task_outputs), toy_losses(torch.tensor([-8.5, 7.5]), TOY_SCALES)
    )
    assert model.shared_parameters() == [model.x] and list(model.parameters()) == [model.x]
    rep = out.representation
    assert isinstance(rep, torch.Tensor) and rep.shape == (1, 2) and rep.requires_grad
    (h,) = torch.autograd.grad(out.task_outputs[1], rep, retain_graph=True)
    (g,) = torch.autograd.grad(out.task_outputs[1], model.x)
    torch.testing.assert_close(h[0], g)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    start = float(model.losses().detach().sum())
    for _ in range(50):
        opt.zero_grad()
        sum(model().task_outputs).backward()  # type: ignore[union-attr]
        opt.step()
    assert float(model.losses().detach().sum()) < start
    with pytest.raises(ValueError, match="start"):
        ToyModel((1.0, 2.0, 3.0))


def test_toy_pareto_front_is_pareto_stationary() -> None:
    front = pareto_front(15)
    assert front.shape == (15, 2)
    assert front[0, 0] == -7 and front[-1, 0] == 7
    assert front[7, 1] == pytest.approx(-8.3551, abs=2e-4)  # x1 = 0
    assert np.all((front[:, 1] > -8.44) & (front[:, 1] < -8.35))
    x = torch.tensor(front[1:-1], dtype=torch.float64, requires_grad=True)
    (g1,) = torch.autograd.grad(toy_losses(x)[:, 0].sum(), x)
    (g2,) = torch.autograd.grad(toy_losses(x)[:, 1].sum(), x)
    cos = torch.nn.functional.cosine_similarity(g1, g2, dim=1)
    torch.testing.assert_close(cos, -torch.ones_like(cos), atol=1e-7, rtol=0)


def test_toy_with_balanced_optimizer_if_available() -> None:
    balancers = pytest.importorskip("balancers")
    if not hasattr(balancers, "EqualWeight"):
        pytest.skip("balancers.EqualWeight not available yet")
    model = ToyModel((0.0, 0.0))
    opt = balancers.EqualWeight(torch.optim.SGD(model.parameters(), lr=0.1), num_tasks=2)
    out = model()
    opt.zero_grad()
    opt.backward(out.task_outputs, shared_parameters=model.shared_parameters())
    assert model.x.grad is not None and torch.isfinite(model.x.grad).all()


# ======================================================================= CSV


def _write_csv(path: Path, n: int = 120, delimiter: str = ",", gz: bool = False) -> Path:
    rng = np.random.default_rng(0)
    lines = [delimiter.join(["age", "city", "income", "clicks", "watch time", "flag", "city2"])]
    for i in range(n):
        age = "?" if i % 17 == 0 else str(int(rng.integers(18, 80)))
        city = "" if i % 13 == 0 else str(rng.choice(["paris", "rome", "oslo"]))
        income = ">50K" if rng.random() < 0.3 else "<=50K"
        clicks = str(int(rng.poisson(0.7)))
        watch = f"{rng.exponential(3.0):.3f}"
        flag = str(int(rng.random() < 0.5))
        city2 = str(rng.choice(["a", "b", "c"]))
        lines.append(delimiter.join([age, city, income, clicks, watch, flag, city2]))
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


_CSV_TASKS = {
    "rich": "income == '>50K'",
    "clicked": "clicks > 0",
    "ab": "city2 in ('a', 'b')",
    "watch": "`watch time`",
    "flag": "flag",
}


def test_csv_tasks_kinds_and_values(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv")
    s = load_csv(path, numeric=["age"], categorical=["city"], tasks=_CSV_TASKS, seed=0)
    assert s.task_names == list(_CSV_TASKS)
    kinds = {t.name: t.kind for t in s.tasks}
    assert kinds == {
        "rich": "binary",
        "clicked": "binary",
        "ab": "binary",
        "watch": "regression",
        "flag": "binary",
    }
    assert (len(s.train), len(s.valid), len(s.test)) == (72, 24, 24)
    cols = np.genfromtxt(path, delimiter=",", dtype=str, skip_header=1)
    exp = {
        "rich": cols[:, 2] == ">50K",
        "clicked": cols[:, 3].astype(float) > 0,
        "ab": np.isin(cols[:, 6], ["a", "b"]),
        "watch": cols[:, 4].astype(float),
        "flag": cols[:, 5].astype(float),
    }
    y = torch.cat([s.train.y, s.valid.y, s.test.y]).numpy()
    for j, name in enumerate(_CSV_TASKS):
        np.testing.assert_allclose(
            np.sort(y[:, j]), np.sort(exp[name].astype(np.float32)), rtol=1e-6
        )
    # features: '?' age -> 0 after standardization, '' city -> id 0
    assert s.schema.cardinalities == [4] and s.info["categories"]["city"] == [
        "oslo",
        "paris",
        "rome",
    ]
    xn = torch.cat([s.train.x_num, s.valid.x_num, s.test.x_num])  # type: ignore[list-item]
    assert (xn[:, 0] == 0).sum() >= 120 // 17 + 1
    torch.testing.assert_close(s.train.x_num.mean(0), torch.zeros(1), atol=1e-5, rtol=0)  # type: ignore[union-attr]
    override = load_csv(
        path,
        numeric=["age"],
        categorical=[],
        tasks={"flag": "flag"},
        task_kinds={"flag": "regression"},
    )
    assert override.tasks[0].kind == "regression"


def test_csv_callable_gzip_and_delimiter(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.tsv.gz", delimiter=";", gz=True)
    s = load_csv(
        path,
        numeric=["age"],
        categorical=["city", "city2"],
        tasks={
            "many_clicks": lambda c: c["clicks"].astype(float) >= 1,
            "rich": "income != '<=50K'",
        },
        delimiter=";",
        seed=3,
    )
    assert [t.kind for t in s.tasks] == ["binary", "binary"]
    assert s.schema.categorical == ["city", "city2"] and s.name == "d.tsv"


def test_csv_errors(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv")
    kw = {"numeric": ["age"], "categorical": ["city"]}
    with pytest.raises(ValueError, match="'nope' .*not in the header"):
        load_csv(path, tasks={"t": "nope > 1"}, **kw)
    with pytest.raises(ValueError, match="feature columns"):
        load_csv(path, numeric=["age", "height"], categorical=[], tasks={"t": "flag"})
    for bad in (
        "clicks >> 0",
        "income = 'x'",
        "clicks > 'a'",
        "clicks in 'a'",
        "== 3",
        "clicks in ()",
    ):
        with pytest.raises(ValueError, match="expression"):
            load_csv(path, tasks={"t": bad}, **kw)
    with pytest.raises(ValueError, match="single class"):
        load_csv(path, tasks={"t": "clicks > 1000"}, **kw)
    with pytest.raises(ValueError, match="leakage"):
        load_csv(path, tasks={"t": "age > 30"}, **kw)
    with pytest.raises(ValueError, match="non-numeric"):
        load_csv(path, tasks={"t": "income > 3"}, **kw)
    with pytest.raises(ValueError, match="binary"):
        load_csv(path, tasks={"t": "`watch time`"}, task_kinds={"t": "binary"}, **kw)
    with pytest.raises(ValueError, match="non-numeric"):
        load_csv(path, numeric=["city2"], categorical=[], tasks={"t": "flag"})
    with pytest.raises(FileNotFoundError):
        load_csv(tmp_path / "missing.csv", tasks={"t": "flag"}, **kw)
    ragged = tmp_path / "r.csv"
    ragged.write_text("a,b\n1,2\n3\n")
    with pytest.raises(ValueError, match="line 3 has 1 fields"):
        load_csv(ragged, numeric=["a"], categorical=[], tasks={"t": "b"})


def test_parse_task_expression() -> None:
    assert parse_task_expression("x") == TaskExpression("x")
    assert parse_task_expression("my col", ["my col"]) == TaskExpression("my col")
    assert parse_task_expression("clicks >= -1.5e1") == TaskExpression("clicks", ">=", (-15.0,))
    assert parse_task_expression('`a b` == "q\\"r"') == TaskExpression("a b", "==", ('q"r',))
    assert parse_task_expression("c not in ('a', 2,)") == TaskExpression("c", "not in", ("a", 2.0))
    with pytest.raises(ValueError, match="cannot parse"):
        parse_task_expression("c == 'unterminated")


# ======================================================================= registry


def test_registry(census_dir: Path, tmp_path: Path) -> None:
    names = tasks.available_tasks()
    assert {"synthetic", "census", "csv"} <= set(names)
    s = load_task("synthetic", num_samples=50, n_valid=5, n_test=5, dim=8, seed=1)
    assert len(s.train) == 50
    c = load_task("census", group=1, path=census_dir, seed=0)
    assert c.task_names == ["income", "never_married"]
    assert load_task("census3", path=census_dir).num_tasks == 3
    path = _write_csv(tmp_path / "d.csv")
    d = load_task("csv", path=path, numeric=["age"], categorical=["city"], tasks={"f": "flag"})
    assert d.task_names == ["f"]
    with pytest.raises(ValueError, match="unknown task 'imagenet'.*synthetic"):
        load_task("imagenet")
    with pytest.raises(ValueError, match="path"):
        load_task("csv")


def test_splits_feed_the_models_if_available(census_dir: Path) -> None:
    import mtl.models

    build_model = getattr(mtl.models, "build_model", None)
    if build_model is None:
        pytest.skip("mtl.models.build_model not available yet")
    gen = torch.Generator().manual_seed(0)
    for splits in (
        load_census(3, path=census_dir, seed=0),
        make_synthetic(num_samples=64, n_valid=8, n_test=8, dim=10),
    ):
        model = build_model("mmoe", **splits.model_kwargs())
        feats, ys = next(splits.train.batches(32, shuffle=True, generator=gen))
        out = model(feats)
        assert len(out.task_outputs) == splits.num_tasks
        assert all(o.shape == y.shape == (32,) for o, y in zip(out.task_outputs, ys))
