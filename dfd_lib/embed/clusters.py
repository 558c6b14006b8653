"""Clusters of the embeddings without labels (notebook 02): k-means, the silhouette sweep that
picks K, whole groups moved to their majority cluster, and single-class clusters merged away
(a validation cluster of one class has no AUC); :class:`ClusterConfig` holds the step's choices."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dfd_lib.core.config import StepConfig, check_fields, is_int
from dfd_lib.data.manifest import CLASS_NAMES

MINIBATCH_ABOVE = 20_000  # rows beyond which full k-means is slower than it is worth
log = logging.getLogger(__name__)


@dataclass
class ClusterConfig(StepConfig):
    """How notebook 02 and ``dfd cluster`` cluster the train/val embeddings into re-splits."""

    n_clusters: int = 0  # K, or 0 for the K with the best silhouette score in the sweep
    k_min: int = 2  # smallest K in the silhouette sweep
    k_max: int = 10  # largest K in the silhouette sweep
    merge_single_class: bool = True  # merge clusters holding only reals or only fakes into their nearest cluster
    seed: int = 0  # random seed for k-means and the silhouette sample

    def __post_init__(self) -> None:
        check_fields(self, [
            ("n_clusters", is_int(self.n_clusters) and (self.n_clusters == 0 or self.n_clusters >= 2),
             "0 (the sweep's best K) or an int >= 2 (leave-one-cluster-out needs two clusters)"),
            ("k_min", is_int(self.k_min) and self.k_min >= 2, "an int >= 2 (a silhouette needs two clusters)"),
            ("k_max", is_int(self.k_max) and is_int(self.k_min) and self.k_max >= self.k_min, f"an int >= k_min ({self.k_min})"),
            ("merge_single_class", isinstance(self.merge_single_class, bool), "true or false"),
            ("seed", is_int(self.seed) and self.seed >= 0, "an int >= 0"),
        ])

    @property
    def sweep_ks(self) -> range:
        """The K values of the silhouette sweep, ``k_min`` to ``k_max`` inclusive."""
        return range(self.k_min, self.k_max + 1)

    def chosen_k(self, sweep: pd.DataFrame) -> int:
        """``n_clusters`` when given, else the sweep's best K (:func:`best_k`)."""
        return self.n_clusters or best_k(sweep)


def cluster_embeddings(emb: np.ndarray, k: int, seed: int = 0, minibatch_above: int = MINIBATCH_ABOVE) -> np.ndarray:
    """k-means cluster ids (0..k-1) of the rows of ``emb``; MiniBatchKMeans for large inputs."""
    from sklearn.cluster import KMeans, MiniBatchKMeans  # deferred: scikit-learn is slow to import

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
    from sklearn.metrics import silhouette_score  # deferred: scikit-learn is slow to import

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

def best_k(sweep: pd.DataFrame) -> int:
    """The K with the highest silhouette score in a :func:`silhouette_sweep` table."""
    if sweep.empty:
        raise ValueError("the silhouette sweep is empty")
    return int(sweep.loc[sweep["silhouette"].idxmax(), "k"])

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

def cluster_label_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images per cluster: reals, fakes, total and the fake share."""
    counts = pd.crosstab(table["cluster"], table["label"].map(CLASS_NAMES))
    counts = counts.reindex(columns=list(CLASS_NAMES.values()), fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts["fake_share"] = (counts["fake"] / counts["total"]).round(3)
    return counts

def single_class_clusters(table: pd.DataFrame, warn: bool = True) -> list[int]:
    """Clusters with no reals or no fakes (a validation set of one class has no AUC)."""
    counts = cluster_label_counts(table)
    single = counts.index[(counts["real"] == 0) | (counts["fake"] == 0)].tolist()
    if single and warn:
        details = ", ".join(f"{c} ({counts.at[c, 'real']} real / {counts.at[c, 'fake']} fake)" for c in single)
        log.warning("clusters with a single class (no AUC on their re-split): %s; "
                    "merge them with merge_single_class_clusters", details)
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
        log.warning("after merging, a single cluster remains: there is no re-split to build")
    return out
