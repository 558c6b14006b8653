"""Runs you can trust after a change: a run changed and run again recomputes exactly what its change
reaches, reuses the rest, and ends equal to a fresh run made with the final parameters.

One chain of smoke runs on a real/ fake/ folder dataset (so an image of it can be replaced): run A
with K=2, then ``--from 02`` with K=3 (a), then a notebook-05 parameter (c), then one image of the
dataset replaced (b); after each, ``dfd compare`` against a fresh run made with the same final
parameters. ``dfd status`` says what is stale, and why, along the way.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageOps

from dfd_lib.cli import main as dfd
from dfd_lib.core import runs
from dfd_lib.pipeline.chain import run_pipeline
from dfd_lib.training.training_state import find_state, read_progress

pytestmark = pytest.mark.slow
# the smoke profile, lighter where this test does not look: robustness, most augmented images, the ladder's second seed
LIGHT = {"04.robustness": "false", "03.images_per_family": "2", "04.ladder_seeds": "1"}


def _folder_dataset(table: pd.DataFrame, root: Path) -> None:
    for _, row in table.iterrows():
        family = "real" if row["label"] == 0 else f"fake/{row['family']}"
        target = root / family / Path(row["path"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(row["path"], target)


@pytest.fixture(scope="module")
def chain(smoke_demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    table = smoke_demo.table
    _folder_dataset(table[table["split"] != "test"], root / "data")
    _folder_dataset(table[table["split"] == "test"], root / "test")
    data = {"dataset": str(root / "data"), "test_dataset": str(root / "test"), **LIGHT}
    return {"root": root, "data": data, "reports": root / "reports"}


def _run(chain: dict, name: str, **options):
    result = run_pipeline(run=name, reports_dir=chain["reports"], progress=False, write_report=False, **options)
    assert result.ok, result.steps
    return result


def _statuses(result) -> dict[str, str]:
    return {s.step: s.status for s in result.steps}


def _trainings(run_dir: Path) -> dict[str, tuple[dict, int]]:
    """Every training of a run's 04: its key and when its best weights were written."""
    found = {}
    for progress_dir in sorted((run_dir / runs.EXPERTS_DIR).rglob("progress.json")):
        out_dir = progress_dir.parent.parent
        found[str(out_dir.relative_to(run_dir))] = (read_progress(find_state(out_dir)).key,
                                                   (out_dir / "best_ema.safetensors").stat().st_mtime_ns)
    return found


def _status(run_dir: Path, *params: str, capsys) -> tuple[int, str]:
    code = dfd(["status", str(run_dir), *[word for p in params for word in ("-p", p)]])
    return code, capsys.readouterr().out


def _current(status_text: str) -> int:
    """How many steps ``dfd status`` shows up to date."""
    return sum(line.endswith(" up to date") and line.startswith("0") for line in status_text.splitlines())


def _compare(run_a: Path, run_b: Path, capsys) -> str:
    code = dfd(["compare", str(run_a), str(run_b)])
    text = capsys.readouterr().out
    assert code == 0, text
    return text


def test_status_names_what_a_change_would_make_stale(chain, capsys):
    first = _run(chain, "a", profile="smoke", overrides={**chain["data"], "02.n_clusters": "2"})
    chain["a"] = first.run_dir
    chain["before"] = _trainings(first.run_dir)
    code, text = _status(first.run_dir, capsys=capsys)
    assert code == 0 and _current(text) == 5 and "every step is up to date" in text
    code, text = _status(first.run_dir, "02.n_clusters=3", capsys=capsys)
    assert code == 1
    lines = text.splitlines()
    assert lines[0].split() == ["01_features_umap", "up", "to", "date"]
    assert "02_cluster_split     stale" in text and "parameters changed: n_clusters: 2 -> 3" in text
    for later in ("03_sd_augment", "04_train_moe", "05_inference"):
        assert f"{later}" in text
    assert "upstream step 02_cluster_split will run first" in text and "4 step(s) to run" in text


def test_a_changed_resplit_retrains_exactly_the_trainings_whose_rows_changed(chain, capsys):
    run_a = chain["a"]
    manifest_made = (run_a / runs.MANIFEST).stat().st_mtime_ns
    resumed = _run(chain, "a", start="02", overrides={"02.n_clusters": "3"})
    assert _statuses(resumed) == {"02_cluster_split": "ok", "03_sd_augment": "ok", "04_train_moe": "ok", "05_inference": "ok"}
    assert (run_a / runs.MANIFEST).stat().st_mtime_ns == manifest_made  # 01 did not run
    assert json.loads((run_a / runs.METRICS).read_text())["02_cluster_split"]["k"] == 3
    before, after = chain["before"], _trainings(run_a)
    retrained = {name for name, (key, made) in after.items() if name in before and made != before[name][1]}
    changed = {name for name, (key, _made) in after.items() if name in before and key != before[name][0]}
    assert retrained == changed and changed and len(changed) < len(before)  # some rows changed, some did not
    assert "experts/official_split" not in changed and "experts/expert_0" in changed  # the official split's rows are not re-split
    assert "experts/expert_2" in after and "experts/expert_2" not in before
    fresh = _run(chain, "b", profile="smoke", overrides={**chain["data"], "02.n_clusters": "3", "05.heatmaps": "1"})
    chain["b"] = fresh.run_dir
    _compare(run_a, fresh.run_dir, capsys)


def test_a_notebook_05_parameter_reruns_only_05(chain, capsys):
    code, text = _status(chain["a"], "05.heatmaps=1", capsys=capsys)
    assert code == 1 and "05_inference         stale" in text and _current(text) == 4
    again = _run(chain, "a", overrides={"05.heatmaps": "1"})
    assert _statuses(again) == {"01_features_umap": "skipped", "02_cluster_split": "skipped", "03_sd_augment": "skipped",
                                "04_train_moe": "skipped", "05_inference": "ok"}
    assert json.loads((chain["a"] / runs.PARAMS).read_text())["steps"]["05_inference"]["heatmaps"] == 1
    _compare(chain["a"], chain["b"], capsys)
    assert _status(chain["a"], capsys=capsys)[0] == 0


def test_a_replaced_image_reruns_01_and_everything_after_it(chain, capsys):
    victim = sorted((chain["root"] / "data" / "real").glob("*.png"))[0]
    ImageOps.mirror(Image.open(victim).convert("RGB")).save(victim)  # the same file name, another image
    code, text = _status(chain["a"], capsys=capsys)
    assert code == 1 and "01_features_umap     stale" in text and "outside input changed: dataset (changed)" in text
    again = _run(chain, "a")
    assert set(_statuses(again).values()) == {"ok"}
    fresh = _run(chain, "d", profile="smoke", overrides={**chain["data"], "02.n_clusters": "3", "05.heatmaps": "1"})
    _compare(chain["a"], fresh.run_dir, capsys)
