"""Leave-one-cluster-out re-splits (notebook 02).

Re-split ``i`` validates on cluster ``i`` and trains on every other cluster, so each
validation set is a domain the model has not seen (docs/method.md). Images derived from the
same original (one ``group``) always fall on the same side: :func:`dfd_lib.embed.clusters.assign_groups_to_clusters`
gives a whole group its majority cluster and :func:`dfd_lib.data.resplit_table.check_no_group_leakage`
proves it. The table's format (``resplit_<i>`` columns, saving, loading, attaching notebook 03's
images) is :mod:`dfd_lib.data.resplit_table`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from dfd_lib.data.manifest import TRAIN, VAL
from dfd_lib.data.resplit_table import check_no_group_leakage, resplit_column, resplit_columns
from dfd_lib.embed.clusters import (
    assign_groups_to_clusters,
    cluster_embeddings,
    merge_single_class_clusters,
    single_class_clusters,
)


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
        out[resplit_column(i)] = side.where(clusters.notna(), None)
    return out


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
