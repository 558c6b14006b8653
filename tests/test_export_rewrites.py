"""The exact rewrites applied to the experts before conversion (dfd_lib/scoring/export_rewrites.py):
ConvNeXt blocks computed channels-first give the same logits on real photos, lose every permute,
leave other architectures alone, and are undone when they would change the outputs."""
from __future__ import annotations

import logging

import pytest
import torch
from skimage import data as skdata
from timm.layers.norm import LayerNorm2d
from timm.models.convnext import ConvNeXtBlock

from dfd_lib.data.preprocess import InputTransform
from dfd_lib.models.experts import build_mixture
from dfd_lib.scoring import export_rewrites
from dfd_lib.scoring.export_rewrites import ChannelsFirstConvNeXtBlock, ChannelsFirstLayerNorm, rewrite, rewrite_verified

SIZE = 64


def photos() -> torch.Tensor:
    transform = InputTransform(SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", True)
    return torch.stack([transform(image) for image in (skdata.astronaut(), skdata.chelsea(), skdata.coffee())])


def sensitive_mixture(backbones, seed: int = 0):
    """Random weights where every rewritten parameter matters: LayerNorm and GRN affines and layer
    scales far from their identity initialisation, and heads scaled so that the photos' probabilities
    differ and stay away from 0 and 1."""
    torch.manual_seed(seed)
    model = build_mixture(list(backbones)).eval().requires_grad_(False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".grn." in name or name.endswith("gamma"):
                parameter.normal_(0.0, 0.5)
            elif ("norm" in name or "stem.1" in name or "downsample.0" in name) and parameter.dim() == 1:
                parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
        x = photos()
        for expert in model.experts:  # logit differences of up to +-3 on the photos: probabilities spread over (0.05, 0.95)
            head = expert.baseline_extractor.get_classifier()
            margin = (lambda logits: logits[:, 1] - logits[:, 0])(expert(x)["logits"])
            factor = 3 / (margin - margin.mean()).abs().max()
            head.weight.mul_(factor)
            head.bias.mul_(factor)
            head.bias[1] -= factor * margin.mean()
    return model


def count(model, kind) -> int:
    return sum(type(m) is kind for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("backbones", [("convnextv2_tiny",), ("test_convnext", "test_convnext2")])
def test_channels_first_convnext_computes_the_same_function_without_permutes(backbones):
    model, x = sensitive_mixture(backbones), photos()
    blocks, norms = count(model, ConvNeXtBlock), count(model, LayerNorm2d)
    assert blocks and norms
    with torch.no_grad():
        before = model(x)
        traced_before = str(torch.jit.trace(lambda t: model(t)["logits"], x).graph)
    assert before["expert_probs"].std() > 0.05  # the photos score differently: a real comparison

    counts = rewrite_verified(model, SIZE)
    assert counts == {"ChannelsFirstConvNeXtBlock": blocks, "ChannelsFirstLayerNorm": norms}
    with torch.no_grad():
        after = model(x)  # a batch of three: the rewrites hold for any batch
        traced_after = str(torch.jit.trace(lambda t: model(t)["logits"], x).graph)
    scale = 1 + before["logits"].abs().max()
    assert ((after["logits"] - before["logits"]).abs().max() / scale) <= 1e-5
    assert (after["expert_probs"] - before["expert_probs"]).abs().max() <= 1e-5
    assert traced_before.count("aten::permute") >= 2 * blocks and traced_after.count("aten::permute") == 0


def test_other_architectures_are_left_alone():
    model = sensitive_mixture(("test_efficientnet",))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert rewrite_verified(model, SIZE) == {}
    assert count(model, ChannelsFirstConvNeXtBlock) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_rewrite_that_changes_the_outputs_is_undone(monkeypatch, caplog):
    model, x = sensitive_mixture(("convnextv2_tiny",), seed=1), photos()
    with torch.no_grad():
        before = model(x)["logits"]
    monkeypatch.setattr(export_rewrites, "global_response_norm_channels_first", lambda x, grn: x)  # a wrong rewrite
    with caplog.at_level(logging.WARNING, logger="dfd_lib.scoring.export_rewrites"):
        assert rewrite_verified(model, SIZE) == {}
    assert "converting it unchanged" in caplog.text
    assert count(model, ChannelsFirstConvNeXtBlock) == count(model, ChannelsFirstLayerNorm) == 0
    assert count(model, ConvNeXtBlock) == 18
    with torch.no_grad():
        assert torch.equal(model(x)["logits"], before)


def test_undo_restores_every_module():
    model = sensitive_mixture(("test_convnext",))
    names = [(name, type(module)) for name, module in model.named_modules()]
    rewrites = rewrite(model)
    assert rewrites.replaced and [(n, type(m)) for n, m in model.named_modules()] != names
    rewrites.undo()
    assert [(name, type(module)) for name, module in model.named_modules()] == names
