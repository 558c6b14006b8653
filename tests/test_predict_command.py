"""``dfd predict`` end to end: a folder of good and corrupt files, a glob, nothing scorable."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from skimage import data as skdata
from test_checkpoints import TINY, make_released

from dfd_lib.cli import main as dfd_main
from dfd_lib.models.checkpoints import save_mixture
from dfd_lib.models.released import load_released


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Our format, converted from a tiny released checkpoint, at 64 px to stay fast."""
    released = tmp_path_factory.mktemp("released")
    make_released(released, seed=2)
    model, config = load_released(released, TINY)
    out = tmp_path_factory.mktemp("moe")
    save_mixture(model, out, dataclasses.replace(config, image_size=64))
    return out


@pytest.fixture()
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(skdata.astronaut()).save(root / "astronaut.jpg", quality=85)
    Image.fromarray(skdata.chelsea()).save(root / "sub" / "chelsea.png")
    (root / "truncated.jpg").write_bytes((root / "astronaut.jpg").read_bytes()[:1500])
    (root / "sub" / "notes.png").write_text("this is text, not a PNG")
    (root / "readme.txt").write_text("ignored: not an image extension")
    return root


def test_predict_scores_a_folder_and_reports_corrupt_files(weights, folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    code = dfd_main(["predict", str(folder), "--weights", str(weights), "--out", str(out), "--batch-size", "3"])
    assert code == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["path", "kind", "frame", "prob_fake", "prob_fake_max", "frames_scored", "prob_expert_0",
                                   "prob_expert_1", "faces_found", "face_box", "faces", "error",
                                   "verdict", "threshold", "threshold_source"]
    by_name = {Path(p).name: row for p, row in zip(table["path"], table.to_dict("records"))}
    assert set(by_name) == {"astronaut.jpg", "chelsea.png", "truncated.jpg", "notes.png"}
    for good in ("astronaut.jpg", "chelsea.png"):
        assert by_name[good]["error"] == "" and 0 <= float(by_name[good]["prob_fake"]) <= 1
    assert "truncated" in by_name["truncated.jpg"]["error"]
    assert "not an image" in by_name["notes.png"]["error"]
    err = capsys.readouterr().err
    assert "truncated.jpg" in err and "notes.png" in err


def test_predict_accepts_globs_and_compat_mode(weights, folder, tmp_path):
    out = tmp_path / "glob.csv"
    assert dfd_main(["predict", str(folder / "**" / "*.png"), str(folder / "astronaut.jpg"),
                     "--weights", str(weights), "--out", str(out), "--preprocess", "compat", "--threads", "1"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert sorted(Path(p).name for p in table["path"]) == ["astronaut.jpg", "chelsea.png", "notes.png"]


def test_predict_fails_only_when_nothing_is_scorable(weights, folder, tmp_path, capsys):
    out = tmp_path / "none.csv"
    code = dfd_main(["predict", str(folder / "truncated.jpg"), str(folder / "sub" / "notes.png"),
                     "--weights", str(weights), "--out", str(out)])
    assert code != 0
    assert len(pd.read_csv(out)) == 2  # the reasons are still written down
    assert dfd_main(["predict", str(tmp_path / "nothing_here"), "--weights", str(weights)]) != 0
    assert "no such file or folder" in capsys.readouterr().err


def test_predict_explains_missing_weights(folder, tmp_path, capsys):
    code = dfd_main(["predict", str(folder), "--weights", str(tmp_path / "no_weights"), "--out", str(tmp_path / "p.csv")])
    assert code == 2
    assert "convert-weights" in capsys.readouterr().err


def test_predict_says_its_verdicts_are_not_calibrated(weights, folder, tmp_path, capsys):
    """A mixture never calibrated: verdicts at 0.5, and every row and the summary say so."""
    out = tmp_path / "preds.csv"
    assert dfd_main(["predict", str(folder), "--weights", str(weights), "--out", str(out), "--workers", "0"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    scored = table[table["error"] == ""]
    assert (scored["verdict"] == ["fake" if float(p) >= 0.5 else "real" for p in scored["prob_fake"]]).all()
    assert (table.loc[table["error"] != "", "verdict"] == "error").all()
    assert set(table["threshold_source"]) == {"not calibrated"} and set(table["threshold"]) == {0.5}
    assert "not calibrated" in capsys.readouterr().out
    assert dfd_main(["predict", str(folder), "--weights", str(weights), "--out", str(out), "--threshold", "2"]) == 2
    assert "threshold must be in [0, 1]" in capsys.readouterr().err
