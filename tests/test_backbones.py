"""Backbones build offline; lite0's packaged ImageNet weights predict real photos correctly."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from dfd_lib.modeling.backbones import (
    WeightsMismatchError,
    backbone_data_config,
    backbone_transform,
    create_backbone,
    lite0_imagenet_state_dict,
)

CAT_CLASSES = set(range(281, 286))
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def lite0_imagenet():
    return create_backbone("tf_efficientnet_lite0", pretrained=True, num_classes=1000).eval()


def _top5(model, photo) -> set[int]:
    x = backbone_transform(model)(Image.fromarray(photo)).unsqueeze(0)
    with torch.no_grad():
        return set(model(x).topk(5).indices[0].tolist())


def test_lite0_weights_recognise_cat_and_coffee(lite0_imagenet):
    assert _top5(lite0_imagenet, data.chelsea()) & CAT_CLASSES
    assert _top5(lite0_imagenet, data.coffee()) & COFFEE_CLASSES


def test_lite0_data_config_is_timms():
    cfg = backbone_data_config(create_backbone("tf_efficientnet_lite0", pretrained=False))
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875


def test_lite0_key_mapping_is_complete():
    import timm

    keys = set(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    assert set(lite0_imagenet_state_dict()) == keys


def test_lite0_with_new_head_keeps_backbone(lite0_imagenet):
    two_class = create_backbone("tf_efficientnet_lite0.in1k", num_classes=2)
    assert two_class.classifier.out_features == 2
    assert torch.equal(two_class.conv_stem.weight, lite0_imagenet.conv_stem.weight)
    assert create_backbone("tf_efficientnet_lite0")(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


def test_transform_follows_requested_size(lite0_imagenet):
    x = backbone_transform(lite0_imagenet, image_size=64)(Image.fromarray(data.chelsea()))
    assert x.shape == (3, 64, 64)


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    source = create_backbone("resnet10t", pretrained=False, num_classes=3)
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_backbone("resnet10t", num_classes=3, weights_path=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # The same file also gives a headless embedding model with the same trunk.
    trunk = create_backbone("resnet10t", num_classes=0, weights_path=path)
    assert torch.equal(trunk.conv1[0].weight, source.conv1[0].weight)


def test_pth_round_trip_and_mismatch(tmp_path):
    source = create_backbone("resnet10t", pretrained=False)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = create_backbone("resnet10t", weights_path=path)
    assert torch.equal(loaded.conv1[0].weight, source.conv1[0].weight)
    with pytest.raises(WeightsMismatchError, match="does not fit"):
        create_backbone("resnet14t", weights_path=path)


def test_unknown_name_and_missing_file_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'no_such_net'"):
        create_backbone("no_such_net")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        create_backbone("resnet10t", weights_path=tmp_path / "absent.safetensors")


def test_other_names_warn_and_build_random(caplog):
    model = create_backbone("resnet10t", pretrained=True)
    assert "no offline weights for 'resnet10t'" in caplog.text
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, model.num_features)
