"""Notebook tests: before collection, papermill parameterises the real notebooks with the
``smoke`` profile into ``reports/nbval-smoke/notebooks/`` (a dry run: nothing executes), so
``pytest --nbval-lax ... reports/nbval-smoke/notebooks`` then runs, in order, exactly the
notebooks a user opens, at smoke size, sharing one run folder as the pipeline would."""
from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# another name lets parallel sessions keep apart: DFD_NBVAL_RUN=nbval-x pytest --nbval-lax reports/nbval-x/notebooks
NBVAL_RUN = os.environ.get("DFD_NBVAL_RUN", "nbval-smoke")


def pytest_sessionstart(session):
    if not session.config.getoption("nbval_lax", default=False):
        return
    from dfd_lib.core.paths import REPORTS_DIR
    from dfd_lib.pipeline.chain import run_pipeline

    run_dir = REPORTS_DIR / NBVAL_RUN
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh chain every test session
    result = run_pipeline("smoke", run=NBVAL_RUN, prepare_only=True, progress=False)
    if not result.ok:
        raise RuntimeError(f"could not parameterise the notebooks: {result.steps}")
