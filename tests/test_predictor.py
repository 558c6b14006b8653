"""The Predictor against an independent re-implementation of the original inference."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata
from test_checkpoints import TINY, make_released
from torchvision import transforms

from dfd_lib.models.released import load_released
from dfd_lib.scoring.predictor import Predictor, tune_malloc

SIZE = 64  # the tiny experts run at 64 px; the format and the code path are the same as at 512


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("released")
    make_released(directory, seed=1)
    return directory


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    astronaut = skdata.astronaut()  # 512x512 RGB photo
    chelsea = skdata.chelsea()  # 300x451
    paths = [folder / "astronaut.jpg", folder / "chelsea.png", folder / "coffee_small.jpg"]
    Image.fromarray(astronaut).save(paths[0], quality=90)
    Image.fromarray(chelsea).save(paths[1])
    Image.fromarray(skdata.coffee()).resize((150, 97)).save(paths[2], quality=80)
    return paths


def original_reference(directory: Path, paths: list[Path], size: int) -> np.ndarray:
    """The original procedure written independently: timm models with the raw weights,
    each expert's shadow params copied into ``parameters()`` in order, OpenCV decoding,
    ToTensor -> Normalize -> Resize(antialias), softmax class 1, mean over experts."""
    state = torch.load(directory / "weight.pth", weights_only=True)
    ema = torch.load(directory / "ema.state", weights_only=True)
    transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        transforms.Resize((size, size), antialias=True),
    ])
    batch = torch.stack([transform(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)) for p in paths])
    probs = []
    for i, name in enumerate(TINY):
        net = timm.create_model(name, num_classes=2)
        prefix = f"{i}.baseline_extractor."
        net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        with torch.no_grad():
            for param, shadow in zip(net.parameters(), ema[i]["shadow_params"]):
                param.copy_(shadow)
            probs.append(net.eval()(batch).softmax(-1)[:, 1])
    return torch.stack(probs, 1).mean(1).numpy()


@pytest.fixture(scope="module")
def predictor(released) -> Predictor:
    model, config = load_released(released, TINY)
    return Predictor(model, dataclasses.replace(config, image_size=SIZE), preprocess="compat", batch_size=2)


def test_compat_probabilities_equal_the_original_procedure(predictor, released, image_files):
    expected = original_reference(released, image_files, SIZE)
    predictions = predictor.predict(image_files)
    got = np.array([p.prob for p in predictions])
    assert all(p.ok for p in predictions)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.ptp(expected) > 1e-4  # the images really score differently
    for p in predictions:
        assert len(p.expert_probs) == 2 and abs(np.mean(p.expert_probs) - p.prob) < 1e-6


def test_predictor_loads_the_released_folder_at_full_size(released, image_files):
    predictor = Predictor.load(released, backbones=TINY, preprocess="compat", batch_size=1, threads=2)
    assert predictor.config.image_size == 512 and predictor.device.type in ("cpu", "cuda")
    got = predictor.predict(image_files[:1])[0].prob
    np.testing.assert_allclose(got, original_reference(released, image_files[:1], 512)[0], rtol=0, atol=1e-5)


def test_every_input_kind_scores_the_same(predictor, image_files):
    path = image_files[1]  # PNG: Pillow and OpenCV decode identical pixels
    rgb = np.asarray(Image.open(path).convert("RGB"))
    sources = [path, str(path), path.read_bytes(), Image.open(path), rgb]
    probs = [p.prob for p in predictor.predict(sources)]
    np.testing.assert_allclose(probs, probs[0], rtol=0, atol=1e-6)
    default = dataclasses.replace(predictor.config)
    other = Predictor(predictor.model, default, preprocess="default", batch_size=3)
    np.testing.assert_allclose([p.prob for p in other.predict(sources)], probs[0], rtol=0, atol=1e-6)


def test_batch_size_does_not_change_the_scores(released, predictor, image_files):
    model, config = load_released(released, TINY)
    one_by_one = Predictor(model, dataclasses.replace(config, image_size=SIZE), preprocess="compat", batch_size=1,
                           channels_last=False)
    a = [p.prob for p in one_by_one.predict(image_files)]
    b = [p.prob for p in predictor.predict(image_files)]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_unreadable_inputs_are_reported_not_raised(predictor, image_files, tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(image_files[0].read_bytes()[:2000])
    sources = [tmp_path / "missing.jpg", b"definitely not an image", truncated, image_files[0],
               np.zeros((4, 4, 7), np.uint8)]
    predictions = predictor.predict(sources)
    assert [p.ok for p in predictions] == [False, False, False, True, False]
    assert "not found" in predictions[0].error
    assert "not an image" in predictions[1].error
    assert "truncated" in predictions[2].error
    assert predictions[2].prob is None and predictions[3].prob is not None
    assert predictions[1].source == "<bytes #1>"


def test_predict_paths_gives_a_table(predictor, image_files, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    table = predictor.predict_paths([*image_files, bad], progress=False)
    assert list(table.columns) == ["path", "prob_fake", "prob_expert_0", "prob_expert_1", "error"]
    assert table["error"].tolist()[:3] == ["", "", ""] and table["error"].iloc[3]
    assert table["prob_fake"].iloc[:3].between(0, 1).all() and np.isnan(table["prob_fake"].iloc[3])


def test_options_are_checked(predictor):
    with pytest.raises(ValueError, match="GPU-only"):
        Predictor(predictor.model, predictor.config, device="cpu", bf16=True)
    with pytest.raises(ValueError, match="preprocess"):
        Predictor(predictor.model, predictor.config, preprocess="fast")
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(predictor.model, predictor.config, batch_size=0)
    assert tune_malloc() in (True, False)
