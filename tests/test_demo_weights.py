"""Demo weights say what they are: notebook 01 records whether a run's images are the built-in demo
(``dataset.json``), notebook 04's data and mixture carry it into the mixture's provenance, and a
mixture so marked says "demo weights" in ``dfd predict``'s summary and CSV, ``/health``, the served
page and notebook 05's widget; the same mixture without the mark says none of it."""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data as skdata
from test_serve import make_tiny_weights

from dfd_lib.cli import main as dfd_main
from dfd_lib.core import runs
from dfd_lib.data.manifest import Manifest
from dfd_lib.data.resplit_table import save_resplits
from dfd_lib.models.checkpoints import CONFIG_FILE, read_config
from dfd_lib.models.demo_weights import DEMO_MARKER, DEMO_NOTICE, demo_notice, demo_provenance
from dfd_lib.scoring import widgets
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.serving.app import STATIC_DIR, create_app
from dfd_lib.sources import run_dataset
from dfd_lib.sources.run_dataset import DatasetSpec, prepare_run_dataset
from dfd_lib.training.training_data import load_training_data


def _weights(directory: Path, provenance: dict[str, str]) -> Path:
    make_tiny_weights(directory)
    config = dataclasses.replace(read_config(directory), provenance=provenance)
    (directory / CONFIG_FILE).write_text(config.to_json() + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module", params=["demo", "own data"])
def weights(request, tmp_path_factory) -> tuple[Path, bool]:
    """The same tiny mixture, once marked as demo weights, once trained on "the user's own data"."""
    demo = request.param == "demo"
    provenance = demo_provenance() if demo else {"trained_on": "/data/collection"}
    return _weights(tmp_path_factory.mktemp("moe"), provenance), demo


@pytest.fixture(scope="module")
def predictor(weights) -> Predictor:
    return Predictor.load(weights[0], malloc_tuning=False)


def test_the_notice_comes_from_the_provenance(weights):
    directory, demo = weights
    assert demo_notice(read_config(directory)) == (DEMO_NOTICE if demo else None)
    assert "dfd convert-weights" in DEMO_NOTICE and "dfd pipeline --profile" in DEMO_NOTICE


def test_dfd_predict_says_demo_weights_in_its_summary_and_csv(weights, tmp_path, capsys):
    directory, demo = weights
    image = tmp_path / "astronaut.png"
    Image.fromarray(skdata.astronaut()[::4, ::4]).save(image)
    out = tmp_path / "preds.csv"
    assert dfd_main(["predict", str(image), "--weights", str(directory), "--out", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    source = pd.read_csv(out, keep_default_na=False)["threshold_source"].tolist()
    if demo:
        assert DEMO_NOTICE in printed and source == [f"not calibrated; {DEMO_MARKER}"]
    else:
        assert DEMO_MARKER not in printed and source == ["not calibrated"]


def test_health_and_the_page_show_the_notice(predictor, weights):
    demo = weights[1]
    client = TestClient(create_app(predictor))
    health = client.get("/health").json()
    assert health["demo_weights"] is demo and health["notice"] == (DEMO_NOTICE if demo else None)
    assert health["threshold"]["source"].endswith(DEMO_MARKER) is demo
    page = client.get("/").text
    assert 'id="demo-notice"' in page and "hidden" in page.split('id="demo-notice"')[1].split(">")[0]
    script = client.get("/static/app.js").text
    assert "showNotice(health.notice)" in script and (STATIC_DIR / "app.js").read_text() == script
    raw = io.BytesIO()
    Image.fromarray(skdata.chelsea()[::4, ::4]).save(raw, format="PNG")
    answer = client.post("/predict?details=true", files={"image": ("c.png", raw.getvalue(), "image/png")}).json()
    assert (DEMO_MARKER in answer["threshold_source"]) is demo


def test_the_widget_shows_the_notice(predictor, weights):
    demo = weights[1]
    app = widgets.build_upload_app(predictor)
    shown = [child.value for child in app.widget.children if hasattr(child, "value") and isinstance(child.value, str)]
    assert any(DEMO_MARKER in text for text in shown) is demo


# --------------------------------------------------------------------------- what a run records


def _folder_dataset(table: pd.DataFrame, root: Path, per_label: int = 6) -> Path:
    for label, name in ((0, "real"), (1, "fake")):
        (root / name).mkdir(parents=True)
        for i, path in enumerate(table.loc[table["label"] == label, "path"].head(per_label)):
            shutil.copy(path, root / name / f"{i}{Path(path).suffix}")
    return root


def test_the_run_records_whether_its_dataset_is_the_demo(smoke_demo, tmp_path, monkeypatch):
    built = next(p for p in Path(smoke_demo.table["path"].iloc[0]).parents if (p / "build_info.json").is_file())
    monkeypatch.setattr(run_dataset, "demo_dir_for", lambda _size: built)  # the session's build, not data/demo-200
    demo_run = runs.open_run(tmp_path / "demo")
    prepare_run_dataset(demo_run, DatasetSpec(dataset="demo-smoke"))
    record = json.loads(demo_run.path(runs.DATASET).read_text())
    assert record == {"parts": {"dataset": "demo-smoke", "val_dataset": "", "test_dataset": ""}, "demo": True}
    assert run_dataset.dataset_provenance(demo_run) == demo_provenance()
    folder = str(_folder_dataset(smoke_demo.table, tmp_path / "mine"))
    own_run = runs.open_run(tmp_path / "own")
    prepare_run_dataset(own_run, DatasetSpec(dataset=folder, test_dataset="demo-smoke"))
    assert json.loads(own_run.path(runs.DATASET).read_text())["demo"] is False  # a demo test set trains nothing
    assert run_dataset.dataset_provenance(own_run) == {"trained_on": folder}


def test_notebook_04s_data_carries_the_record_and_an_older_run_has_none(tmp_path):
    run = runs.open_run(tmp_path / "run")
    rows = [{"path": f"{i}.png", "label": i % 2, "group": f"g{i}", "split": "test" if i >= 8 else "train", "cluster": i % 2}
            for i in range(12)]
    Manifest(pd.DataFrame(rows)).save(run.path(runs.MANIFEST))
    trainval = pd.DataFrame(rows[:8]).assign(resplit_0=lambda t: ["val" if c == 0 else "train" for c in t["cluster"]])
    save_resplits(trainval, run.path(runs.RESPLITS))
    assert load_training_data(run, use_augmented=False).provenance == {}  # written before dataset.json: not known
    run_dataset.write_dataset_record(run, DatasetSpec(dataset="demo"))
    assert load_training_data(run, use_augmented=False).provenance == demo_provenance()
