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
    from dfd_lib.data.demo import DemoConfig, build_demo_dataset

    out = tmp_path_factory.mktemp("demo") / "demo"
    return build_demo_dataset(DemoConfig.smoke(), out, progress=False)
