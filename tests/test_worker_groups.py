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
