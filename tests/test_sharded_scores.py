"""Notebook 04's scoring of the test split (:func:`dfd_lib.evaluation.comparison.score_experts`, which
:func:`~dfd_lib.evaluation.comparison.headline_comparison` calls) by the processes of ``accelerate
launch --multi_gpu --num_processes 2`` (two CPU processes over gloo): each scores whole batches
``r, r+N, ...`` and every process gets the one-process table, bit for bit (the same batches, one thread
each), an unreadable image's NaN in its place."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from test_expert_scores import models, table  # noqa: F401 (fixtures)

from dfd_lib.core.paths import PROJECT_ROOT

SCRIPT = """
import json, sys
import pandas as pd
from dfd_lib.core.shards import ShardGroup, world_size
from dfd_lib.evaluation.comparison import score_experts
files, table, out = json.loads(sys.argv[1]), pd.read_csv(sys.argv[2]), sys.argv[3]
shards = ShardGroup("cpu") if world_size() > 1 else None
scores = score_experts(files, table, batch_size=4, device="cpu", progress=False, shards=shards)
if shards is None or shards.is_main:
    scores.to_csv(out)
if shards is not None:
    shards.close()
"""


def run_scores(script, args: list[str], processes: int) -> subprocess.CompletedProcess:
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"] if processes == 2 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DFD_EVAL_BACKEND": "torch", "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, *launch, str(script), *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.slow
def test_two_processes_score_the_test_split_as_one(models, table, tmp_path):  # noqa: F811
    files = {name: str(path) for name, path in models[0].items()}
    script, table_csv = tmp_path / "score.py", tmp_path / "test.csv"
    script.write_text(SCRIPT)
    table.to_csv(table_csv, index=False)
    for processes in (1, 2):
        done = run_scores(script, [json.dumps(files), str(table_csv), str(tmp_path / f"{processes}.csv")], processes)
        assert done.returncode == 0, done.stderr[-6000:]
    one, two = (pd.read_csv(tmp_path / f"{n}.csv", index_col=0) for n in (1, 2))
    assert len(one) == 11 and one.iloc[-1].isna().all() and one.iloc[:-1].notna().all().all()  # broken.png: NaN
    pd.testing.assert_frame_equal(one, two, check_exact=True)
