"""Notebook tests: before collection, papermill parameterises the real notebooks with the
``smoke`` profile into ``reports/nbval-smoke/notebooks/`` (a dry run: nothing executes), so
``pytest --nbval-lax ... reports/nbval-smoke/notebooks`` then runs, in order, exactly the
notebooks a user opens, at smoke size, sharing one run folder as the pipeline would.

Run on several cores (``pytest -n auto``, as ``make test`` does: pytest-xdist), tests are dealt out in
groups that keep what must stay together on one worker, in order (:func:`worker_group`): the notebooks
(one chain), the files that use the session's reference smoke run (so it is made once), and otherwise
each test file (its module-scoped fixtures and chains). The heaviest groups are dealt first."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import PurePosixPath

import pytest

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is a dev tool: without it the suite runs on one core
    LoadScopeScheduling = None

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def share_the_cores_between_workers() -> None:
    """Under pytest-xdist, each worker (and every kernel and process it starts: they inherit the environment)
    plans for its share of the cores: ``DFD_CPUS`` and torch's ``OMP_NUM_THREADS``. Two workers of 2 OpenMP
    threads each on 2 cores spin against each other: one model ran 8x slower than with 1 thread each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers < 1:
        return  # one process: all the cores
    from dfd_lib.core.cpus import CPUS_ENV, available_cores

    share = max(1, available_cores() // workers)
    os.environ[CPUS_ENV] = str(share)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))
    if "torch" in sys.modules:  # imported by a plugin before this file: its thread count is already set
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


share_the_cores_between_workers()

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


SMOKE_RUN_FILES = ("test_crash_consistency.py", "test_full_disk.py", "test_localisation.py", "test_rerun_compare.py")  # use smoke_run
# heaviest first (worker-seconds on 2 workers, 2026-12-04: about 330, 240, 115 and 55)
HEAVY_FIRST = ("smoke_run", "tests/test_incremental.py", "tests/test_full_mini.py", "notebooks")


def worker_group(nodeid: str) -> str:
    """The group of workers' tests a test belongs to, from its node id."""
    path = PurePosixPath(nodeid.split("::", 1)[0])
    if path.suffix == ".ipynb":
        return "notebooks"
    if path.name in SMOKE_RUN_FILES:
        return "smoke_run"
    return str(path)


if LoadScopeScheduling is not None:
    class WorkerGroupScheduling(LoadScopeScheduling):
        """pytest-xdist's scope scheduling with :func:`worker_group` as the scope: a group goes whole to one worker."""

        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

        def remove_node(self, node):
            """A crashed worker: its test is reported failed and not run again (it may crash the next worker
            too), and only its groups' unfinished tests go back, first in the queue. xdist's own version requeues
            finished groups as well: a worker dealt one sends nothing back, is never dealt more, and the run
            hangs (seen in CI: one crash, then 90 minutes of nothing)."""
            workload = self.assigned_work.pop(node)
            unfinished = {scope: unit for scope, unit in workload.items() if not all(unit.values())}
            if not unfinished:
                return None
            crashed = next(nodeid for unit in unfinished.values() for nodeid, done in unit.items() if not done)
            for unit in unfinished.values():
                unit.pop(crashed, None)
            for scope, unit in reversed(list(unfinished.items())):
                if unit and not all(unit.values()):
                    self.workqueue[scope] = unit
                    self.workqueue.move_to_end(scope, last=False)
            for other in self.assigned_work:
                self._reschedule(other)
            return crashed

        def _reschedule(self, node) -> None:
            """Deal groups to ``node`` until it holds more than two tests to run (xdist deals one at most)."""
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            while self.workqueue and self._pending_of(self.assigned_work[node]) <= 2:
                self._assign_work_unit(node)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    # xdist would deal the groups by their number of tests (--loadscope-reorder, on by default), which put the
    # one-test full_mini group last, alone on one worker; the order of pytest_collection_modifyitems instead
    config.option.loadscopereorder = False
    return WorkerGroupScheduling(config, log)


def pytest_collection_modifyitems(items):
    """The heaviest groups first, in HEAVY_FIRST's order, so that the workers finish together (the order within
    a group is kept)."""
    items.sort(key=lambda item: _heaviness_rank(worker_group(item.nodeid)))


def _heaviness_rank(group: str) -> int:
    return HEAVY_FIRST.index(group) if group in HEAVY_FIRST else len(HEAVY_FIRST)
