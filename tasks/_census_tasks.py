"""The Census-Income (KDD) column tables and the task groups defined on them: the 42 UCI fields
(:data:`CENSUS_COLUMNS`), which of them are numeric or log-transformed, the label values, the
five tasks (the column each one reads, the inputs it drops, which one is a regression) and the
task groups with their aliases; plus the functions that turn a ``group`` argument into task
names, read the target columns of a parsed file and list the input columns that remain.
:mod:`tasks.census` re-exports every name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._preprocess import Locate, RawColumn, numeric_values

CENSUS_COLUMNS: tuple[str, ...] = (
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour",
    "hs_college", "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin",
    "sex", "union_member", "unemp_reason", "full_or_part_emp", "capital_gains",
    "capital_losses", "stock_dividends", "tax_filer_stat", "region_prev_res", "state_prev_res",
    "det_hh_fam_stat", "det_hh_summ", "instance_weight", "mig_chg_msa", "mig_chg_reg",
    "mig_move_reg", "mig_same", "mig_prev_sunbelt", "num_emp", "fam_under_18",
    "country_father", "country_mother", "country_self", "citizenship", "own_or_self",
    "vet_question", "vet_benefits", "weeks_worked", "year", "income_50k",
)  # fmt: skip
"""The 42 fields of the UCI files, in file order."""

NUMERIC_COLUMNS: tuple[str, ...] = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp",
    "weeks_worked",
)  # fmt: skip
"""The continuous columns (numeric features); every other input column is categorical."""

LOG_COLUMNS: tuple[str, ...] = (
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "stock_dividends",
)
"""Heavy-tailed money columns transformed with ``sign(x) * log1p(|x|)`` when ``log_money``."""

EDUCATION_POSITIVE: frozenset[str] = frozenset(
    {
        "Associates degree-academic program",
        "Associates degree-occup /vocational",
        "Bachelors degree(BA AB BS)",
        "Masters degree(MA MS MEng MEd MSW MBA)",
        "Prof school degree (MD DDS DVM LLB JD)",
        "Doctorate degree(PhD EdD)",
    }
)
"""``education`` values (stripped, exactly as in the file) counted as "associate degree or higher"."""

INCOME_POSITIVE = "50000+."
INCOME_NEGATIVE = "- 50000."
NEVER_MARRIED = "Never married"

_TASK_DROPS = {
    "income": ("income_50k",),
    "never_married": ("marital_stat",),
    "education": ("education", "hs_college"),
    "weeks_worked": ("weeks_worked", "num_emp"),
    "has_capital_gains": ("capital_gains",),
}
_REGRESSION_TASKS = frozenset({"weeks_worked"})
_ALWAYS_DROPPED = ("instance_weight", "income_50k")

CENSUS_GROUPS: dict[int | str, tuple[str, ...]] = {
    1: ("income", "never_married"),
    2: ("education", "never_married"),
    3: ("income", "never_married", "education"),
    "mixed": ("income", "never_married", "weeks_worked"),
    "mixed_sparse": ("has_capital_gains", "never_married", "weeks_worked"),
}
"""Task groups: 1 and 2 from the MMoE paper, 3 the natural 3-task variant, and the mixed-scale
groups (two binary tasks and a raw-unit regression; ``mixed_sparse`` with a 3.7 % positive task)."""

_GROUP_ALIASES: dict[str, int | str] = {
    "1": 1, "group1": 1, "income-marital": 1, "income_marital": 1,
    "2": 2, "group2": 2, "education-marital": 2, "education_marital": 2,
    "3": 3, "group3": 3, "3task": 3, "3-task": 3, "3tasks": 3,
    "mixed": "mixed", "mixed-sparse": "mixed_sparse", "mixed_sparse": "mixed_sparse",
}  # fmt: skip


def _group_label(g: int | str) -> str:
    return f"group{g}" if isinstance(g, int) else g


def _resolve_group(group: int | str | Sequence[str]) -> tuple[tuple[str, ...], str]:
    if isinstance(group, bool):
        raise ValueError(
            f"group must be 1, 2, 3, 'mixed', 'mixed_sparse' or a sequence of task names, "
            f"got {group!r}"
        )
    if isinstance(group, int):
        if group not in CENSUS_GROUPS:
            raise ValueError(
                f"unknown Census-Income group {group!r}; choose 1, 2, 3, 'mixed' or 'mixed_sparse'"
            )
        return CENSUS_GROUPS[group], f"group{group}"
    if isinstance(group, str):
        key = group.strip().lower()
        if key not in _GROUP_ALIASES:
            raise ValueError(
                f"unknown Census-Income group {group!r}; choose 1, 2, 3, 'mixed', 'mixed_sparse' "
                f"(or one of {sorted(_GROUP_ALIASES)}) or a sequence of task names from "
                f"{sorted(_TASK_DROPS)}"
            )
        g = _GROUP_ALIASES[key]
        return CENSUS_GROUPS[g], _group_label(g)
    names = tuple(str(t) for t in group)
    unknown = [t for t in names if t not in _TASK_DROPS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            f"invalid Census-Income task list {list(names)}: use distinct names from "
            f"{sorted(_TASK_DROPS)}"
        )
    for g, tasks in CENSUS_GROUPS.items():
        if tasks == names:
            return names, _group_label(g)
    return names, "+".join(names)


def _label(table: dict[str, RawColumn], task: str, locate: Locate | None) -> np.ndarray:
    """One target column: 0/1 for the binary tasks, raw units for ``weeks_worked``."""
    if task == "income":
        return table["income_50k"].mask([INCOME_POSITIVE])
    if task == "never_married":
        return table["marital_stat"].mask([NEVER_MARRIED])
    if task == "education":
        return table["education"].mask(EDUCATION_POSITIVE)
    if task == "has_capital_gains":
        return numeric_values(table["capital_gains"], "capital_gains", locate=locate) > 0
    return numeric_values(table[task], task, locate=locate)


def _labels(
    table: dict[str, RawColumn], tasks: Sequence[str], locate: Locate | None = None
) -> np.ndarray:
    cols = [np.asarray(_label(table, t, locate), dtype=np.float64) for t in tasks]
    return np.stack(cols, axis=1).astype(np.float32)


def _strata(y: np.ndarray, tasks: Sequence[str]) -> np.ndarray:
    """The binary label columns, which the stratified split keeps balanced."""
    keep = [j for j, t in enumerate(tasks) if t not in _REGRESSION_TASKS]
    return y[:, keep]


def _input_columns(
    task_names: Sequence[str], drop_columns: Sequence[str]
) -> tuple[list[str], list[str], list[str]]:
    """``(dropped, numeric, categorical)`` column lists."""
    dropped = list(_ALWAYS_DROPPED)
    for t in task_names:
        dropped += [c for c in _TASK_DROPS[t] if c not in dropped]
    dropped += [c for c in drop_columns if c not in dropped]
    inputs = [c for c in CENSUS_COLUMNS if c not in dropped]
    num_cols = [c for c in inputs if c in NUMERIC_COLUMNS]
    cat_cols = [c for c in inputs if c not in NUMERIC_COLUMNS]
    return dropped, num_cols, cat_cols
