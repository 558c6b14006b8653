"""The OpenVINO and ONNX Runtime backends (issue 16): the released-format 7-expert checkpoint scores
through ``dfd predict --backend openvino`` within 1e-5 of torch, the export is cached and reused,
a stale one (weights changed) is never used, int8 is a separate, explicit model, and a missing
package is named with the command that installs it. Small scale: the demo's backbone at 64 px."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage import data as skdata
from test_checkpoints import make_released
from test_export_rewrites import sensitive_mixture

from dfd_lib.cli import main as dfd_main
from dfd_lib.models.checkpoints import CheckpointError, save_mixture
from dfd_lib.models.experts import build_mixture
from dfd_lib.models.released import load_released
from dfd_lib.scoring.backends import BackendUnavailable, require

DEMO_BACKBONE = "tf_efficientnet_lite0"
TOLERANCE = 1e-5
EXPERT_COLUMNS = [f"prob_expert_{i}" for i in range(7)]


@pytest.fixture(scope="module")
def released_moe(tmp_path_factory) -> Path:
    """The released format (weight.pth + ema.state, 7 experts, EMA differing from the raw weights),
    converted to ours at 64 px like tests/test_predict_command.py does, to stay fast."""
    released = tmp_path_factory.mktemp("released")
    make_released(released, backbones=[DEMO_BACKBONE] * 7, seed=5)
    model, config = load_released(released, [DEMO_BACKBONE] * 7)
    out = tmp_path_factory.mktemp("moe")
    save_mixture(model, out, dataclasses.replace(config, image_size=64))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    Image.fromarray(skdata.astronaut()).save(root / "astronaut.jpg", quality=85)
    Image.fromarray(skdata.chelsea()).save(root / "chelsea.png")
    Image.fromarray(skdata.coffee()[:90, :70]).save(root / "coffee_small.jpg")
    (root / "truncated.jpg").write_bytes((root / "astronaut.jpg").read_bytes()[:1500])
    return root


def small_mixture(directory: Path, seed: int, backbones=("test_efficientnet",), size: int = 32) -> Path:
    torch.manual_seed(seed)
    model = build_mixture(list(backbones))
    with torch.no_grad():
        for expert in model.experts:
            expert.baseline_extractor.get_classifier().weight.mul_(0.05)
    from dfd_lib.models.checkpoints import MixtureConfig

    return save_mixture(model, directory, MixtureConfig(backbones=list(backbones), image_size=size))


def scores(csv: Path) -> pd.DataFrame:
    return pd.read_csv(csv, keep_default_na=False).set_index("path").sort_index()


# --------------------------------------------------------------------------- without the extra


def test_a_missing_backend_package_names_the_extra(monkeypatch, released_moe, folder, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without the extra looks like
    with pytest.raises(BackendUnavailable, match=r"pip install -e \.\[openvino\]"):
        require("openvino", "openvino")
    code = dfd_main(["predict", str(folder), "--weights", str(released_moe), "--out", str(tmp_path / "p.csv"),
                     "--backend", "openvino"])
    assert code == 2
    err = capsys.readouterr().err
    assert "openvino" in err and "pip install -e .[openvino]" in err
    assert not (released_moe / "exports").exists() or not any((released_moe / "exports").glob("openvino-*"))


# --------------------------------------------------------------------------- OpenVINO


@pytest.mark.slow
def test_released_checkpoint_scores_through_openvino_like_torch_and_the_export_is_reused(released_moe, folder, tmp_path, capsys):
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install -e .[openvino])")
    torch_csv, ov_csv, again_csv = tmp_path / "torch.csv", tmp_path / "ov.csv", tmp_path / "again.csv"
    assert dfd_main(["predict", str(folder), "--weights", str(released_moe), "--out", str(torch_csv), "--batch-size", "2"]) == 0
    assert dfd_main(["predict", str(folder), "--weights", str(released_moe), "--out", str(ov_csv), "--batch-size", "2",
                     "--backend", "openvino"]) == 0
    assert "one-off cost" in capsys.readouterr().err  # the first use converts, and says what that costs
    reference, converted = scores(torch_csv), scores(ov_csv)
    assert list(reference.index) == list(converted.index)
    assert converted.loc[str(folder / "truncated.jpg"), "error"] == reference.loc[str(folder / "truncated.jpg"), "error"] != ""
    ok = reference["error"] == ""
    assert ok.sum() == 3
    for column in ["prob_fake", *EXPERT_COLUMNS]:
        difference = np.abs(reference.loc[ok, column].astype(float) - converted.loc[ok, column].astype(float))
        assert difference.max() <= TOLERANCE, column
    assert reference.loc[ok, "prob_fake"].astype(float).std() > 1e-3  # the images score differently: a real comparison

    (export,) = (released_moe / "exports").glob("openvino-fp32-*")
    meta = json.loads((export / "export.json").read_text())
    assert meta["identity"]["image_size"] == 64 and meta["identity"]["backbones"] == [DEMO_BACKBONE] * 7
    stamp = (export / "model.xml").stat().st_mtime_ns, (export / "model.bin").stat().st_mtime_ns
    assert dfd_main(["predict", str(folder), "--weights", str(released_moe), "--out", str(again_csv),
                     "--backend", "openvino"]) == 0
    assert "one-off cost" not in capsys.readouterr().err  # the second start loads the cached export
    assert [p.name for p in (released_moe / "exports").iterdir()] == [export.name]
    assert ((export / "model.xml").stat().st_mtime_ns, (export / "model.bin").stat().st_mtime_ns) == stamp
    assert np.abs(scores(again_csv).loc[ok, "prob_fake"].astype(float) - converted.loc[ok, "prob_fake"].astype(float)).max() == 0


@pytest.mark.slow
def test_the_openvino_predictor_loads_torch_only_when_asked(released_moe, folder):
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install -e .[openvino])")
    from dfd_lib.scoring.explain import explain_tensor
    from dfd_lib.scoring.predictor import Predictor

    predictor = Predictor.load(released_moe, backend="openvino", batch_size=3)
    assert predictor.backend == "openvino" and predictor._model is None and predictor.num_experts == 7
    tensor = predictor.load_tensor(str(folder / "chelsea.png"))
    explanation = explain_tensor(predictor, tensor, experts=[0])  # Grad-CAM needs the torch mixture: loaded now
    assert predictor._model is not None
    torch_predictor = Predictor.load(released_moe)
    assert abs(explanation.prob - torch_predictor.predict_one(str(folder / "chelsea.png")).prob) <= TOLERANCE


@pytest.mark.slow
def test_a_stale_export_is_never_used(tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install -e .[openvino])")
    from dfd_lib.scoring.export import ensure_export
    from dfd_lib.scoring.predictor import Predictor

    weights = small_mixture(tmp_path / "moe", seed=0)
    first = ensure_export(weights, "openvino")
    assert first.converted and not ensure_export(weights, "openvino").converted
    state = load_file(str(weights / "model.safetensors"))
    head = next(k for k in state if k.endswith("classifier.bias"))
    state[head] = state[head] + torch.tensor([-2.0, 2.0])  # other weights, same shapes: the old export is now wrong
    save_file(state, str(weights / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no up-to-date openvino export"):
        ensure_export(weights, "openvino", convert=False)
    image = skdata.astronaut()
    converted = Predictor.load(weights, backend="openvino").predict_one(image)
    assert converted.prob == pytest.approx(Predictor.load(weights).predict_one(image).prob, abs=TOLERANCE)
    assert not first.folder.exists()  # replaced, not kept beside the new one
    assert [p.name for p in (weights / "exports").iterdir()] != [first.folder.name]


@pytest.mark.slow
def test_an_export_written_elsewhere_is_found_with_export_dir(tmp_path, folder, capsys):
    """`dfd export --out DIR` then `dfd predict --export-dir DIR`: the export is used, nothing is
    converted again beside the weights, and the scores are torch's."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install -e .[openvino])")
    weights, exports = small_mixture(tmp_path / "moe", seed=4), tmp_path / "exports-elsewhere"
    assert dfd_main(["export", str(weights), "--out", str(exports)]) == 0
    (export,) = exports.glob("openvino-fp32-*")
    stamp = (export / "model.bin").stat().st_mtime_ns
    capsys.readouterr()
    ov_csv, torch_csv = tmp_path / "ov.csv", tmp_path / "torch.csv"
    assert dfd_main(["predict", str(folder), "--weights", str(weights), "--out", str(ov_csv), "--backend", "openvino",
                     "--export-dir", str(exports)]) == 0
    assert "one-off cost" not in capsys.readouterr().err
    assert not (weights / "exports").exists() and (export / "model.bin").stat().st_mtime_ns == stamp
    assert dfd_main(["predict", str(folder), "--weights", str(weights), "--out", str(torch_csv)]) == 0
    converted, reference = scores(ov_csv), scores(torch_csv)
    ok = reference["error"] == ""
    assert ok.sum() == 3
    assert np.abs(converted.loc[ok, "prob_fake"].astype(float) - reference.loc[ok, "prob_fake"].astype(float)).max() <= TOLERANCE


@pytest.mark.slow
def test_mixtures_sharing_an_export_folder_keep_their_exports(tmp_path):
    """One --export-dir for two mixtures: each keeps its export (no conversion on every switch); new
    weights in one folder replace that folder's export only."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install -e .[openvino])")
    from dfd_lib.scoring.export import ensure_export

    shared = tmp_path / "exports"
    first, second = small_mixture(tmp_path / "first", seed=0), small_mixture(tmp_path / "second", seed=1)
    exports = {name: ensure_export(weights, "openvino", out=shared) for name, weights in (("first", first), ("second", second))}
    assert all(export.converted for export in exports.values())
    assert {p.name for p in shared.glob("openvino-fp32-*")} == {export.folder.name for export in exports.values()}
    again = ensure_export(first, "openvino", out=shared, convert=False)  # the second's conversion kept it
    assert not again.converted and again.folder == exports["first"].folder
    assert json.loads((again.folder / "export.json").read_text())["weights_dir"] == str(first.resolve())

    state = load_file(str(first / "model.safetensors"))
    head = next(k for k in state if k.endswith("classifier.bias"))
    save_file({**state, head: state[head] + torch.tensor([-1.0, 1.0])}, str(first / "model.safetensors"),
              metadata={"format": "pt"})  # the first mixture retrained in place
    renewed = ensure_export(first, "openvino", out=shared)
    assert renewed.converted and not exports["first"].folder.exists()  # its own old export is gone
    assert exports["second"].folder.is_dir() and not ensure_export(second, "openvino", out=shared).converted


@pytest.mark.slow
def test_int8_is_a_separate_model_made_only_when_asked(tmp_path, folder):
    pytest.importorskip("nncf", reason="the openvino extra (nncf) is not installed (pip install -e .[openvino])")
    from dfd_lib.scoring.predictor import Predictor

    weights = small_mixture(tmp_path / "moe", seed=1)
    with pytest.raises(CheckpointError, match="--int8 --calibration"):
        Predictor.load(weights, backend="openvino", int8=True)
    assert dfd_main(["export", str(weights), "--int8", "--calibration", str(folder)]) == 0
    (int8,) = (weights / "exports").glob("openvino-int8-*")
    assert json.loads((int8 / "export.json").read_text())["calibration_images"] == 3  # the truncated file skipped
    assert "FakeQuantize" in (int8 / "model.xml").read_text()
    image = skdata.chelsea()
    quantized = Predictor.load(weights, backend="openvino", int8=True).predict_one(image)
    fp32 = Predictor.load(weights, backend="openvino").predict_one(image)
    assert 0 <= quantized.prob <= 1 and fp32.prob == pytest.approx(Predictor.load(weights).predict_one(image).prob, abs=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_rewritten_convnext_experts_score_like_torch(tmp_path, backend):
    """The released architecture's ConvNeXt-V2 experts are rewritten before conversion
    (export_rewrites); with affines and layer scales far from their initial values the converted
    mixture still scores real photos within 1e-5 of torch."""
    pytest.importorskip(backend, reason="the openvino extra is not installed (pip install -e .[openvino])")
    from dfd_lib.models.checkpoints import MixtureConfig
    from dfd_lib.scoring.predictor import Predictor

    backbones = ["convnextv2_tiny", "test_convnext"]
    weights = save_mixture(sensitive_mixture(backbones, seed=3), tmp_path / "moe", MixtureConfig(backbones=backbones, image_size=64))
    images = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    converted = Predictor.load(weights, backend=backend, batch_size=2).predict(images)
    reference = Predictor.load(weights, batch_size=2).predict(images)
    assert np.std([p.prob for p in reference]) > 0.02  # the photos score differently: a real comparison
    for a, b in zip(converted, reference):
        assert np.allclose(a.expert_probs, b.expert_probs, atol=TOLERANCE, rtol=0)
    (meta,) = [json.loads(f.read_text()) for f in (weights / "exports").glob("*-fp32-*/export.json")]
    assert meta["rewrites"] == {"ChannelsFirstConvNeXtBlock": 27, "ChannelsFirstLayerNorm": 10}


# --------------------------------------------------------------------------- ONNX Runtime


@pytest.mark.slow
def test_onnxruntime_scores_like_torch(tmp_path):
    pytest.importorskip("onnxruntime", reason="the openvino extra (onnxruntime) is not installed (pip install -e .[openvino])")
    pytest.importorskip("onnx", reason="the openvino extra (onnx) is not installed (pip install -e .[openvino])")
    from dfd_lib.scoring.predictor import Predictor

    weights = small_mixture(tmp_path / "moe", seed=2, backbones=("test_efficientnet", "test_efficientnet"))
    images = [skdata.astronaut(), skdata.coffee(), skdata.rocket()]
    converted = Predictor.load(weights, backend="onnxruntime", batch_size=2).predict(images)
    reference = Predictor.load(weights, batch_size=2).predict(images)
    for a, b in zip(converted, reference):
        assert a.prob == pytest.approx(b.prob, abs=TOLERANCE)
        assert np.allclose(a.expert_probs, b.expert_probs, atol=TOLERANCE, rtol=0)
    assert len(list((weights / "exports").glob("onnx-fp32-*/model.onnx"))) == 1


# --------------------------------------------------------------------------- dfd serve


@pytest.mark.slow
def test_dfd_serve_scores_and_explains_with_openvino(tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install -e .[openvino])")
    import argparse
    import base64
    import io

    from fastapi.testclient import TestClient

    from dfd_lib.scoring.predictor import Predictor
    from dfd_lib.serving.cli import add_arguments, app_from_settings, settings_from_args

    weights = small_mixture(tmp_path / "moe", seed=3, backbones=("test_efficientnet", "test_efficientnet"))
    exports = tmp_path / "exports-elsewhere"
    buffer = io.BytesIO()
    Image.fromarray(skdata.coffee()).save(buffer, format="PNG")
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # dfd serve's own options
    args = parser.parse_args(["--weights", str(weights), "--backend", "openvino", "--threads", "1", "--export-dir", str(exports)])
    client = TestClient(app_from_settings(settings_from_args(args)))
    assert list(exports.glob("openvino-fp32-*/export.json")) and not (weights / "exports").exists()
    served = client.post("/predict", json={"image": base64.b64encode(buffer.getvalue()).decode()})
    assert served.status_code == 200
    reference = Predictor.load(weights).predict_one(skdata.coffee()).prob
    assert served.json()["result"] == pytest.approx(reference, abs=TOLERANCE)
    explained = client.post("/explain", files={"image": ("coffee.png", buffer.getvalue(), "image/png")})
    assert explained.status_code == 200  # Grad-CAM loads the torch mixture on first use
    assert explained.json()["result"] == pytest.approx(reference, abs=TOLERANCE)
