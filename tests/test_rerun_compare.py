"""Reproducible runs: a smoke run, its ``dfd rerun`` and ``dfd compare`` of the two; a changed
parameter and changed input data are told apart."""
from __future__ import annotations

import contextlib
import json
import logging
import shutil

import pytest

from dfd_lib.cli import main as dfd
from dfd_lib.core import runs
from dfd_lib.core.paths import PIPELINES_DIR
from dfd_lib.pipeline.chain import run_pipeline
from dfd_lib.pipeline.compare import compare_runs
from dfd_lib.pipeline.rerun import rerun
from dfd_lib.pipeline.steps import PipelineError

pytestmark = pytest.mark.slow  # smoke pipelines: the full suite, not the fast tier


@pytest.fixture(scope="module")
def edited_profile_run(smoke_run, tmp_path_factory):
    """A copy of the smoke run whose profile file was edited after it ran (a copy of smoke.yaml)."""
    folder = tmp_path_factory.mktemp("edited")
    profile = folder / "smoke-edited.yaml"
    profile.write_text((PIPELINES_DIR / "smoke.yaml").read_text().replace("    epochs: 1\n", "    epochs: 3\n")
                       .replace("  images_per_family: 4\n", "  images_per_family: 6\n"))
    copy = folder / "a"
    shutil.copytree(smoke_run, copy)
    record = runs.read_params(copy)
    runs.write_params(copy, {**record, "profile": str(profile)})
    return copy


@pytest.fixture(scope="module")
def smoke_runs(smoke_run, edited_profile_run):
    with _captured_warnings() as warnings:
        again = rerun(edited_profile_run, "b", reports_dir=smoke_run.parent, progress=False, write_report=False)
    assert again.ok, again.steps
    return smoke_run, again.run_dir, warnings


@contextlib.contextmanager
def _captured_warnings():
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("dfd_lib")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_a_smoke_run_and_its_rerun_agree(smoke_runs, capsys):
    # the rerun is made from a copy whose profile file was edited since: it replays what the run recorded
    run_a, run_b, warnings = smoke_runs
    edited = [line for line in warnings if "changed since the run" in line]
    assert any("04_train_moe would now run with epochs=3 (recorded 1)" in line for line in edited), warnings
    assert any("03_sd_augment would now run with images_per_family=6 (recorded 4)" in line for line in edited), warnings
    record_b = runs.read_params(run_b)
    assert record_b["steps"]["04_train_moe"]["epochs"] == 1 and record_b["steps"]["03_sd_augment"]["images_per_family"] == 4
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
    run_a, run_b, _warnings = smoke_runs
    changed = tmp_path / "c"
    shutil.copytree(run_b, changed)
    result = run_pipeline(run=str(changed), only="05", overrides={"05.threshold": "0.3"}, progress=False, write_report=False)
    assert result.ok
    assert dfd(["compare", str(run_a), str(changed)]) == 1
    text = capsys.readouterr().out
    assert "the runs DIFFER" in text and "tables/05_scores.csv" in text
    assert "05_inference.threshold: " in text and " vs 0.3 " in text


def test_rerun_stops_when_the_input_data_changed(smoke_runs, tmp_path):
    run_a, _b, _warnings = smoke_runs
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
