"""Shared fixtures. Tests run offline: no hub access is ever attempted."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_demo(tmp_path_factory):
    """The demo dataset at smoke size, built once per test session."""
    from dfd_lib.sources.demo import DemoConfig, build_demo_dataset

    out = tmp_path_factory.mktemp("demo") / "demo"
    return build_demo_dataset(DemoConfig.smoke(), out, progress=False)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One uninterrupted run of the smoke profile (all five notebooks), made once per test session:
    the reference that reruns and interrupted runs are compared with."""
    from dfd_lib.pipeline.chain import run_pipeline

    reports = tmp_path_factory.mktemp("reports")
    result = run_pipeline("smoke", run="reference", reports_dir=reports, progress=False, write_report=False)
    assert result.ok, result.steps
    return result.run_dir
