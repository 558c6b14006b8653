"""What a training is made from, as a key: a finished (or interrupted) training in a folder is reused
only when its key equals the key of the training asked for; otherwise it is trained again from scratch,
and one log line says what changed (``expert_3: retraining: its training rows changed``).

The key has four parts: the training rows and the validation rows (each row's content hash and label,
in order, so augmented images count by their content), the config (:class:`TrainConfig` without the
settings that only decide how fast it runs or where it is logged), and the starting weights' identity
(a local file by its content digest; a package, a hub revision or ``random`` as
:mod:`dfd_lib.models.backbones` names them). With the ``mask`` loss term on there is a fifth, the
training rows' masks by content (a changed mask retrains); with it off a key has no such part and
stays what it was. The code is not part of the key: a change of the training
loop that changes results must bump :data:`TRAINING_FORMAT`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from dfd_lib.data.manifest import MASK
from dfd_lib.training.train_config import TrainConfig

TRAINING_FORMAT = 1  # bump when the loop computes something else from the same rows, config and weights
PARTS = {"train_rows": "its training rows changed", "val_rows": "its validation rows changed",
         "config": "its settings changed", "weights": "its starting weights changed", "format": "the training code changed",
         "masks": "its training masks changed"}


def rows_digest(table: pd.DataFrame) -> str:
    """A digest of the rows a training reads, in order: each image's content hash (its path, size and
    modification time where the table has no hash) and label."""
    digest = hashlib.sha256()
    hashes = table["hash"] if "hash" in table.columns else pd.Series([None] * len(table), index=table.index)
    for path, label, content in zip(table["path"], table["label"], hashes):
        digest.update(f"{content if isinstance(content, str) and content else _file_identity(path)}|{int(label)}\n".encode())
    return digest.hexdigest()


def _file_identity(path) -> str:
    stat = Path(path).stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def masks_digest(table: pd.DataFrame) -> str:
    """A digest of the rows' masks, in order: each mask file's content (empty for a row without one)."""
    digest = hashlib.sha256()
    values = table[MASK] if MASK in table.columns else [None] * len(table)
    for value in values:
        present = isinstance(value, str) and value != "" and Path(value).is_file()
        digest.update((hashlib.sha256(Path(value).read_bytes()).hexdigest() if present else "-").encode() + b"\n")
    return digest.hexdigest()


def weights_identity(weights_source: str) -> str:
    """``weights_source`` (``file:<path>``, ``package:...``, ``hub:<repo>@<revision>``, ``random``) with a
    local file replaced by the digest of its content."""
    if weights_source.startswith("file:"):
        path = Path(weights_source[len("file:"):])
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(16 << 20), b""):
                digest.update(block)
        return f"file-sha256:{digest.hexdigest()}"
    return weights_source


def training_key(train_table: pd.DataFrame, val_table: pd.DataFrame, config: TrainConfig, weights_source: str) -> dict:
    """The key of one training (see the module's docstring)."""
    settings = json.dumps(config.result_settings(), sort_keys=True)
    key = {"train_rows": rows_digest(train_table), "val_rows": rows_digest(val_table),
           "config": hashlib.sha256(settings.encode()).hexdigest(), "weights": weights_identity(weights_source),
           "format": TRAINING_FORMAT}
    if config.loss.weights.get("mask", 0.0) > 0:  # the masks are what the head learns from
        key["masks"] = masks_digest(train_table)
    return key


def key_changes(recorded: dict, wanted: dict) -> list[str]:
    """What differs between a recorded key and the one asked for, in words."""
    if not recorded:
        return ["it was made before trainings recorded what they were made from"]
    return [PARTS.get(part, part) for part in wanted if recorded.get(part) != wanted[part]]


def training_record(weights_source: str, key: dict) -> dict:
    """What ``environment.json`` keeps of one training: where it started from and what it was made from."""
    return {"weights": weights_source, "train_rows": key.get("train_rows"), "val_rows": key.get("val_rows"),
            "settings": key.get("config")}
