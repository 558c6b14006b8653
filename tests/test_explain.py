"""Grad-CAM over the mixture against an independent re-implementation of Grad-CAM."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata

from dfd_lib.models.checkpoints import MixtureConfig
from dfd_lib.models.experts import build_mixture
from dfd_lib.scoring import explain
from dfd_lib.scoring.predictor import Predictor

BACKBONES = ["test_efficientnet", "resnet10t"]  # two families: the layer finder must handle both
SIZE = 64


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = build_mixture(BACKBONES)
    with torch.no_grad():
        for expert in model.experts:  # spread the logits so gradients are far from zero
            expert.baseline_extractor.get_classifier().weight.mul_(20.0)
    return Predictor(model, MixtureConfig(backbones=BACKBONES, image_size=SIZE, preprocess="default"))


@pytest.mark.parametrize("name, attribute", [
    ("test_efficientnet", "bn2"), ("resnet10t", "layer4"), ("convnextv2_atto", "norm_pre"),
])
def test_target_layer_is_the_last_feature_map(name, attribute):
    net = timm.create_model(name, num_classes=2).eval()
    assert explain.target_layer(net) is getattr(net, attribute)


def reference_gradcam(net: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Grad-CAM written from the paper: channel weights = spatial mean of d logit_fake / dA,
    map = ReLU(sum_k w_k A_k), min-max scaled, resized to the input."""
    captured = {}
    hook = layer.register_forward_hook(lambda m, i, out: captured.update(a=out))
    x = x.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = net(x)
            activation = captured["a"]
            grads = torch.autograd.grad(logits[:, 1].sum(), activation)[0]
    finally:
        hook.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * activation).sum(dim=1)).detach().numpy()
    out = []
    for cam in cams:
        cam = cam - cam.min()
        cam = cam / (1e-7 + cam.max())
        out.append(cv2.resize(cam, (x.shape[-1], x.shape[-2])))
    return np.stack(out)


def test_maps_equal_an_independent_gradcam_and_the_mixture_map_is_their_mean(predictor):
    images = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    batch = torch.stack([predictor.load_tensor(im) for im in images])
    maps = explain.gradcam_maps(predictor.model, batch)
    assert maps.shape == (3, 2, SIZE, SIZE) and maps.dtype == np.float32
    for i, expert in enumerate(predictor.model.experts):
        net = expert.baseline_extractor
        expected = reference_gradcam(net, explain.target_layer(net), batch)
        np.testing.assert_allclose(maps[:, i], expected, atol=1e-4)
        assert maps[:, i].max() > 0.5  # a live map, not all zeros
    result = explain.explain(predictor, images[0])
    np.testing.assert_allclose(result.cam, maps[0].mean(axis=0), atol=1e-5)
    assert not np.allclose(maps[0, 0], maps[1, 0])  # the map depends on the image


def test_explain_scores_match_the_predictor(predictor):
    image = skdata.chelsea()
    result = explain.explain(predictor, image)
    plain = predictor.predict_one(image)
    assert result.prob == plain.prob and result.expert_probs == plain.expert_probs
    only_second = explain.explain(predictor, image, experts=[1])
    assert len(only_second.expert_cams) == 1
    np.testing.assert_allclose(only_second.cam, result.expert_cams[1], atol=1e-6)
    with pytest.raises(ValueError, match="expert 2 does not exist"):
        explain.explain(predictor, image, experts=[2])


def test_overlay_puts_hot_colours_where_the_map_is_high(predictor):
    image = Image.fromarray(skdata.coffee())  # 600x400
    cam = np.zeros((SIZE, SIZE), np.float32)
    cam[:, : SIZE // 4] = 1.0  # hot on the left quarter only
    overlay = np.asarray(explain.overlay_heatmap(image, cam, alpha=1.0, max_side=300))
    assert overlay.shape == (200, 300, 3)  # shrunk to 300 px, aspect kept
    left, right = overlay[:, :50].reshape(-1, 3).mean(0), overlay[:, -50:].reshape(-1, 3).mean(0)
    assert left[0] > left[2] + 50 and right[2] > right[0] + 50  # jet: red where hot, blue where cold
    full = explain.gradcam_overlay(predictor, image, max_side=None)
    assert full.size == image.size and full.mode == "RGB"
    with pytest.raises(ValueError, match="alpha"):
        explain.overlay_heatmap(image, cam, alpha=1.5)


def test_a_bare_mixture_needs_its_config():
    model = build_mixture(["test_efficientnet"])
    with pytest.raises(ValueError, match="MixtureConfig"):
        explain.gradcam_overlay(model, skdata.astronaut())
    config = MixtureConfig(backbones=["test_efficientnet"], image_size=SIZE)
    assert explain.gradcam_overlay(model, skdata.astronaut(), config=config, max_side=128).size == (128, 128)
