"""Every shipped profile is valid for the shipped notebooks: a dry run (parameters injected,
nothing executed) of smoke, demo, full and full-foundation, as `dfd pipeline --prepare-only` does."""
from __future__ import annotations

import json

import pytest
from tuning_modes import NEEDS_TUNING_MODES

from dfd_lib.core.paths import NOTEBOOKS_DIR, PIPELINES_DIR
from dfd_lib.pipeline.chain import run_pipeline
from dfd_lib.pipeline.profiles import load_profile
from dfd_lib.pipeline.steps import discover_steps


@pytest.mark.parametrize("profile", ["smoke", "demo", "full", pytest.param("full-foundation", marks=NEEDS_TUNING_MODES)])
def test_profile_dry_run_injects_every_parameter(profile, tmp_path):
    result = run_pipeline(profile, run=f"dry-{profile}", prepare_only=True, reports_dir=tmp_path, progress=False)
    steps = discover_steps(NOTEBOOKS_DIR)
    assert [s.step for s in result.steps] == [s.name for s in steps]
    assert all(s.status == "prepared" for s in result.steps)
    params = json.loads((result.run_dir / "params.json").read_text())["steps"]
    data = load_profile(profile, PIPELINES_DIR)
    for step in steps:
        injected = (result.run_dir / "notebooks" / step.path.name).read_text()
        assert "injected-parameters" in injected
        assert params[step.name]["run_dir"] == str(result.run_dir)
        for name, value in (data["steps"].get(step.name) or {}).items():
            assert params[step.name][name] == value
