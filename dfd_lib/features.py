"""Image embeddings of a manifest, streamed to an on-disk cache, and numbers about them.

:func:`extract_embeddings` encodes every row of a manifest table with a backbone (a timm
name built by :func:`dfd_lib.backbones.create_backbone`, or any module such as a trained
expert), decoding in DataLoader workers and writing each batch straight into a memory-mapped
``.npy`` file, so a dataset of any size never sits in memory as one tensor. The cache key
covers the manifest's content, the backbone's identity and the preprocessing, so a rerun
reads the file instead of recomputing.

:func:`domain_separability` and :func:`class_spread` are the numbers the UMAP picture is
read with: can train be told from val, and how much wider do fakes spread than reals.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dfd_lib.atomic import atomic_write
from dfd_lib.backbones import backbone_data_config, backbone_transform, create_backbone
from dfd_lib.images import load_rgb
from dfd_lib.paths import cache_dir as default_cache_dir

CACHE_FORMAT = 1  # bump when the file layout or the meaning of a key changes


@dataclass
class EmbeddingResult:
    """Row ``i`` of ``embeddings`` belongs to ``table.iloc[i]``; ``failed`` lists the rows
    (``path``, ``reason``) that could not be decoded and have no embedding."""

    embeddings: np.ndarray  # (N, D) float32, memory-mapped read-only from ``cache_path``
    table: pd.DataFrame  # the embedded rows of the input table, original index kept
    failed: pd.DataFrame
    cache_path: Path
    from_cache: bool

    @property
    def paths(self) -> list[str]:
        return self.table["path"].astype(str).tolist()

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def select(self, splits: list[str]) -> "EmbeddingResult":
        """The rows whose ``split`` is one of ``splits`` (embeddings gathered into memory)."""
        mask = self.table["split"].isin(splits).to_numpy()
        return EmbeddingResult(np.asarray(self.embeddings[mask]), self.table[mask], self.failed,
                               self.cache_path, self.from_cache)


class _ImageRows(Dataset):
    """Decodes one manifest row per item; a failure yields a blank image and its reason."""

    def __init__(self, paths: list[str], transform, image_size: int):
        self.paths, self.transform, self.image_size = paths, transform, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_rgb(self.paths[index])), index, ""
        except Exception as err:  # any decode/transform failure is reported, never fatal
            reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
            return torch.zeros(3, self.image_size, self.image_size), index, reason


def _manifest_identity(table: pd.DataFrame) -> str:
    """Content hashes when the manifest has them all; else path, size and mtime of each file."""
    digest = hashlib.sha1()
    if "hash" in table.columns and table["hash"].notna().all():
        for value in table["hash"].astype(str):
            digest.update(value.encode() + b"\n")
        return "content:" + digest.hexdigest()
    for path in table["path"].astype(str):
        try:
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}|missing\n".encode())
    return "files:" + digest.hexdigest()


def module_identity(module: nn.Module) -> str:
    """A hash of a module's class and every tensor of its state dict (a checkpoint's identity)."""
    digest = hashlib.sha1(type(module).__qualname__.encode())
    for key, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return "module:" + digest.hexdigest()


def _weights_identity(weights_path: str | os.PathLike | None) -> str | None:
    if weights_path is None:
        return None
    stat = os.stat(weights_path)
    return f"{Path(weights_path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _data_config_of(module: nn.Module) -> dict[str, Any]:
    """timm's data config of the first submodule that carries one (an Expert wraps its timm model)."""
    for sub in module.modules():
        if hasattr(sub, "pretrained_cfg"):
            return backbone_data_config(sub)
    return backbone_data_config(module)


def _pooled(output: Any) -> torch.Tensor:
    if isinstance(output, dict):
        if "features" not in output:
            raise ValueError(f"the backbone returned a dict without 'features' (keys: {sorted(output)})")
        output = output["features"]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"the backbone must return a tensor or a dict with 'features', got {type(output).__name__}")
    if output.ndim == 4:  # an unpooled feature map: global average pool
        output = output.mean(dim=(2, 3))
    elif output.ndim == 3:  # tokens
        output = output.mean(dim=1)
    return output.float()


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def extract_embeddings(
    table: pd.DataFrame,
    backbone: str | nn.Module = "tf_efficientnet_lite0",
    image_size: int = 224,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike | None = None,
    pretrained: bool = True,
    weights_path: str | os.PathLike | None = None,
    crop_pct: float | None = 1.0,
    progress: bool = True,
) -> EmbeddingResult:
    """Embed every row of ``table`` (a manifest with a ``path`` column), or read the cache.

    ``crop_pct=1.0`` embeds the whole image (an edit near the border still counts); ``None``
    uses the backbone's own centre crop. The cache lives in ``cache_dir`` (default
    ``<cache>/embeddings``).
    """
    if "path" not in table.columns:
        raise ValueError("the table needs a 'path' column (a manifest table)")
    if len(table) == 0:
        raise ValueError("the table has no rows to embed")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")

    if isinstance(backbone, str):
        model = create_backbone(backbone, pretrained=pretrained, num_classes=0, weights_path=weights_path)
        identity = f"name:{backbone}|pretrained:{pretrained}|weights:{_weights_identity(weights_path)}"
    elif isinstance(backbone, nn.Module):
        model, identity = backbone, module_identity(backbone)
    else:
        raise TypeError(f"backbone must be a timm name or an nn.Module, got {type(backbone).__name__}")
    data_config = _data_config_of(model)
    transform = backbone_transform(data_config, image_size=image_size, crop_pct=crop_pct)

    key_source = json.dumps(
        {"format": CACHE_FORMAT, "manifest": _manifest_identity(table), "rows": len(table),
         "backbone": identity, "image_size": int(image_size), "crop_pct": crop_pct,
         "mean": list(data_config["mean"]), "std": list(data_config["std"]),
         "interpolation": data_config["interpolation"]},
        sort_keys=True,
    )
    key = hashlib.sha1(key_source.encode()).hexdigest()[:20]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "embeddings"
    array_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"

    if not meta_path.is_file() or not array_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        _compute(table, model, transform, int(image_size), batch_size, num_workers,
                 _resolve_device(device), array_path, meta_path, key_source, progress)
        from_cache = False
    else:
        from_cache = True
    return _read_cache(table, array_path, meta_path, from_cache)


def _compute(table, model, transform, image_size, batch_size, num_workers, device,
             array_path: Path, meta_path: Path, key_source: str, progress: bool) -> None:
    paths = table["path"].astype(str).tolist()
    loader = DataLoader(_ImageRows(paths, transform, image_size), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    was_training = model.training
    model = model.to(device).eval()
    partial = array_path.with_name(f"{array_path.stem}.{os.getpid()}.partial.npy")  # concurrent runs never share it
    out: np.ndarray | None = None
    written, failed = 0, []
    try:
        with torch.inference_mode():
            for images, indices, reasons in tqdm(loader, desc="embedding", unit="batch", disable=not progress):
                ok = torch.tensor([reason == "" for reason in reasons])
                failed += [(int(i), reason) for i, reason in zip(indices, reasons) if reason]
                if not ok.any():
                    continue
                batch = images[ok].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    features = _pooled(model(batch)).cpu().numpy()
                if out is None:  # the width is known only after the first forward pass
                    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                                    shape=(len(paths), features.shape[1]))
                out[written:written + len(features)] = features
                written += len(features)
    except BaseException:
        partial.unlink(missing_ok=True)  # an interrupted run leaves no half-written cache
        raise
    finally:
        model.train(was_training)
    if out is None:
        raise RuntimeError(f"none of the {len(paths)} images could be decoded; first reason: {failed[0][1]}")
    out.flush()
    del out
    os.replace(partial, array_path)
    failed_rows = {index for index, _ in failed}
    meta = {"key": json.loads(key_source), "embedded_rows": [i for i in range(len(paths)) if i not in failed_rows],
            "failed": [{"row": i, "path": paths[i], "reason": r} for i, r in failed]}
    # the metadata file marks the cache entry complete
    atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)))


def _read_cache(table: pd.DataFrame, array_path: Path, meta_path: Path, from_cache: bool) -> EmbeddingResult:
    meta = json.loads(meta_path.read_text())
    rows = meta["embedded_rows"]
    embeddings = np.load(array_path, mmap_mode="r")[: len(rows)]  # trailing rows were reserved for failures
    failed = pd.DataFrame(meta["failed"], columns=["row", "path", "reason"])
    return EmbeddingResult(embeddings, table.iloc[rows], failed, array_path, from_cache)


# --- numbers about an embedding space -------------------------------------------------------

def _subsample(n: int, max_points: int | None, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    if max_points is None or n <= max_points:
        return np.arange(n)
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(n), train_size=max_points, random_state=seed, stratify=strata)
    return np.sort(keep)


def domain_separability(emb: np.ndarray, is_val: np.ndarray, k: int = 10, folds: int = 5,
                        seed: int = 0, max_points: int | None = 20000) -> float:
    """Cross-validated ROC AUC of a k-NN classifier telling val rows from train rows:
    about 0.5 when the two sets overlap, near 1.0 when they are separate domains."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

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
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import pairwise_distances

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
    pairs = [("train vs val", ["train"], ["val"]), ("train+val vs test", ["train", "val"], ["test"])]
    rows = []
    for name, first, second in pairs:
        mask = np.isin(split, first + second)
        is_second = np.isin(split[mask], second)
        if is_second.sum() < 2 or (~is_second).sum() < 2:
            continue
        auc = domain_separability(np.asarray(result.embeddings[mask]), is_second, k=k, seed=seed)
        rows.append({"pair": name, "n_first": int((~is_second).sum()), "n_second": int(is_second.sum()), "auc": auc})
    return pd.DataFrame(rows, columns=["pair", "n_first", "n_second", "auc"]).set_index("pair")
