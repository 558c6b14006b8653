"""Reproducible runs: a smoke run, its ``dfd rerun`` and ``dfd compare`` of the two; a changed
parameter and changed input data are told apart."""
from __future__ import annotations

import json
import shutil

import pytest

from dfd_lib.cli import main as dfd
from dfd_lib.core import runs
from dfd_lib.pipeline.chain import run_pipeline
from dfd_lib.pipeline.compare import compare_runs
from dfd_lib.pipeline.rerun import rerun
from dfd_lib.pipeline.steps import PipelineError


@pytest.fixture(scope="module")
def smoke_runs(smoke_run):
    again = rerun(smoke_run, "b", reports_dir=smoke_run.parent, progress=False, write_report=False)
    assert again.ok, again.steps
    return smoke_run, again.run_dir


def test_a_smoke_run_and_its_rerun_agree(smoke_runs, capsys):
    run_a, run_b = smoke_runs
    record_a, record_b = runs.read_params(run_a), runs.read_params(run_b)
    assert record_b["profile"] == record_a["profile"] == "smoke" and record_b["overrides"] == record_a["overrides"]
    comparison = compare_runs(run_a, run_b)
    assert comparison.agree, comparison.to_text()
    compared = {f.path for f in comparison.files}
    for name in ("manifest.csv", "resplits.csv", "augmented_manifest.csv", "tables/04_headline.csv", "weights/moe/model.safetensors"):
        assert name in compared
    assert len(comparison.metrics) > 50 and comparison.timings_skipped > 0
    assert dfd(["compare", str(run_a), str(run_b)]) == 0
    assert "the runs agree" in capsys.readouterr().out
    environment = json.loads((run_b / runs.ENVIRONMENT).read_text())
    assert any(line.startswith("torch==") for line in environment["pip_freeze"])
    assert {"cuda", "cudnn", "device", "git_commit", "git_dirty"} <= set(environment)
    assert list(environment["inputs"]) == ["demo-smoke"] and len(environment["inputs"]["demo-smoke"]) == 64


def test_compare_reports_a_changed_parameter(smoke_runs, tmp_path, capsys):
    run_a, run_b = smoke_runs
    changed = tmp_path / "c"
    shutil.copytree(run_b, changed)
    result = run_pipeline(run=str(changed), only="05", overrides={"05.threshold": "0.3"}, progress=False, write_report=False)
    assert result.ok
    assert dfd(["compare", str(run_a), str(changed)]) == 1
    text = capsys.readouterr().out
    assert "the runs DIFFER" in text and "tables/05_scores.csv" in text
    assert "05_inference.threshold: " in text and " vs 0.3 " in text


def test_rerun_stops_when_the_input_data_changed(smoke_runs, tmp_path):
    run_a, _ = smoke_runs
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(run_a / runs.PARAMS, old / runs.PARAMS)
    environment = json.loads((run_a / runs.ENVIRONMENT).read_text())
    environment["inputs"]["demo-smoke"] = "0" * 64  # as if the dataset had other images when the run was made
    (old / runs.ENVIRONMENT).write_text(json.dumps(environment))
    with pytest.raises(PipelineError, match="input data changed.*demo-smoke"):
        rerun(old, str(tmp_path / "new"), progress=False, write_report=False)
    assert (tmp_path / "new" / runs.MANIFEST).is_file()  # stopped after step 01, resumable with --force
    with pytest.raises(PipelineError, match="already holds a run"):
        rerun(old, str(tmp_path / "new"), progress=False)
