"""The re-split table: the format notebook 02 writes and notebooks 03 and 04 read, and the rule that
keeps it honest.

A re-split table is a manifest with a ``cluster`` column and one ``resplit_<i>`` column per re-split,
holding ``train`` or ``val`` (empty for rows in no re-split, such as the test split). Images derived
from the same original (one ``group``) always fall on the same side: :func:`check_no_group_leakage`
proves it, and images made in notebook 03 inherit their source's side of every re-split
(:func:`attach_to_resplits`). Building the re-splits from clusters is notebook 02's work
(:mod:`dfd_lib.embed.resplits`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from dfd_lib.core.atomic import atomic_write
from dfd_lib.data.manifest import COLUMNS, TRAIN, VAL

RESPLIT_PREFIX = "resplit_"
log = logging.getLogger(__name__)


class LeakageError(ValueError):
    """A re-split that puts images of one group (or identical files) on both sides."""


def resplit_column(index: int) -> str:
    """The column of re-split ``index``: ``resplit_<index>``."""
    return f"{RESPLIT_PREFIX}{int(index)}"


def resplit_index(column: str) -> int | None:
    """The index of a ``resplit_<i>`` column, or None for any other column."""
    text = str(column)
    rest = text[len(RESPLIT_PREFIX):]
    return int(rest) if text.startswith(RESPLIT_PREFIX) and rest.isdigit() else None


def resplit_columns(table: pd.DataFrame) -> list[str]:
    """The ``resplit_<i>`` columns of ``table``, in index order."""
    return sorted((c for c in table.columns if resplit_index(c) is not None), key=resplit_index)


def resplit_indices(table: pd.DataFrame) -> list[int]:
    """The indices of ``table``'s re-splits, in order."""
    return [resplit_index(c) for c in resplit_columns(table)]


def check_no_group_leakage(table: pd.DataFrame, resplits: pd.DataFrame | None = None) -> None:
    """Raise :class:`LeakageError` if a re-split puts one group, or one file content (``hash``),
    on both its train and val sides."""
    resplits = table if resplits is None else resplits
    columns = resplit_columns(resplits)
    if not columns:
        raise ValueError("no resplit_<i> columns to check")
    problems = []
    for column in columns:
        side = resplits[column].reindex(table.index)
        for key in ("group", "hash"):
            if key not in table.columns:
                continue
            frame = pd.DataFrame({key: table[key], "side": side}).dropna()
            sides = frame.groupby(key)["side"].nunique()
            leaking = sides[sides > 1].index.tolist()
            if leaking:
                shown = ", ".join(map(str, leaking[:10])) + (" ..." if len(leaking) > 10 else "")
                problems.append(f"{column}: {len(leaking)} {key}(s) on both sides: {shown}")
    if problems:
        raise LeakageError("re-split leakage - " + "; ".join(problems))


def save_resplits(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the re-split table (manifest columns, ``cluster``, ``resplit_<i>``) as CSV, atomically."""
    columns = resplit_columns(table)
    if not columns or "cluster" not in table.columns:
        raise ValueError("the table has no 'cluster' or resplit_<i> columns; run leave_one_cluster_out first")
    check_no_group_leakage(table)
    return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def load_resplits(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`save_resplits`, checking its columns and values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"re-split file not found: {path}")
    table = pd.read_csv(path, dtype={"group": str, "hash": str})
    missing = [c for c in ("path", "label", "group", "cluster") if c not in table.columns]
    columns = resplit_columns(table)
    if missing or not columns:
        raise ValueError(f"{path}: not a re-split table (missing {missing or 'resplit_<i> columns'})")
    table["cluster"] = table["cluster"].astype("Int64")
    for column in columns:
        bad = set(table[column].dropna().unique()) - {TRAIN, VAL}
        if bad:
            raise ValueError(f"{path}: column {column} holds {sorted(bad)}; expected 'train' or 'val'")
        table[column] = table[column].astype(object).where(table[column].notna(), None)
    return table


def attach_to_resplits(resplits: pd.DataFrame, augmented: pd.DataFrame) -> pd.DataFrame:
    """``augmented`` with each row's ``cluster`` and every ``resplit_<i>`` taken from its source's
    group in ``resplits`` (the table :func:`save_resplits` writes), so training on
    ``resplit_i == "train"`` of ``pd.concat([resplits, attached])`` keeps every image on its
    source's side. Rows whose group has no cluster there (sources from the test split, or from
    another dataset) are dropped, counted in ``.attrs["dropped"]`` and logged.
    Raises :class:`LeakageError` if the concatenation puts a group on both sides.
    """
    columns = resplit_columns(resplits)
    if not columns or not {"group", "cluster"} <= set(resplits.columns):
        raise ValueError("resplits must be a re-split table (group, cluster, resplit_<i>); see save_resplits")
    if "group" not in augmented.columns:
        raise ValueError("augmented rows need a 'group' column (the group of the image they come from)")
    known = resplits[resplits["cluster"].notna() & resplits["group"].notna()]
    # groups compared as text: a CSV round trip may turn "12" into 12 on one side only
    membership = known[["cluster", *columns]].assign(_group=known["group"].astype(str)).drop_duplicates()
    straddling = membership["_group"][membership["_group"].duplicated()].unique()
    if len(straddling):
        raise LeakageError(f"{len(straddling)} group(s) have several clusters or sides in the re-split table, "
                           f"e.g. {list(straddling[:5])}")
    keys = augmented["group"].astype(str).where(augmented["group"].notna())
    present = keys.isin(membership["_group"])
    dropped = augmented[~present]
    if len(dropped):
        parents = dropped["parent"] if "parent" in dropped.columns else dropped["group"]
        log.warning("attach_to_resplits: dropped %d augmented image(s) whose source group is in no re-split "
                    "(e.g. test-split sources), e.g. from %s", len(dropped), parents.iloc[0])
    kept = augmented[present].drop(columns=["cluster", *resplit_columns(augmented)])
    attached = kept.assign(_group=keys[present]).merge(membership, on="_group", how="left", validate="many_to_one")
    attached = attached.drop(columns="_group")
    ordered = [c for c in COLUMNS if c in attached.columns]
    attached = attached[ordered + [c for c in attached.columns if c not in ordered]].reset_index(drop=True)
    combined = pd.concat([resplits, attached], ignore_index=True)
    combined["group"] = combined["group"].astype(str)
    check_no_group_leakage(combined)
    attached.attrs["dropped"] = int(len(dropped))
    return attached
