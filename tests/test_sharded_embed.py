"""``dfd embed`` under ``accelerate launch --multi_gpu --num_processes 2`` (two CPU processes over
gloo): each process embeds every other row into its part of the cache entry, process 0 merges them,
and the run folder holds what one process writes: the same manifest, the same cache entry (rows,
order, failures, metadata) and the same embeddings. The parts of a run interrupted midway are kept,
and the run again embeds only the unfinished ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_embeddings import _Counted, images  # noqa: F401 (images: a fixture)
from test_step_commands import EMBED_OPTIONS, dataset  # noqa: F401 (dataset: a fixture)

from dfd_lib.core import runs
from dfd_lib.core.shards import ShardGroup, deal, interleave, part_path
from dfd_lib.data.manifest import skipped_path
from dfd_lib.embed.embedding_store import load_run_embeddings
from dfd_lib.embed.embeddings import EmbeddingConfig, extract_embeddings

CONFIG = EmbeddingConfig(image_size=32, batch_size=2, num_workers=0, device="cpu")


class WaitsForTheMerge(Exception):
    """Where a process other than 0 would wait for process 0's merge, then read the merged entry."""


class OneAtATime(ShardGroup):
    """Process ``rank`` of ``processes``, the processes run one after another in this one: the first
    barrier (every part written) has nothing to wait for; at the second a process other than 0 stops
    (:class:`WaitsForTheMerge`). The last to run, process 0, merges."""

    def __init__(self, rank: int, processes: int):
        self.rank, self.processes, self.is_main = rank, processes, rank == 0
        self.barriers = 0

    def gather(self, value):
        self.barriers += 1
        if self.barriers > 1 and not self.is_main:
            raise WaitsForTheMerge
        return [value]


def embed(table, folder: Path, model, rank: int, processes: int):
    """Process ``rank``'s call; the result on process 0, None on the others (which would wait)."""
    try:
        return extract_embeddings(table, CONFIG, cache_dir=folder, model=model, progress=False,
                                  shards=OneAtATime(rank, processes))
    except WaitsForTheMerge:
        assert rank != 0
        return None


class Interrupted(_Counted):
    """Stops (as Ctrl-C does) at its ``stop_at``-th forward pass."""

    def __init__(self, stop_at: int):
        super().__init__()
        self.stop_at = stop_at

    def forward(self, x):
        if self.calls + 1 == self.stop_at:
            raise KeyboardInterrupt
        return super().forward(x)


def entry_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_deal_and_interleave_are_inverse():
    items = list(range(11))
    shards = [deal(items, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert interleave(shards) == items
    assert interleave([deal(items[:1], r, 3) for r in range(3)]) == [0]  # a process with nothing to do
    batches = [deal(items, r, 2, block=4) for r in range(2)]  # whole batches of 4: 0-3, 8-10 | 4-7
    assert batches == [[0, 1, 2, 3, 8, 9, 10], [4, 5, 6, 7]]
    assert interleave(batches, block=4) == items
    with pytest.raises(ValueError, match="rank"):
        deal(items, 3, 3)
    assert part_path("/a/out.csv", 1, 4) == Path("/a/out.csv.part-1-of-4")


def test_three_shards_merge_into_the_one_process_entry_and_resume_per_part(images, tmp_path):  # noqa: F811
    one = extract_embeddings(images, CONFIG, cache_dir=tmp_path / "one", model=_Counted(), progress=False)
    folder = tmp_path / "three"
    # rank 2 finishes its part, rank 1 is interrupted midway: a part of its own, nothing merged
    embed(images, folder, _Counted(), 2, 3)
    with pytest.raises(KeyboardInterrupt):
        embed(images, folder, Interrupted(stop_at=2), 1, 3)
    assert sorted(p.name.split(".", 1)[1] for p in folder.iterdir()) == ["json.part-2-of-3", "npy.part-2-of-3"]
    # run again: rank 2's part is kept (no forward pass), ranks 1 and 0 embed theirs, rank 0 merges
    model = _Counted()
    for rank in (2, 1):
        embed(images, folder, model, rank, 3)
    assert model.calls == 2  # rank 1's batches (rows 2-3, 8-9), none of rank 2's (rows 4-5: the corrupt file, 5)
    three = embed(images, folder, model, 0, 3)
    assert not three.from_cache and entry_files(folder).keys() == entry_files(tmp_path / "one").keys()  # parts removed
    assert (folder / f"{three.cache_path.stem}.json").read_text() == (one.cache_path.with_suffix(".json")).read_text()
    assert list(three.table.index) == list(one.table.index) and three.failed.equals(one.failed)
    np.testing.assert_array_equal(np.load(three.cache_path), np.load(one.cache_path))  # the same batches: bit for bit


def test_a_shard_whose_images_all_fail_still_merges(images, tmp_path):  # noqa: F811
    table = images.iloc[[0, 1, 4]]  # batches of 2: rank 1 has the corrupt file alone, rank 2 nothing
    one = extract_embeddings(table, CONFIG, cache_dir=tmp_path / "one", model=_Counted(), progress=False)
    for rank in (2, 1, 0):
        three = embed(table, tmp_path / "three", _Counted(), rank, 3)
    assert three.cache_path.with_suffix(".json").read_text() == one.cache_path.with_suffix(".json").read_text()
    np.testing.assert_array_equal(np.load(three.cache_path), np.load(one.cache_path))
    with pytest.raises(RuntimeError, match="none of the 1 images could be decoded"):
        for rank in (1, 0):
            embed(table.iloc[[2]], tmp_path / "none", _Counted(), rank, 2)


LAUNCH_TWO = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


def dfd(args: list[str], processes: int) -> subprocess.CompletedProcess:
    """``dfd ARGS`` in one process or under ``accelerate launch``, each process on one CPU thread (the
    thread count changes a convolution's float sums: lite0's embeddings move by up to 1e-5)."""
    launch = [sys.executable, *(LAUNCH_TWO if processes == 2 else []), "-m", "dfd_lib.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_dfd_embed_on_two_processes_writes_the_one_process_run(dataset, tmp_path):  # noqa: F811
    (dataset / "smooth" / "real" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    one, two = tmp_path / "one", tmp_path / "two"
    assert dfd(["embed", "--run-dir", str(one), "--dataset", str(dataset), *EMBED_OPTIONS], 1).returncode == 0
    done = dfd(["embed", "--run-dir", str(two), "--dataset", str(dataset), *EMBED_OPTIONS], 2)
    assert done.returncode == 0, done.stderr[-6000:]
    assert done.stdout.count("40 embeddings of width 1280, computed; 0 images failed") == 1  # process 0 reports
    assert (one / runs.MANIFEST).read_text() == (two / runs.MANIFEST).read_text()
    assert "corrupt.png" in skipped_path(two / runs.MANIFEST).read_text()
    ours, theirs = (load_run_embeddings(runs.RunDir(root)) for root in (one, two))
    assert list(ours.table["path"]) == list(theirs.table["path"])
    np.testing.assert_array_equal(theirs.embeddings, ours.embeddings)  # the same batches, threads: bit for bit
    files = entry_files(two / runs.EMBEDDINGS_DIR)
    assert files.keys() == entry_files(one / runs.EMBEDDINGS_DIR).keys()  # the parts merged and removed
    index = json.loads((two / runs.EMBEDDINGS_INDEX).read_text())
    meta = index["array"].replace(".npy", ".json")
    assert files[meta] == (one / runs.EMBEDDINGS_DIR / meta).read_bytes()
