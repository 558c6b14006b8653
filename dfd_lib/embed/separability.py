"""The numbers the UMAP picture is read with (notebook 01): can train be told from val (and
train+val from the cross-domain test), and how much wider do fakes spread than reals."""
from __future__ import annotations

import numpy as np
import pandas as pd

from dfd_lib.data.manifest import TEST, TRAIN, VAL
from dfd_lib.embed.embedding_store import EmbeddingResult


def _subsample(n: int, max_points: int | None, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    if max_points is None or n <= max_points:
        return np.arange(n)
    from sklearn.model_selection import train_test_split  # deferred: scikit-learn is slow to import

    keep, _ = train_test_split(np.arange(n), train_size=max_points, random_state=seed, stratify=strata)
    return np.sort(keep)


def domain_separability(emb: np.ndarray, is_val: np.ndarray, k: int = 10, folds: int = 5,
                        seed: int = 0, max_points: int | None = 20000) -> float:
    """Cross-validated ROC AUC of a k-NN classifier telling val rows from train rows:
    about 0.5 when the two sets overlap, near 1.0 when they are separate domains."""
    from sklearn.metrics import roc_auc_score  # deferred: scikit-learn is slow to import
    from sklearn.model_selection import StratifiedKFold, cross_val_predict  # deferred: scikit-learn is slow to import
    from sklearn.neighbors import KNeighborsClassifier  # deferred: scikit-learn is slow to import

    is_val = np.asarray(is_val).astype(bool)
    if len(is_val) != len(emb):
        raise ValueError(f"{len(emb)} embeddings but {len(is_val)} domain flags")
    if is_val.all() or not is_val.any():
        raise ValueError("domain_separability needs rows of both domains (train and val)")
    keep = _subsample(len(emb), max_points, seed, is_val)
    x, y = np.asarray(emb[keep], dtype=np.float32), is_val[keep]
    folds = min(folds, int(y.sum()), int((~y).sum()))
    if folds < 2:
        raise ValueError("domain_separability needs at least 2 rows of each domain")
    knn = KNeighborsClassifier(n_neighbors=min(k, len(y) - len(y) // folds - 1))
    scores = cross_val_predict(knn, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                               method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def class_spread(emb: np.ndarray, labels: np.ndarray, n_clusters: int = 20, coverage: float = 0.9,
                 min_share: float = 0.01, seed: int = 0, max_points: int | None = 20000) -> pd.DataFrame:
    """How widely each class spreads in the embedding space, one row per class: mean distance
    to the class centroid, mean pairwise distance, and, over ``n_clusters`` k-means clusters of
    all rows, how many clusters the class occupies (holding >= ``min_share`` of it) and how
    many it needs to cover ``coverage`` of its rows."""
    from sklearn.cluster import MiniBatchKMeans  # deferred: scikit-learn is slow to import
    from sklearn.metrics import pairwise_distances  # deferred: scikit-learn is slow to import

    labels = np.asarray(labels)
    if len(labels) != len(emb):
        raise ValueError(f"{len(emb)} embeddings but {len(labels)} labels")
    keep = _subsample(len(emb), max_points, seed, labels)
    x, y = np.asarray(emb[keep], dtype=np.float32), labels[keep]
    n_clusters = max(1, min(n_clusters, len(x)))
    clusters = MiniBatchKMeans(n_clusters, random_state=seed, n_init=3, batch_size=2048).fit_predict(x)
    rng = np.random.default_rng(seed)
    rows = []
    for value in sorted(pd.unique(y)):
        members = x[y == value]
        sample = members[rng.choice(len(members), min(len(members), 2000), replace=False)]
        pairwise = pairwise_distances(sample)
        counts = np.sort(np.bincount(clusters[y == value], minlength=n_clusters))[::-1]
        share = counts / counts.sum()
        rows.append({
            "class": value, "n": len(members),
            "centroid_distance": float(np.linalg.norm(members - members.mean(0), axis=1).mean()),
            "pairwise_distance": float(pairwise.sum() / max(1, len(sample) * (len(sample) - 1))),
            "clusters_occupied": int((share >= min_share).sum()),
            f"clusters_for_{int(coverage * 100)}pct": int(np.searchsorted(np.cumsum(share), coverage - 1e-9) + 1),
        })
    return pd.DataFrame(rows).set_index("class")


def split_separability(result: EmbeddingResult, k: int = 10, seed: int = 0) -> pd.DataFrame:
    """How well a k-NN classifier tells the splits apart (cross-validated AUC), one row per
    pair present: official train vs val (the method's finding: ~0.5), and train+val vs the
    cross-domain test (high when the test set really is another domain)."""
    split = result.table["split"].astype(str).to_numpy()
    pairs = [("train vs val", [TRAIN], [VAL]), ("train+val vs test", [TRAIN, VAL], [TEST])]
    rows = []
    for name, first, second in pairs:
        mask = np.isin(split, first + second)
        is_second = np.isin(split[mask], second)
        if is_second.sum() < 2 or (~is_second).sum() < 2:
            continue
        auc = domain_separability(np.asarray(result.embeddings[mask]), is_second, k=k, seed=seed)
        rows.append({"pair": name, "n_first": int((~is_second).sum()), "n_second": int(is_second.sum()), "auc": auc})
    return pd.DataFrame(rows, columns=["pair", "n_first", "n_second", "auc"]).set_index("pair")
