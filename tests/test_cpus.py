"""The cores the kit plans its parallel work for: the process's CPU affinity, or DFD_CPUS."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dfd_lib.core.cpus import available_cores
from dfd_lib.scoring import expert_scores
from dfd_lib.scoring.stream import auto_workers


def test_the_affinity_unless_dfd_cpus_says_otherwise(monkeypatch):
    monkeypatch.delenv("DFD_CPUS", raising=False)
    assert available_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("DFD_CPUS", "3")
    assert available_cores() == 3
    for wrong in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("DFD_CPUS", wrong)
        with pytest.raises(ValueError, match="DFD_CPUS must be an int >= 1"):
            available_cores()


def test_the_parallel_work_is_planned_for_that_share(monkeypatch):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setenv("DFD_CPUS", "1")  # one test worker's share of 2 cores
        assert expert_scores.experts_at_once(8) == 1 and expert_scores.openvino_threads() == 1
        assert auto_workers(10_000) == 0  # no decoding process beside the model
        monkeypatch.setenv("DFD_CPUS", "4")
        assert expert_scores.experts_at_once(8) == 4 and expert_scores.openvino_threads() == 4
        assert auto_workers(10_000) == 3
    finally:
        torch.set_num_threads(before)


def test_test_workers_each_get_their_share_of_the_cores():
    """conftest.py gives each pytest-xdist worker its share: kernels and subprocesses inherit it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers < 1:
        pytest.skip("one test process: it has all the cores")
    share = max(1, len(os.sched_getaffinity(0)) // workers)
    assert os.environ["DFD_CPUS"] == str(share)
    # what a kernel or a subprocess started by this worker plans for (this process's torch threads may have been
    # changed by an earlier test, e.g. `dfd predict --threads 1` run in-process)
    code = "import torch; from dfd_lib.core.cpus import available_cores; print(torch.get_num_threads(), available_cores())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == [os.environ["OMP_NUM_THREADS"], str(share)]
