"""Notebook tests: before collection, papermill parameterises the real notebooks with the
``smoke`` profile into ``reports/nbval-smoke/notebooks/`` (a dry run: nothing executes), so
``pytest --nbval-lax ... reports/nbval-smoke/notebooks`` then runs, in order, exactly the
notebooks a user opens, at smoke size, sharing one run folder as the pipeline would.

Run on several cores (``pytest -n auto --dist loadgroup``, as ``make test`` does), tests are dealt out in
groups that keep what must stay together on one worker, in order: the notebooks (one chain), every test
of the session's reference smoke run (so it is made once), and otherwise each test file (its
module-scoped fixtures and chains)."""
from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# another name lets parallel sessions keep apart: DFD_NBVAL_RUN=nbval-x pytest --nbval-lax reports/nbval-x/notebooks
NBVAL_RUN = os.environ.get("DFD_NBVAL_RUN", "nbval-smoke")


def pytest_sessionstart(session):
    if not session.config.getoption("nbval_lax", default=False) or hasattr(session.config, "workerinput"):
        return  # workers of pytest-xdist find the notebooks the controller prepared before starting them
    from dfd_lib.core.paths import REPORTS_DIR
    from dfd_lib.pipeline.chain import run_pipeline

    run_dir = REPORTS_DIR / NBVAL_RUN
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh chain every test session
    result = run_pipeline("smoke", run=NBVAL_RUN, prepare_only=True, progress=False)
    if not result.ok:
        raise RuntimeError(f"could not parameterise the notebooks: {result.steps}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))


def _group(item) -> str:
    """The worker group of a test (see the module's docstring)."""
    if item.path.suffix == ".ipynb":
        return "notebooks"
    if "smoke_run" in getattr(item, "fixturenames", ()):
        return "smoke_run"
    return item.path.stem
