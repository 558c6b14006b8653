"""``dfd predict`` under ``accelerate launch --multi_gpu --num_processes 2`` (two CPU processes over
gloo on this machine): each scores every other file into its own part, process 0 merges them, and
the CSV is the one-process CSV: the same columns, rows, order and values."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data as skdata
from test_serve import make_tiny_weights

from dfd_lib.cli import main as dfd_main
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.scoring.sharding import Shards, merge_parts, part_path
from dfd_lib.scoring.stream import StreamOptions
from dfd_lib.scoring.videos import write_video


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("moe"))


def launch_two(args: list[str]) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dfd_lib.cli", "predict", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)


def assert_same_csv(one: Path, two: Path) -> None:
    a, b = (pd.read_csv(p, keep_default_na=False) for p in (one, two))
    assert list(a.columns) == list(b.columns)
    assert list(a["path"]) == list(b["path"]) and list(a["kind"]) == list(b["kind"])
    for column in a.columns:
        numbers = pd.to_numeric(a[column], errors="coerce")
        if column.startswith("prob_") and numbers.notna().any():
            np.testing.assert_allclose(numbers, pd.to_numeric(b[column], errors="coerce"), atol=1e-6, err_msg=column)
        else:
            assert list(a[column].astype(str)) == list(b[column].astype(str)), column


@pytest.mark.slow
def test_two_processes_write_the_one_process_csv(weights, tmp_path):
    folder = tmp_path / "inputs"
    (folder / "sub").mkdir(parents=True)
    astronaut = skdata.astronaut()
    for i in range(5):
        where = folder / "sub" if i % 2 else folder
        Image.fromarray(np.roll(astronaut, 37 * i, axis=1)).resize((96, 96)).save(where / f"img_{i}.png")
    Image.fromarray(skdata.coffee()).resize((80, 64)).save(tmp_path / "coffee.png")  # a second input, after the folder
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    write_video(folder / "drawn.avi", [np.full((64, 80, 3), 40 * i, np.uint8) for i in range(5)])
    inputs = [str(folder), str(tmp_path / "coffee.png")]
    common = ["--weights", str(weights), "--batch-size", "2", "--frames", "3", "--per-frame", "--workers", "0"]
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert dfd_main(["predict", *inputs, *common, "--out", str(one)]) == 0
    done = launch_two([*inputs, *common, "--out", str(two)])
    assert done.returncode == 0, done.stderr[-6000:]
    assert_same_csv(one, two)
    # not byte for byte: a process's model batches hold other files, so float32 sums round apart (~1e-8)
    assert not list(tmp_path.glob("two.csv.part-*"))  # the parts were merged and removed
    assert done.stdout.count("scored 7 of 8 files") == 1  # the summary once, for all files (one unreadable)
    assert "corrupt.png" in done.stderr

    # the CSV cut mid-line by a crash: --resume keeps its rows and scores the rest, as one process does
    lines = two.read_text().splitlines(keepends=True)
    cut = "".join(lines[:3]) + lines[3][:15]
    one.write_text(cut)
    two.write_text(cut)
    assert dfd_main(["predict", *inputs, *common, "--out", str(one), "--resume"]) == 0
    again = launch_two([*inputs, *common, "--out", str(two), "--resume"])
    assert again.returncode == 0, again.stderr[-6000:]
    assert_same_csv(one, two)
    assert again.stdout.count("2 already in the CSV") == 1

def test_merge_puts_rows_in_input_order_and_removes_the_parts(tmp_path):
    out = tmp_path / "x.csv"
    files = ["/a", "/b", "/c", "/d"]
    part_path(out, 0, 2).write_text("path,kind,prob_fake\n/a,video,0.5\n/a,frame,0.25\n/c,image,0.125\n")
    part_path(out, 1, 2).write_text('path,kind,prob_fake\n/b,image,0.75\n"/d,x",image,\n')
    merge_parts([part_path(out, r, 2) for r in range(2)], out, files + ["/d,x"])
    assert out.read_text() == ("path,kind,prob_fake\n/a,video,0.5\n/a,frame,0.25\n/b,image,0.75\n"
                               '/c,image,0.125\n"/d,x",image,\n')
    assert not list(tmp_path.glob("x.csv.part-*"))


class FirstOfTwo(Shards):
    """Process 0 of 2 alone in this process (its barriers have no one to wait for)."""

    def __init__(self):
        self.rank, self.processes, self.is_main = 0, 2, True

    def gather(self, value):
        return [value]


def test_resume_onto_other_columns_stops_before_anything_is_scored(weights, tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(skdata.astronaut()).resize((64, 64)).save(image)
    out = tmp_path / "x.csv"
    out.write_text("path,kind,prob_fake\n/elsewhere.png,image,0.5\n")
    predictor = Predictor.load(weights, device="cpu", batch_size=2)
    with pytest.raises(ValueError, match="its columns"):
        FirstOfTwo().score(predictor, [str(image)], out, StreamOptions(workers=0), resume=True, progress=False)
    assert not list(tmp_path.glob("x.csv.part-*"))  # found before scoring: no part was written
