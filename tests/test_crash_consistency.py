"""Crash consistency: a smoke run killed (SIGKILL, no cleanup) at several points inside notebooks 01,
03 and 04 finishes with the resume command it printed, never leaves a half-written artefact, and ends
with the same artefacts and metrics as an uninterrupted run (``dfd compare``)."""
from __future__ import annotations

import json
import shlex

import pandas as pd
import pytest

from dfd_lib.core import runs
from dfd_lib.core.faults import CRASH_ENV
from dfd_lib.pipeline.chain import run_pipeline
from dfd_lib.pipeline.compare import compare_runs
from dfd_lib.pipeline.parameters import parse_overrides

pytestmark = pytest.mark.slow  # smoke pipelines: the full suite, not the fast tier

# (where the kernel kills itself, the step that fails): DFD_CRASH_AT=<step>/<point>:<n-th pass>
KILLS = [
    ("01_features_umap/embeddings.batch:3", "01_features_umap"),  # mid-way through the embedding cache
    ("01_features_umap/atomic.before_replace:2", "01_features_umap"),  # a temporary file written, not yet renamed
    ("03_sd_augment/enrichment.image:9", "03_sd_augment"),  # between generated images
    ("04_train_moe/training.step:3", "04_train_moe"),  # inside the second training (model (a) has 2 steps)
    ("04_train_moe/training.checkpoint:2", "04_train_moe"),  # inside a checkpoint swap
    ("04_train_moe/atomic.before_replace:12", "04_train_moe"),  # inside a checkpoint or table write
]


def _resume(command: str, reports_dir):
    """Run a printed ``dfd pipeline ...`` resume command as the CLI would (in the test's reports folder)."""
    words = shlex.split(command)
    assert words[:2] == ["dfd", "pipeline"] and "--profile" not in words and "-p" not in words
    run, start = words[words.index("--run") + 1], words[words.index("--from") + 1]
    return run_pipeline(run=run, start=start, overrides=parse_overrides([]), reports_dir=reports_dir,
                        progress=False, write_report=False, check=False)


def _assert_every_artefact_reads(run_dir):
    """Every table and record in the run folder parses: nothing is half-written."""
    for path in run_dir.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix == ".csv":
            pd.read_csv(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())


def test_killed_runs_resume_with_the_printed_command_and_match_an_uninterrupted_run(smoke_run, tmp_path, monkeypatch):
    reports = tmp_path / "reports"
    monkeypatch.setenv(CRASH_ENV, KILLS[0][0])
    result = run_pipeline("smoke", run="killed", reports_dir=reports, progress=False, write_report=False, check=False)
    survived = 0
    for index, (_point, step) in enumerate(KILLS):
        assert not result.ok, f"kill {index} did not happen"
        failed = result.steps[-1]
        assert failed.step == step and "DeadKernelError" in failed.error, (index, failed.step, failed.error)
        assert result.resume == f"dfd pipeline --run killed --from {step[:2]}"
        _assert_every_artefact_reads(result.run_dir)
        if index + 1 < len(KILLS):
            monkeypatch.setenv(CRASH_ENV, KILLS[index + 1][0])
        else:
            monkeypatch.delenv(CRASH_ENV)
        result = _resume(result.resume, reports)
        survived += 1
    assert result.ok, result.steps
    assert survived == len(KILLS)
    leftovers = [p for pattern in runs.TEMPORARY_PATTERNS for p in result.run_dir.rglob(pattern)]
    assert not leftovers, leftovers
    comparison = compare_runs(smoke_run, result.run_dir)
    assert comparison.agree, comparison.to_text()
