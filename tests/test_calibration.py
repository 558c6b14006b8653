"""The calibrated verdict threshold: the FPR and EER rules on scores with a known ROC, the
config.json round trip (old files still load, the weights file untouched), and `dfd calibrate`
on a small mixture and real/ fake/ folders made here, whose threshold `dfd predict` and the
server then use."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data as skdata
from test_serve import b64, make_tiny_weights

from dfd_lib.cli import main as dfd_main
from dfd_lib.data.manifest import Manifest
from dfd_lib.models.checkpoints import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, read_config
from dfd_lib.scoring import calibration as cal
from dfd_lib.scoring import mixture_calibration
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.serving.app import create_app


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def overlapping_scores(n_real: int, n_fake: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Distinct scores whose classes overlap: reals ~ Beta(2, 5), fakes ~ Beta(5, 2)."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.beta(2, 5, n_real), rng.beta(5, 2, n_fake)])
    assert len(np.unique(scores)) == scores.size
    return np.repeat([0, 1], [n_real, n_fake]), scores


# --------------------------------------------------------------------------- choosing the threshold


@pytest.mark.parametrize("target", [0.0, 0.001, 0.01, 0.05, 0.2])
def test_the_fpr_rule_flags_as_many_fakes_as_the_target_allows(target):
    labels, scores = overlapping_scores(1000, 1000)
    reals, fakes = scores[labels == 0], scores[labels == 1]
    threshold = cal.threshold_at_fpr(labels, scores, target)
    fpr, tpr = cal.rates_at(labels, scores, threshold)
    assert fpr == pytest.approx(target, abs=1e-12)  # 1000 distinct real scores: every multiple of 0.001 is reachable
    assert tpr == (fakes >= threshold).mean()
    # lowest such threshold: the next real below it would push the FPR over the target
    assert (reals >= reals[reals < threshold].max()).mean() > target
    # halfway between two neighbouring scores, so it is nobody's score
    assert threshold not in set(scores)
    assert scores[scores > threshold].min() - threshold == pytest.approx(threshold - scores[scores < threshold].max())


def test_the_fpr_rule_on_a_small_set_rounds_down_and_may_flag_nothing():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.95, 0.8, 0.3])
    assert cal.rates_at(labels, scores, cal.threshold_at_fpr(labels, scores, 0.01)) == (0.0, 1 / 3)  # only 0.95 above every real
    assert cal.rates_at(labels, scores, cal.threshold_at_fpr(labels, scores, 0.34)) == (1 / 3, 1.0)
    top_real = np.array([0.99, 0.2, 0.7, 0.6])
    threshold = cal.threshold_at_fpr([0, 0, 1, 1], top_real, 0.0)  # the top score is a real's: flag nothing
    assert cal.rates_at([0, 0, 1, 1], top_real, threshold) == (0.0, 0.0) and threshold <= 1.0


def test_the_eer_rule_balances_the_two_errors():
    reals = np.linspace(0.0, 0.6, 601)  # fakes and reals overlap on [0.4, 0.6]: equal errors at 0.5
    fakes = np.linspace(0.4, 1.0, 601) + 1e-4
    labels, scores = np.repeat([0, 1], 601), np.concatenate([reals, fakes])
    calibration = cal.calibrate_scores(labels, scores, rule="eer")
    assert calibration.threshold == pytest.approx(0.5, abs=0.002)
    assert calibration.fpr == pytest.approx(1 - calibration.tpr, abs=2 / 601)
    assert calibration.fpr == pytest.approx(1 / 6, abs=0.003) and calibration.target_fpr is None


def test_one_class_or_bad_values_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="real and fake"):
        cal.calibrate_scores([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        cal.calibrate_scores([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="target_fpr"):
        cal.threshold_at_fpr([0, 1], [0.1, 0.9], 1.5)
    with pytest.raises(ValueError, match="rule"):
        cal.calibrate_scores([0, 1], [0.1, 0.9], rule="youden")


# --------------------------------------------------------------------------- config.json


def test_calibration_round_trips_through_config_json_and_old_configs_load(tmp_path):
    weights = make_tiny_weights(tmp_path / "moe")
    before = sha1(weights / WEIGHTS_FILE)
    old = json.loads((weights / CONFIG_FILE).read_text())
    old.pop("calibration", None)  # a config.json written before calibration existed
    (weights / CONFIG_FILE).write_text(json.dumps(old))
    config = read_config(weights)
    assert config.calibration == {} and cal.read_calibration(config) is None
    assert cal.resolve_threshold(config).source == cal.NOT_CALIBRATED and cal.resolve_threshold(config).value == 0.5

    labels, scores = overlapping_scores(200, 100, seed=3)
    calibration = cal.calibrate_scores(labels, scores, target_fpr=0.05, data="synthetic", data_hash="abc")
    cal.write_calibration(weights, calibration)
    assert sha1(weights / WEIGHTS_FILE) == before  # only config.json is rewritten
    assert not [p for p in weights.iterdir() if p.name.endswith(".tmp")]
    again = cal.read_calibration(read_config(weights))
    assert again == calibration and again.n_real == 200 and again.n_fake == 100 and again.fpr <= 0.05
    verdicts = cal.resolve_threshold(read_config(weights))
    assert (verdicts.source, verdicts.value) == (cal.CALIBRATED, calibration.threshold) and "synthetic" in verdicts.note
    given = cal.resolve_threshold(read_config(weights), 0.3)
    assert (given.source, given.value) == (cal.GIVEN, 0.3) and given.calibration == calibration
    with pytest.raises(ValueError, match="threshold"):
        cal.resolve_threshold(read_config(weights), 1.2)

    broken = json.loads((weights / CONFIG_FILE).read_text())
    broken["calibration"]["threshold"] = 1.5
    (weights / CONFIG_FILE).write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match="calibration needs a threshold"):
        read_config(weights)
    with pytest.raises(CheckpointError, match="not a dfd-kit mixture"):
        cal.write_calibration(tmp_path / "elsewhere", calibration)


def test_a_calibration_is_dropped_when_the_weights_beside_it_change(tmp_path, caplog):
    weights = make_tiny_weights(tmp_path / "moe")
    labels, scores = overlapping_scores(200, 100, seed=3)
    cal.write_calibration(weights, cal.calibrate_scores(labels, scores, target_fpr=0.05, data="synthetic"))
    assert cal.resolve_threshold(read_config(weights)).source == cal.CALIBRATED
    other = make_tiny_weights(tmp_path / "other", seed=1)  # another model's weights copied over these
    (weights / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    with caplog.at_level("WARNING", logger="dfd_lib"):
        config = read_config(weights)
    assert config.calibration == {} and "calibration was made for other weights" in caplog.text
    assert cal.resolve_threshold(config).source == cal.NOT_CALIBRATED


def test_calibrate_mixture_uses_the_scores_it_is_given_and_the_selection_rows(tmp_path):
    weights = make_tiny_weights(tmp_path / "moe")
    labels, scores = overlapping_scores(300, 300, seed=5)
    table = pd.DataFrame({"path": [f"img{i}.png" for i in range(600)], "label": labels, "prob_fake": scores,
                          "split": "val", "resplit_0": np.where(np.arange(600) % 2, "val", "train"),
                          "resplit_1": np.where(np.arange(600) % 2, "train", "val")})
    test_rows = table.assign(split="test", resplit_0="test", resplit_1="test").head(10)
    rows = mixture_calibration.selection_rows(pd.concat([table, test_rows], ignore_index=True))
    assert len(rows) == 600 and set(rows["split"]) == {"val"}  # held out by one re-split or the other, never test
    assert len(mixture_calibration.selection_rows(table, resplits=[0])) == 300
    check_labels, check_scores = overlapping_scores(100, 100, seed=6)
    calibration = mixture_calibration.calibrate_mixture(weights, rows, target_fpr=0.02, data="selection",
                                                        check=(check_labels, check_scores), check_data="test split",
                                                        figures_dir=tmp_path / "figures", figure_prefix="04_calibration")
    assert calibration.threshold == cal.threshold_at_fpr(labels, scores, 0.02)  # the given scores, not a model's
    assert calibration.check["fpr"] == cal.rates_at(check_labels, check_scores, calibration.threshold)[0]
    assert cal.read_calibration(read_config(weights)) == calibration
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"04_calibration_roc.png", "04_calibration_reliability.png"}
    table = mixture_calibration.summary_table(calibration)
    assert list(table.index) == ["calibration", "check"] and table.loc["check", "target_fpr"] == 0.02


# --------------------------------------------------------------------------- dfd calibrate -> dfd predict -> dfd serve


def write_labelled_folders(root: Path, count: int = 6) -> Path:
    """real/ and fake/ folders of crops of the package photos (labels are only folder names here)."""
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    rng = np.random.default_rng(0)
    for label in ("real", "fake"):
        (root / label).mkdir(parents=True)
        for i in range(count):
            photo = photos[(i + (label == "fake") * 2) % len(photos)]
            y, x = rng.integers(0, 100, 2)
            Image.fromarray(photo[y : y + 160, x : x + 160]).save(root / label / f"{label}{i}.png")
    return root


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, Path, cal.Calibration]:
    """A tiny mixture calibrated by `dfd calibrate` on real/ fake/ folders, checked on others."""
    root = tmp_path_factory.mktemp("calibrate")
    weights = make_tiny_weights(root / "moe")
    before = sha1(weights / WEIGHTS_FILE)
    data = write_labelled_folders(root / "selection")
    check = write_labelled_folders(root / "heldout", count=4)
    code = dfd_main(["calibrate", str(data), "--weights", str(weights), "--target-fpr", "0.2", "--check", str(check),
                     "--threads", "1", "--out", str(root / "figures")])
    assert code == 0
    assert sha1(weights / WEIGHTS_FILE) == before
    calibration = cal.read_calibration(read_config(weights))
    return weights, data, calibration


def test_dfd_calibrate_writes_the_threshold_its_roc_point_and_figures(calibrated, capsys):
    weights, data, calibration = calibrated
    assert calibration.rule == "fpr" and calibration.target_fpr == 0.2 and calibration.fpr <= 0.2
    assert (calibration.n_real, calibration.n_fake) == (6, 6) and str(data) in calibration.data
    assert len(calibration.data_hash) == 40 and calibration.date.startswith("20")
    assert calibration.check["n_real"] == 4 and 0 <= calibration.check["fpr"] <= 1
    figures = weights.parent / "figures"
    assert (figures / "calibration_roc.png").stat().st_size > 1000 and (figures / "calibration_reliability.png").is_file()
    # the same data gives the same threshold and hash
    assert dfd_main(["calibrate", str(data), "--weights", str(weights), "--target-fpr", "0.2", "--threads", "1",
                     "--out", str(figures)]) == 0
    again = cal.read_calibration(read_config(weights))
    assert (again.threshold, again.data_hash) == (calibration.threshold, calibration.data_hash)
    assert "threshold" in capsys.readouterr().out


def test_dfd_predict_gives_verdicts_at_the_calibrated_threshold(calibrated, tmp_path, capsys):
    weights, data, calibration = calibrated
    out = tmp_path / "preds.csv"
    assert dfd_main(["predict", str(data), "--weights", str(weights), "--out", str(out), "--workers", "0"]) == 0
    table = pd.read_csv(out)
    assert len(table) == 12 and (table["threshold"] == calibration.threshold).all()
    assert (table["threshold_source"] == cal.CALIBRATED).all()
    assert (table["verdict"] == np.where(table["prob_fake"] >= calibration.threshold, "fake", "real")).all()
    assert "calibrated" in capsys.readouterr().out
    # an explicit --threshold still wins
    assert dfd_main(["predict", str(data), "--weights", str(weights), "--out", str(out), "--workers", "0",
                     "--threshold", "0"]) == 0
    table = pd.read_csv(out)
    assert (table["verdict"] == "fake").all() and (table["threshold_source"] == cal.GIVEN).all()


def test_the_server_gives_verdicts_at_the_calibrated_threshold(calibrated):
    weights, data, calibration = calibrated
    client = TestClient(create_app(Predictor.load(weights, malloc_tuning=False)))
    info = client.get("/health").json()["threshold"]
    assert info["calibrated"] is True and info["source"] == cal.CALIBRATED and info["value"] == calibration.threshold
    assert info["calibration"]["target_fpr"] == 0.2 and info["calibration"]["n_real"] == 6
    images = [b64(path.read_bytes()) for path in sorted(data.rglob("*.png"))]
    body = client.post("/predict/batch", json={"images": images}).json()
    assert (body["threshold"], body["threshold_source"]) == (calibration.threshold, cal.CALIBRATED)
    for item in body["results"]:
        assert item["verdict"] == ("fake" if item["result"] >= calibration.threshold else "real")
    one = client.post("/predict?details=true", json={"image": images[0]}).json()
    assert one["verdict"] == body["results"][0]["verdict"] and one["threshold_source"] == cal.CALIBRATED
    assert list(client.post("/predict", json={"image": images[0]}).json()) == ["result"]  # the original contract


def test_dfd_calibrate_on_a_manifest_leaves_its_test_split_for_the_check(calibrated, tmp_path, capsys):
    weights = make_tiny_weights(tmp_path / "moe")
    rows = pd.DataFrame({"path": sorted(str(p) for p in calibrated[1].rglob("*.png"))})
    rows["label"] = [int("/fake/" in p) for p in rows["path"]]
    rows["split"] = ["test" if i % 3 == 0 else "val" for i in range(len(rows))]
    Manifest(rows).save(tmp_path / "manifest.csv")
    manifest = str(tmp_path / "manifest.csv")
    assert dfd_main(["calibrate", manifest, "--weights", str(weights), "--rule", "eer", "--check", manifest, "--threads", "1"]) == 0
    calibration = cal.read_calibration(read_config(weights))
    assert calibration.n_real + calibration.n_fake == int((rows["split"] != "test").sum())
    assert calibration.check["n_real"] + calibration.check["n_fake"] == int((rows["split"] == "test").sum())
    assert calibration.rule == "eer" and "[val]" in calibration.data and (weights / "calibration_roc.png").is_file()
    assert "check" in capsys.readouterr().out
    # --selection: only the rows a re-split held out (notebook 04's selection data)
    rows["resplit_0"] = ["val" if i % 2 else "train" for i in range(len(rows))]
    Manifest(rows).save(tmp_path / "resplits.csv")
    assert dfd_main(["calibrate", str(tmp_path / "resplits.csv"), "--selection", "--weights", str(weights), "--rule", "eer",
                     "--threads", "1"]) == 0
    calibration = cal.read_calibration(read_config(weights))
    held_out = (rows["resplit_0"] == "val") & (rows["split"] != "test")
    assert calibration.n_real + calibration.n_fake == int(held_out.sum()) and "held-out" in calibration.data


def test_dfd_calibrate_explains_what_it_cannot_use(calibrated, tmp_path, capsys):
    weights, data, _ = calibrated
    assert dfd_main(["calibrate", str(data), "--weights", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert dfd_main(["calibrate", str(data), "--weights", str(tmp_path / "empty")]) == 2
    assert "not a dfd-kit mixture" in capsys.readouterr().err
    only_real = tmp_path / "only_real"
    (only_real / "real").mkdir(parents=True)
    for path in sorted((data / "real").iterdir())[:3]:
        (only_real / "real" / path.name).write_bytes(path.read_bytes())
    assert dfd_main(["calibrate", str(only_real), "--weights", str(weights), "--threads", "1"]) == 2
    assert "real and fake" in capsys.readouterr().err
    assert dfd_main(["calibrate", str(data), "--weights", str(weights), "--target-fpr", "1.5"]) == 2


def test_the_upload_widget_starts_at_the_calibrated_threshold(calibrated):
    from dfd_lib.scoring import widgets

    weights, data, calibration = calibrated
    app = widgets.build_upload_app(Predictor.load(weights, malloc_tuning=False), with_heatmap=False)
    assert app.threshold.value == pytest.approx(calibration.threshold) and "calibrated" in app.threshold_note.value
    [result] = widgets.handle_upload(app, [{"name": "a.png", "content": (data / "real" / "real0.png").read_bytes()}])
    expected = "FAKE" if result.prediction.prob >= calibration.threshold else "REAL"
    assert expected in app.cards[0].verdict.value
    app.threshold.value = 0.0  # moving the slider recolours and says it was moved
    assert "FAKE" in app.cards[0].verdict.value and "moved here" in app.threshold_note.value
