"""Clustering, leave-one-cluster-out re-splits, leakage checks and merges on made-up data."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dfd_lib.data.resplit_table import (
    LeakageError,
    check_no_group_leakage,
    load_resplits,
    resplit_column,
    resplit_index,
    resplit_indices,
    save_resplits,
)
from dfd_lib.embed.clusters import (
    assign_groups_to_clusters,
    cluster_embeddings,
    cluster_label_counts,
    merge_single_class_clusters,
    silhouette_sweep,
    single_class_clusters,
)
from dfd_lib.embed.resplits import leave_one_cluster_out
from dfd_lib.sources.run_dataset import official_split


def _blobs(n_per: int = 60, centres: int = 4, seed: int = 0):
    """Separated blobs; every group is an original plus one derived image in the same blob;
    blob 3 holds fakes only."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(centres, 8)) * 10
    blob = np.repeat(np.arange(centres), n_per)
    emb = (centre[blob] + rng.normal(size=(len(blob), 8))).astype(np.float32)
    label = np.where(blob == centres - 1, 1, np.tile([0, 1], len(blob) // 2))
    table = pd.DataFrame({
        "path": [f"/data/{i}.png" for i in range(len(blob))], "label": label,
        "family": np.where(label == 1, "splice", "real"), "group": [f"g{i // 2}" for i in range(len(blob))],
        "hash": [f"h{i}" for i in range(len(blob))], "split": "train", "cluster": pd.NA,
    })
    return emb, table, blob


def test_clusters_recover_blobs_and_sweep_prefers_true_k():
    emb, _, blob = _blobs()
    clusters = cluster_embeddings(emb, 4, seed=0)
    assert pd.crosstab(clusters, blob).gt(0).sum(axis=1).eq(1).all()  # each cluster is one blob
    sweep = silhouette_sweep(emb, [2, 3, 4, 5, 6], sample_size=200)
    assert int(sweep.loc[sweep["silhouette"].idxmax(), "k"]) == 4
    assert (cluster_embeddings(emb, 3, seed=1, minibatch_above=10) < 3).all()  # MiniBatchKMeans path
    with pytest.raises(ValueError, match="k must be between"):
        cluster_embeddings(emb, 1)


def test_groups_follow_their_majority_cluster():
    table = pd.DataFrame({"group": ["a", "a", "a", "b", "b"], "label": [0, 1, 1, 0, 1]})
    out = assign_groups_to_clusters(table, np.array([2, 2, 5, 1, 7]))
    assert out["cluster"].tolist() == [2, 2, 2, 1, 1]  # "b" ties: the smaller id wins
    assert "cluster" not in table.columns  # the input is not modified


def test_leave_one_cluster_out_and_leakage_check():
    emb, table, _ = _blobs()
    table = leave_one_cluster_out(assign_groups_to_clusters(table, cluster_embeddings(emb, 4)))
    columns = [f"resplit_{i}" for i in range(4)]
    assert all(c in table.columns for c in columns)
    for i, column in enumerate(columns):
        assert (table.loc[table[column] == "val", "cluster"] == i).all()
        assert (table.loc[table[column] == "train", "cluster"] != i).all()
    check_no_group_leakage(table)

    leaky = table.copy()
    row = leaky.index[leaky["resplit_0"] == "train"][0]
    leaky.loc[row, "resplit_0"] = "val"  # one image of a group moved across
    with pytest.raises(LeakageError, match=rf"resplit_0: 1 group\(s\) on both sides: {leaky.at[row, 'group']}"):
        check_no_group_leakage(leaky)

    copied = table.copy()  # the same file content on both sides, under different groups
    train_row = copied.index[copied["resplit_1"] == "train"][0]
    val_row = copied.index[copied["resplit_1"] == "val"][0]
    copied.loc[val_row, "hash"] = copied.at[train_row, "hash"]
    with pytest.raises(LeakageError, match="hash"):
        check_no_group_leakage(copied)


def test_single_class_clusters_warn_and_merge_into_nearest(caplog):
    emb, table, blob = _blobs()
    table["cluster"] = blob  # blob 3 has fakes only
    fake_only = 3
    assert single_class_clusters(table) == [fake_only]
    assert "clusters with a single class" in caplog.text
    centroids = np.stack([emb[blob == c].mean(0) for c in range(4)])
    nearest = int(np.argmin([np.linalg.norm(centroids[c] - centroids[fake_only]) if c != fake_only else np.inf
                             for c in range(4)]))
    merged = merge_single_class_clusters(table, emb)
    assert merged.attrs["cluster_merges"] == [(fake_only, nearest)]
    assert sorted(merged["cluster"].unique()) == [0, 1, 2]
    assert single_class_clusters(merged, warn=False) == []
    counts = cluster_label_counts(merged)
    assert counts["total"].sum() == len(table) and (counts[["real", "fake"]] > 0).all().all()
    # Rows of the absorbed blob now share a cluster with the blob they were merged into.
    assert merged.loc[blob == fake_only, "cluster"].nunique() == 1
    assert merged.loc[blob == fake_only, "cluster"].iloc[0] == merged.loc[blob == nearest, "cluster"].iloc[0]


def test_resplits_round_trip(tmp_path):
    emb, table, _ = _blobs()
    table.loc[table.index[:4], "cluster"] = 0
    table = leave_one_cluster_out(assign_groups_to_clusters(table, cluster_embeddings(emb, 3)))
    path = save_resplits(table, tmp_path / "sub" / "resplits.csv")
    loaded = load_resplits(path)
    pd.testing.assert_frame_equal(loaded[["path", "label", "group", "hash"]], table[["path", "label", "group", "hash"]])
    assert loaded["cluster"].tolist() == table["cluster"].tolist()
    for column in ("resplit_0", "resplit_1", "resplit_2"):
        assert loaded[column].tolist() == table[column].tolist()
    broken = tmp_path / "broken.csv"
    pd.read_csv(path).assign(resplit_0="maybe").to_csv(broken, index=False)
    with pytest.raises(ValueError, match="resplit_0 holds"):
        load_resplits(broken)


def test_save_refuses_a_leaking_table(tmp_path):
    emb, table, _ = _blobs()
    table = leave_one_cluster_out(assign_groups_to_clusters(table, cluster_embeddings(emb, 4)))
    table.loc[table.index[0], "resplit_0"] = "val" if table.at[table.index[0], "resplit_0"] == "train" else "train"
    with pytest.raises(LeakageError):
        save_resplits(table, tmp_path / "r.csv")
    assert not (tmp_path / "r.csv").exists()


def test_official_split_is_by_group_and_stratified():
    _, table, _ = _blobs(n_per=100)
    table.loc[table.index[-20:], "split"] = "test"
    out = official_split(table, val_fraction=0.25, seed=3)
    assert (out["split"].iloc[-20:] == "test").all()
    trainval = out.iloc[:-20]
    assert trainval.groupby("group")["split"].nunique().eq(1).all()
    share = trainval.groupby("label")["split"].apply(lambda s: (s == "val").mean())
    assert ((share - 0.25).abs() < 0.05).all()
    assert official_split(table, 0.25, seed=3)["split"].equals(out["split"])
    with pytest.raises(ValueError, match="val_fraction"):
        official_split(table, 1.5)


def test_rows_without_cluster_stay_out_of_every_resplit(tmp_path):
    table = pd.DataFrame({"path": list("abcde"), "label": [0, 1, 0, 1, 0], "group": list("abcde"),
                          "cluster": pd.array([0, 1, 1, pd.NA, 0], dtype="Int64")})
    out = leave_one_cluster_out(table)
    assert out["resplit_0"].tolist() == ["val", "train", "train", None, "val"]
    assert out["resplit_1"].tolist() == ["train", "val", "val", None, "train"]
    loaded = load_resplits(save_resplits(out, tmp_path / "r.csv"))
    assert loaded["resplit_1"].tolist() == out["resplit_1"].tolist()


def test_build_resplits_end_to_end_keeps_groups_together():
    import numpy as np
    import pandas as pd

    from dfd_lib.data.resplit_table import resplit_columns
    from dfd_lib.embed.clusters import best_k
    from dfd_lib.embed.resplits import build_resplits

    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [8, 0], [0, 8]], dtype=float)
    emb = np.concatenate([c + rng.normal(size=(40, 2)) for c in centres]).astype(np.float32)
    table = pd.DataFrame({"path": [f"{i}.png" for i in range(120)], "label": np.tile([0, 1], 60),
                          "group": [f"g{i // 2}" for i in range(120)], "hash": [f"h{i}" for i in range(120)]})
    sweep = silhouette_sweep(emb, ks=range(2, 6), seed=0)
    assert best_k(sweep) == 3
    resplits = build_resplits(table, emb, 3, seed=0)
    assert resplit_columns(resplits) == ["resplit_0", "resplit_1", "resplit_2"]
    assert (resplits.groupby("group")["cluster"].nunique() == 1).all()
    for column in resplit_columns(resplits):
        assert set(resplits[column]) == {"train", "val"}
    check_no_group_leakage(resplits)


def test_one_name_for_resplit_columns():
    assert resplit_column(3) == "resplit_3" and resplit_index("resplit_3") == 3
    assert resplit_index("resplit_x") is None and resplit_index("cluster") is None
    table = pd.DataFrame(columns=["path", "resplit_10", "resplit_2", "resplit_x", "cluster"])
    assert resplit_indices(table) == [2, 10]
