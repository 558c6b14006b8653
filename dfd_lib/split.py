"""Clusters of the embeddings and the leave-one-cluster-out re-splits built from them.

Re-split ``i`` validates on cluster ``i`` and trains on every other cluster, so each
validation set is a domain the model has not seen (DESIGN.md §1). Images derived from the
same original (one ``group``) always fall on the same side: :func:`assign_groups_to_clusters`
gives a whole group its majority cluster and :func:`check_no_group_leakage` proves it.
The re-splits are saved as one CSV (manifest columns, ``cluster``, ``resplit_<i>`` columns of
``train``/``val``) that the training notebook reads.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from dfd_lib.atomic import atomic_write

RESPLIT_PREFIX = "resplit_"
TRAIN, VAL = "train", "val"
MINIBATCH_ABOVE = 20_000  # rows beyond which full k-means is slower than it is worth


class LeakageError(ValueError):
    """A re-split that puts images of one group (or identical files) on both sides."""


def resplit_columns(table: pd.DataFrame) -> list[str]:
    columns = [c for c in table.columns if str(c).startswith(RESPLIT_PREFIX)]
    return sorted(columns, key=lambda c: int(c[len(RESPLIT_PREFIX):]) if c[len(RESPLIT_PREFIX):].isdigit() else c)


def cluster_embeddings(emb: np.ndarray, k: int, seed: int = 0, minibatch_above: int = MINIBATCH_ABOVE) -> np.ndarray:
    """k-means cluster ids (0..k-1) of the rows of ``emb``; MiniBatchKMeans for large inputs."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if not 2 <= k <= len(emb):
        raise ValueError(f"k must be between 2 and the number of rows ({len(emb)}), got {k}")
    x = np.asarray(emb, dtype=np.float32)
    if len(x) > minibatch_above:
        model = MiniBatchKMeans(k, random_state=seed, n_init=3, batch_size=4096)
    else:
        model = KMeans(k, random_state=seed, n_init="auto")
    return model.fit_predict(x).astype(np.int64)


def silhouette_sweep(emb: np.ndarray, ks=range(2, 11), sample_size: int | None = 5000, seed: int = 0) -> pd.DataFrame:
    """Silhouette score (on a sample of rows) and inertia for each k, to help choose K."""
    from sklearn.metrics import silhouette_score

    x = np.asarray(emb, dtype=np.float32)
    rows = []
    for k in ks:
        labels = cluster_embeddings(x, int(k), seed)
        size = None if sample_size is None or sample_size >= len(x) else sample_size
        score = silhouette_score(x, labels, sample_size=size, random_state=seed)
        centroids = np.stack([x[labels == c].mean(0) for c in range(int(k))])
        inertia = float(((x - centroids[labels]) ** 2).sum())
        rows.append({"k": int(k), "silhouette": float(score), "inertia": inertia})
    return pd.DataFrame(rows)


def assign_groups_to_clusters(table: pd.DataFrame, clusters: np.ndarray) -> pd.DataFrame:
    """A copy of ``table`` with ``cluster`` set: every row of a group gets the group's majority
    cluster (ties to the smaller id), so no group straddles two clusters."""
    if len(clusters) != len(table):
        raise ValueError(f"{len(clusters)} cluster ids for {len(table)} rows")
    if "group" not in table.columns or table["group"].isna().any():
        raise ValueError("every row needs a 'group' (id of the original image it derives from)")
    votes = pd.DataFrame({"group": table["group"].to_numpy(), "cluster": np.asarray(clusters, dtype=np.int64)})
    counts = votes.value_counts().reset_index(name="n").sort_values(["group", "n", "cluster"], ascending=[True, False, True])
    majority = counts.drop_duplicates("group").set_index("group")["cluster"]
    out = table.copy()
    out["cluster"] = votes["group"].map(majority).to_numpy()
    return out


def _relabel(clusters: pd.Series) -> pd.Series:
    """Cluster ids renumbered 0..K-1 in order of their old ids."""
    order = {old: new for new, old in enumerate(sorted(clusters.dropna().unique()))}
    return clusters.map(order).astype("Int64")


def leave_one_cluster_out(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` with one ``resplit_<i>`` column per cluster: ``val`` for rows of
    cluster ``i``, ``train`` for the rest (empty where a row has no cluster, e.g. the test set)."""
    if "cluster" not in table.columns or table["cluster"].isna().all():
        raise ValueError("the table has no clusters; run assign_groups_to_clusters first")
    clusters = table["cluster"]
    ids = sorted(clusters.dropna().unique())
    if len(ids) < 2:
        raise ValueError(f"leave-one-cluster-out needs at least 2 clusters, found {len(ids)}")
    out = table.drop(columns=resplit_columns(table))
    for i, cluster in enumerate(ids):
        side = pd.Series(np.where(clusters.eq(cluster).fillna(False).to_numpy(bool), VAL, TRAIN),
                         index=table.index, dtype=object)
        out[f"{RESPLIT_PREFIX}{i}"] = side.where(clusters.notna(), None)
    return out


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


def cluster_label_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images per cluster: reals, fakes, total and the fake share."""
    counts = pd.crosstab(table["cluster"], table["label"].map({0: "real", 1: "fake"}))
    counts = counts.reindex(columns=["real", "fake"], fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts["fake_share"] = (counts["fake"] / counts["total"]).round(3)
    return counts


def single_class_clusters(table: pd.DataFrame, warn: bool = True) -> list[int]:
    """Clusters with no reals or no fakes (a validation set of one class has no AUC)."""
    counts = cluster_label_counts(table)
    single = counts.index[(counts["real"] == 0) | (counts["fake"] == 0)].tolist()
    if single and warn:
        details = ", ".join(f"{c} ({counts.at[c, 'real']} real / {counts.at[c, 'fake']} fake)" for c in single)
        warnings.warn(f"clusters with a single class (no AUC on their re-split): {details}; "
                      "merge them with merge_single_class_clusters", stacklevel=2)
    return [int(c) for c in single]


def merge_single_class_clusters(table: pd.DataFrame, emb: np.ndarray) -> pd.DataFrame:
    """A copy of ``table`` where each single-class cluster is merged into the cluster with the
    nearest centroid (repeated until every cluster holds both classes), ids renumbered 0..K-1.
    The merges made are listed in ``.attrs["cluster_merges"]`` as ``(merged, into)`` pairs."""
    if len(emb) != len(table):
        raise ValueError(f"{len(emb)} embeddings for {len(table)} rows")
    if table["label"].nunique() < 2:
        raise ValueError("the table holds a single class: no cluster can hold both")
    out = table.copy()
    x = np.asarray(emb, dtype=np.float32)
    merges: list[tuple[int, int]] = []
    while single := single_class_clusters(out, warn=False):
        clusters = out["cluster"].to_numpy()
        ids = sorted(pd.unique(clusters[pd.notna(clusters)]))
        centroids = {c: x[clusters == c].mean(0) for c in ids}
        smallest = min(single, key=lambda c: (int((clusters == c).sum()), c))
        others = [c for c in ids if c != smallest]
        target = min(others, key=lambda c: float(np.linalg.norm(centroids[c] - centroids[smallest])))
        out.loc[out["cluster"] == smallest, "cluster"] = target
        merges.append((int(smallest), int(target)))
    out["cluster"] = _relabel(out["cluster"])
    out.attrs["cluster_merges"] = merges
    if out["cluster"].nunique() < 2:
        warnings.warn("after merging, a single cluster remains: there is no re-split to build", stacklevel=2)
    return out


def official_split(table: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """A copy of ``table`` with a random train/val ``split`` by group, stratified by the labels
    a group holds (for datasets that come without one). Rows already in ``test`` stay there."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    out = table.copy()
    is_test = out["split"].eq("test") if "split" in out.columns else pd.Series(False, index=out.index)
    pool = out[~is_test.fillna(False).astype(bool)]
    strata = pool.groupby("group")["label"].agg(lambda s: "+".join(map(str, sorted(s.unique()))))
    rng = np.random.default_rng(seed)
    val_groups: set = set()
    for _, groups in strata.groupby(strata):
        names = groups.index.to_numpy()[rng.permutation(len(groups))]
        val_groups.update(names[: int(round(val_fraction * len(names)))])
    out.loc[pool.index, "split"] = np.where(pool["group"].isin(val_groups), VAL, TRAIN)
    return out


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


def best_k(sweep: pd.DataFrame) -> int:
    """The K with the highest silhouette score in a :func:`silhouette_sweep` table."""
    if sweep.empty:
        raise ValueError("the silhouette sweep is empty")
    return int(sweep.loc[sweep["silhouette"].idxmax(), "k"])


def build_resplits(table: pd.DataFrame, emb: np.ndarray, k: int, seed: int = 0,
                   merge_single_class: bool = True) -> pd.DataFrame:
    """Cluster ``emb`` into ``k`` clusters, move every group to its majority cluster, merge
    single-class clusters if asked (else warn), and add the leave-one-cluster-out
    ``resplit_<i>`` columns; the result passes :func:`check_no_group_leakage`."""
    clustered = assign_groups_to_clusters(table, cluster_embeddings(emb, k, seed=seed))
    if merge_single_class:
        clustered = merge_single_class_clusters(clustered, emb)
    else:
        single_class_clusters(clustered, warn=True)
    resplits = leave_one_cluster_out(clustered)
    resplits.attrs = dict(clustered.attrs)
    check_no_group_leakage(resplits)
    return resplits
