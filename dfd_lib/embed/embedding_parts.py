"""The parts of an embedding cache entry that N processes write (``dfd embed`` under ``accelerate
launch``), and their merge into the entry one process writes.

Process ``r`` of ``N`` embeds batches ``r, r+N, ...`` of the table (:func:`dfd_lib.core.shards.deal`
with a block of one batch: every forward pass sees the rows one process's would, so the values are
the same bit for bit where the kernels do not depend on the thread count) into ``KEY.npy.part-<r>-of-<N>``
and ``KEY.json.part-<r>-of-<N>`` (:func:`dfd_lib.core.shards.part_path`), in the cache's own layout:
its embedded rows first, its failed rows listed by their row in the part. A part is complete when
its metadata file is there and names the part's key, so a killed run reuses every finished part.
:func:`merge_embedding_parts` writes ``KEY.npy`` / ``KEY.json`` as one process does: the embedded
rows of the whole table in its order, the trailing rows (reserved for failures) zero, the failed
rows by their row in the table; then removes the parts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dfd_lib.core.atomic import atomic_write
from dfd_lib.core.shards import deal, part_path

COPY_ROWS = 4096  # rows copied from a part at a time: memory stays bounded at any dataset size


def part_files(array_path: Path, meta_path: Path, rank: int, processes: int) -> tuple[Path, Path]:
    """Where process ``rank`` writes its part of the entry ``array_path`` / ``meta_path``."""
    return part_path(array_path, rank, processes), part_path(meta_path, rank, processes)


def part_key_source(key_source: str, rank: int, processes: int, block: int) -> str:
    """The key of a part: the entry's and which shard of how many, dealt in blocks of how many rows."""
    key = json.loads(key_source)
    key["shard"] = [rank, processes, block]
    return json.dumps(key, sort_keys=True)


def part_complete(array_path: Path, meta_path: Path, key_source: str) -> bool:
    """Whether a part was written to the end for this key (by this run or a killed one)."""
    if not (array_path.is_file() and meta_path.is_file()):
        return False
    try:
        return json.loads(meta_path.read_text()).get("key") == json.loads(key_source)
    except (ValueError, OSError):
        return False


def merge_embedding_parts(array_path: Path, meta_path: Path, key_source: str, paths: list[str], processes: int,
                          block: int) -> None:
    """Write the entry one process writes for ``paths`` from the ``processes`` complete parts; remove them.
    A ``RuntimeError`` when no image of any part could be decoded, as one process raises."""
    parts = [part_files(array_path, meta_path, rank, processes) for rank in range(processes)]
    metas = [json.loads(meta.read_text()) for _, meta in parts]
    rows = [np.asarray(deal(range(len(paths)), rank, processes, block), dtype=np.int64) for rank in range(processes)]
    embedded = np.sort(np.concatenate([rows[rank][meta["embedded_rows"]] for rank, meta in enumerate(metas)]))
    failed = sorted((int(rows[rank][item["row"]]), item["reason"]) for rank, meta in enumerate(metas) for item in meta["failed"])
    if not len(embedded):
        raise RuntimeError(f"none of the {len(paths)} images could be decoded; first reason: {failed[0][1]}")
    arrays = [np.load(array, mmap_mode="r")[: len(meta["embedded_rows"])] if meta["embedded_rows"] else None
              for (array, _), meta in zip(parts, metas)]  # a part's trailing rows were reserved for its failures
    width = next(a.shape[1] for a in arrays if a is not None)
    partial = array_path.with_name(f"{array_path.stem}.{os.getpid()}.partial.npy")
    try:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(paths), width))
        for rank, (meta, array) in enumerate(zip(metas, arrays)):
            if array is None:
                continue
            where = np.searchsorted(embedded, rows[rank][meta["embedded_rows"]])
            for start in range(0, len(where), COPY_ROWS):
                out[where[start:start + COPY_ROWS]] = array[start:start + COPY_ROWS]
        out.flush()
        del out
        os.replace(partial, array_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    meta = {"key": json.loads(key_source), "embedded_rows": [int(row) for row in embedded],
            "failed": [{"row": row, "path": paths[row], "reason": reason} for row, reason in failed]}
    atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)))  # the entry is complete
    for array, meta_file in parts:
        array.unlink(missing_ok=True)
        meta_file.unlink(missing_ok=True)

