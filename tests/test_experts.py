"""Experts, the mixture and EMA, on tiny timm architectures."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.utils import ModelEmaV3

from dfd_lib.models.backbones import canonical_backbone_name
from dfd_lib.models.experts import ORIGINAL_BACKBONES, Expert, MixtureOfExperts, build_mixture, create_ema

TINY = ["test_efficientnet", "resnet10t"]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, 3, 64, 64)


def test_expert_returns_logits_and_pooled_features_of_the_timm_model(images):
    expert = Expert("resnet10t").eval()
    out = expert(images)
    assert out["logits"].shape == (3, 2)
    assert out["features"].shape == (3, expert.num_features) == (3, 512)
    with torch.no_grad():
        reference = expert.baseline_extractor(images)
        pooled = expert.baseline_extractor.forward_head(
            expert.baseline_extractor.forward_features(images), pre_logits=True
        )
    torch.testing.assert_close(out["logits"], reference)
    torch.testing.assert_close(out["features"], pooled)


def test_expert_features_carry_gradients_for_the_contrastive_loss(images):
    expert = Expert("test_efficientnet").train()
    out = expert(images)
    out["features"].pow(2).mean().backward()
    grads = [p.grad for p in expert.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_deprecated_names_map_to_current_timm_names():
    assert canonical_backbone_name("tf_efficientnet_b4_ns") == "tf_efficientnet_b4.ns_jft_in1k"
    assert canonical_backbone_name("convnextv2_tiny.fcmae_ft_in1k") == "convnextv2_tiny.fcmae_ft_in1k"
    with pytest.raises(ValueError, match="unknown backbone"):
        canonical_backbone_name("no_such_net")


@pytest.mark.slow
def test_original_backbones_are_the_released_seven():
    assert len(ORIGINAL_BACKBONES) == 7
    assert [canonical_backbone_name(n) for n in ORIGINAL_BACKBONES] == list(ORIGINAL_BACKBONES)
    with torch.device("meta"):  # builds the full architecture without allocating it
        mixture = build_mixture()
    params = sum(p.numel() for p in mixture.parameters())
    assert 185e6 < params < 200e6, params
    assert mixture.backbones[2] == "tf_efficientnet_b4.ns_jft_in1k"


def test_mixture_prob_is_the_mean_of_expert_fake_probabilities(images):
    mixture = build_mixture(TINY).eval()
    with torch.no_grad():
        out = mixture(images)
        per_expert = torch.stack(
            [expert.baseline_extractor(images).softmax(-1)[:, 1] for expert in mixture.experts], dim=1
        )
    assert out["logits"].shape == (3, 2, 2)
    torch.testing.assert_close(out["expert_probs"], per_expert)
    torch.testing.assert_close(out["prob"], per_expert.mean(1))


def test_mixture_keys_and_the_released_layout(images):
    mixture = build_mixture(TINY).eval()
    keys = list(mixture.state_dict())
    assert keys[0].startswith("experts.0.baseline_extractor.")
    released = {k.removeprefix("experts."): v + 1.0 if v.is_floating_point() else v
                for k, v in mixture.state_dict().items()}
    assert next(iter(released)).startswith("0.baseline_extractor.")
    other = build_mixture(TINY)
    other.load_released_state_dict(released)
    for key, value in other.experts.state_dict().items():
        torch.testing.assert_close(value, released[key])
    with pytest.raises(ValueError):
        MixtureOfExperts([])


def test_build_mixture_checks_weights_paths():
    with pytest.raises(ValueError, match="2 backbones"):
        build_mixture(TINY, weights_paths=[None])


def test_ema_comes_from_timm_and_tracks_the_weights():
    model = timm.create_model("resnet10t", num_classes=2)
    ema = create_ema(model, decay=0.5)
    assert isinstance(ema, ModelEmaV3)
    before = next(ema.module.parameters()).detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=100)
    after = next(ema.module.parameters())
    torch.testing.assert_close(after, before + 0.5)
    with pytest.raises(ValueError, match="decay"):
        create_ema(model, decay=1.5)
