"""The embeddings of a run as notebook 01 stored them, read back without torch (notebook 02 and step 02's
command need only these files: importing torch and timm would add two seconds to every run of 02).

:mod:`dfd_lib.embed.embeddings` computes and caches them; an entry is an ``.npy`` array with a ``.json``
beside it that marks it complete and lists the rows that were embedded and those that failed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dfd_lib.core import runs
from dfd_lib.data.manifest import Manifest


@dataclass
class EmbeddingResult:
    """Row ``i`` of ``embeddings`` belongs to ``table.iloc[i]``; ``failed`` lists the rows
    (``path``, ``reason``) that could not be decoded and have no embedding."""

    embeddings: np.ndarray  # (N, D) float32, memory-mapped read-only from ``cache_path``
    table: pd.DataFrame  # the embedded rows of the input table, original index kept
    failed: pd.DataFrame
    cache_path: Path
    from_cache: bool
    weights_source: str = ""  # where the backbone's weights came from (dfd_lib.models.backbones)

    @property
    def paths(self) -> list[str]:
        return self.table["path"].astype(str).tolist()

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def select(self, splits: list[str]) -> EmbeddingResult:
        """The rows whose ``split`` is one of ``splits`` (embeddings gathered into memory)."""
        mask = self.table["split"].isin(splits).to_numpy()
        return EmbeddingResult(np.asarray(self.embeddings[mask]), self.table[mask], self.failed,
                               self.cache_path, self.from_cache, self.weights_source)


def manifest_identity(table: pd.DataFrame) -> str:
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


def load_run_embeddings(run: runs.RunDir) -> EmbeddingResult:
    """The embeddings notebook 01 made for this run (its manifest's rows, in order); an error naming
    step 01 when they are missing or the manifest changed since."""
    manifest = Manifest.load(run.require(runs.MANIFEST)).table
    index = json.loads(run.require(runs.EMBEDDINGS_INDEX).read_text())
    array_path = run.path(runs.EMBEDDINGS_DIR) / index["array"]
    meta_path = array_path.with_suffix(".json")
    if not (array_path.is_file() and meta_path.is_file()):
        raise runs.MissingArtefactError(f"{array_path} is missing: run step 01_features_umap again")
    key = json.loads(meta_path.read_text())["key"]
    if key["manifest"] != manifest_identity(manifest) or key["rows"] != len(manifest):
        raise ValueError(f"{run.path(runs.MANIFEST)} changed after notebook 01 embedded it: run step 01 again")
    result = read_cache(manifest, array_path, meta_path, from_cache=True)
    result.weights_source = index.get("weights_source", "")
    return result


def read_cache(table: pd.DataFrame, array_path: Path, meta_path: Path, from_cache: bool) -> EmbeddingResult:
    meta = json.loads(meta_path.read_text())
    rows = meta["embedded_rows"]
    embeddings = np.load(array_path, mmap_mode="r")[: len(rows)]  # trailing rows were reserved for failures
    failed = pd.DataFrame(meta["failed"], columns=["row", "path", "reason"])
    return EmbeddingResult(embeddings, table.iloc[rows], failed, array_path, from_cache)
