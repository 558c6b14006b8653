"""A full disk: a run whose folder lives on a small filesystem stops with a clear "no space left"
error naming the step and the path, keeps every earlier artefact intact, and resumes after space
is freed to the same result as an uninterrupted run. Needs root to mount a tmpfs; skipped otherwise."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from dfd_lib.core import runs
from dfd_lib.pipeline.chain import run_pipeline
from dfd_lib.pipeline.compare import compare_runs
from dfd_lib.pipeline.fingerprints import read_fingerprints

pytestmark = pytest.mark.slow  # smoke pipelines: the full suite, not the fast tier

SIZE_MB = 2048  # the smoke run needs about 1 GB, mostly training states (a tmpfs holds only what is written)
LEFT_FREE_MB = 20  # what the ballast leaves: enough for 01-03's small files, not for 04's checkpoints


@pytest.fixture()
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"could not mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _digests(run_dir) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in run_dir.rglob("*") if p.is_file() and "notebooks" not in p.parts}


def test_a_full_disk_stops_with_a_clear_error_and_resumes_after_space_is_freed(smoke_run, small_disk):
    options = dict(reports_dir=small_disk, progress=False, write_report=False, check=False)
    # the reference run moved onto the small disk without what 04 and 05 wrote: 01-03 done, 04 to train again
    run_dir = small_disk / "full"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns(runs.EXPERTS_DIR, "weights"))
    before, done = _digests(run_dir), read_fingerprints(run_dir)
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, shutil.disk_usage(small_disk).free - LEFT_FREE_MB * 2**20)

    stopped = run_pipeline(run="full", start="04", **options)
    assert not stopped.ok
    failed = stopped.steps[-1]
    assert failed.step == "04_train_moe"
    assert "no space left on device" in failed.error.lower() and str(run_dir) in failed.error, failed.error
    after = _digests(run_dir)
    # the pipeline's own records of the attempt (fingerprints.json: 04 no longer done, checked below)
    records = ("environment.json", "params.json", "timings.json", runs.DIGEST_CACHE, runs.FINGERPRINTS)
    assert {name: after.get(name) for name in before if name not in records} == \
        {name: digest for name, digest in before.items() if name not in records}  # 01-03's artefacts untouched
    kept = read_fingerprints(run_dir)
    assert "04_train_moe" not in kept  # not done: it runs again on resume (and 05, downstream of it)
    assert all(kept[step] == done[step] for step in ("01_features_umap", "02_cluster_split", "03_sd_augment"))

    ballast.unlink()
    words = stopped.resume.split()
    resumed = run_pipeline(run=words[words.index("--run") + 1], start=words[words.index("--from") + 1], **options)
    assert resumed.ok, resumed.steps
    comparison = compare_runs(smoke_run, run_dir)
    assert comparison.agree, comparison.to_text()
