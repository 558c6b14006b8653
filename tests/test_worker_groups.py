"""The suite on several cores (``conftest.py``): a chain of tests never splits across workers."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _root_conftest():
    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_file_using_the_reference_run_shares_its_group():
    conftest = _root_conftest()
    users = {path.name for path in (ROOT / "tests").glob("test_*.py") if re.search(r"def \w+\([^)]*\bsmoke_run\b", path.read_text())}
    assert users == set(conftest.SMOKE_RUN_FILES)
    assert {conftest.worker_group(f"tests/{name}::test_x") for name in users} == {"smoke_run"}


def test_the_notebooks_are_one_group_and_other_files_their_own():
    conftest = _root_conftest()
    notebooks = {conftest.worker_group(f"reports/nbval-smoke/notebooks/0{i}_x.ipynb::Cell 3") for i in range(1, 6)}
    assert notebooks == {"notebooks"}
    assert conftest.worker_group("tests/test_incremental.py::test_a[1]") == "tests/test_incremental.py"
    assert conftest.worker_group("tests/test_logs.py::test_b") != conftest.worker_group("tests/test_bootstrap.py::test_c")


class _Worker:
    """What the scheduler sees of an xdist worker: it is sent test indexes and asked to shut down."""

    def __init__(self, name: str):
        self.gateway = type("Gateway", (), {"id": name})()
        self.shutting_down = False
        self.sent: list[int] = []

    def send_runtest_some(self, indexes):
        self.sent.extend(indexes)

    def shutdown(self):
        self.shutting_down = True


def _drain(scheduler, worker, collection, upto=None):
    """The worker runs what it was sent, in order, reporting each test (stops after ``upto`` tests)."""
    ran = []
    while worker.sent and (upto is None or len(ran) < upto):
        index = worker.sent.pop(0)
        ran.append(collection[index])
        scheduler.mark_test_complete(worker, index)
    return ran


def test_a_crashed_worker_neither_hangs_the_run_nor_reruns_its_test():
    conftest = _root_conftest()
    config = type("Config", (), {"option": type("Option", (), {"loadscopereorder": False})(),
                                 "getvalue": lambda self, name: ["2*popen"] if name == "tx" else None})()
    scheduler = conftest.WorkerGroupScheduling(config)
    collection = [f"tests/test_{name}.py::test_{i}" for name in "abcdefgh" for i in range(2)]
    first, second = _Worker("gw0"), _Worker("gw1")
    for worker in (first, second):
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    ran = _drain(scheduler, first, collection, upto=3)
    crashed = collection[first.sent[0]]
    assert scheduler.remove_node(first) == crashed  # reported failed by xdist
    replacement = _Worker("gw2")
    scheduler.add_node(replacement)
    scheduler.add_node_collection(replacement, collection)
    scheduler.schedule()
    while not (second.shutting_down and replacement.shutting_down) or second.sent or replacement.sent:
        progress = _drain(scheduler, second, collection) + _drain(scheduler, replacement, collection)
        ran += progress
        assert progress or (second.shutting_down and replacement.shutting_down), "workers idle with tests left: a hang"
    assert sorted(ran + [crashed]) == sorted(collection) and crashed not in ran  # every other test once


def test_the_heaviest_groups_are_dealt_first_in_their_order():
    conftest = _root_conftest()
    config = type("Config", (), {"option": type("Option", (), {"loadscopereorder": True})(),
                                 "getvalue": lambda self, name: ["2*popen"] if name == "tx" else None})()
    conftest.pytest_xdist_make_scheduler(config, None)
    assert config.option.loadscopereorder is False  # xdist's reordering by group size would undo the order below
    items = [type("Item", (), {"nodeid": nodeid})() for nodeid in
             ["tests/test_logs.py::test_a", "tests/test_full_mini.py::test_b", "reports/x/notebooks/01_a.ipynb::Cell 0",
              "tests/test_incremental.py::test_c", "tests/test_rerun_compare.py::test_d"]]
    conftest.pytest_collection_modifyitems(items)
    assert [conftest.worker_group(item.nodeid) for item in items] == [*conftest.HEAVY_FIRST, "tests/test_logs.py"]
