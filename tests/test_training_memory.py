"""`dfd check`'s training-memory estimate by tuning mode (full, frozen + head, LoRA): its arithmetic on a
tiny ViT, its ordering on the foundation experts of the full-foundation profile, and its lines."""
from __future__ import annotations

import pytest
import torch

from dfd_lib.models.experts import Expert
from dfd_lib.pipeline import memory, preflight

TINY_VIT = "test_vit.r160_in1k"  # 6 blocks of width 64, MLP 192, a fixed 160 px input
PARAMS = {"image_size": 32, "batch_size": 8, "kl_weight": 1.0, "lora_rank": 4}


def _expert(name: str) -> Expert:
    with torch.device("meta"):
        return Expert(name)


def test_the_parameter_counts_of_each_mode():
    expert = _expert(TINY_VIT)
    every = sum(p.numel() for p in expert.parameters())
    head = 64 * 2 + 2  # the 2-class linear head on 64 features
    # LoRA of rank 4 on each block's qkv (64->192), proj (64->64), fc1 (64->192), fc2 (192->64): rank * (in + out)
    adapters = 6 * 4 * ((64 + 192) + (64 + 64) + (64 + 192) + (192 + 64))
    assert memory.lora_parameters(expert, 4) == adapters
    full, frozen, lora = (memory.estimate_training_memory(TINY_VIT, PARAMS, mode) for mode in ("full", "frozen", "lora"))
    assert (full.weights, full.trainable) == (every, every)
    assert (frozen.weights, frozen.trainable) == (every, head)
    assert (lora.weights, lora.trainable) == (every + adapters, adapters + head)
    # weights and the EMA's copy; gradients and two AdamW moments of what trains; float32
    assert full.states == 5 * 4 * every
    assert frozen.states == 4 * (2 * every + 3 * head)
    assert lora.states == 4 * (2 * (every + adapters) + 3 * (adapters + head))


def test_the_arithmetic_of_an_estimate():
    full = memory.estimate_training_memory(TINY_VIT, PARAMS)
    assert full.side == 160  # a ViT trains at its own side, whatever 04's image_size
    assert full.images == 16  # 8 images and the KL term's noisy copy of each
    assert full.total == full.states + full.activations_per_image * 16
    assert memory.training_memory(TINY_VIT, PARAMS) == full.total
    half = memory.estimate_training_memory(TINY_VIT, PARAMS, half=True)
    assert half.activations == full.activations / 2 and half.states == full.states
    alone = memory.estimate_training_memory(TINY_VIT, {**PARAMS, "kl_weight": 0, "grad_accum_steps": 2})
    assert alone.images == 4 and alone.activations_per_image == full.activations_per_image  # 8 images in 2 micro-batches
    cnn = memory.estimate_training_memory("test_efficientnet", {**PARAMS, "image_size": 128})
    small = memory.estimate_training_memory("test_efficientnet", PARAMS)
    assert (cnn.side, small.side) == (128, 32)  # a CNN trains at 04's image_size
    assert cnn.activations_per_image == pytest.approx(small.activations_per_image * 16)  # scaled with the pixels


@pytest.mark.parametrize("name", [TINY_VIT, "vit_large_patch14_clip_224.openai", "vit_base_patch16_siglip_224.webli"])
def test_frozen_costs_less_than_lora_which_costs_less_than_full(name):
    params = {**PARAMS, "image_size": 512, "batch_size": 32, "lora_rank": 8}
    full, frozen, lora = (memory.estimate_training_memory(name, params, mode) for mode in ("full", "frozen", "lora"))
    assert frozen.total < lora.total < full.total
    # frozen keeps no backbone activations; LoRA keeps nearly all of them (its adapters need the layers' inputs)
    assert frozen.activations_per_image < 0.2 * lora.activations_per_image <= 0.2 * full.activations_per_image
    assert frozen.states < lora.states < full.states


def test_vit_large_at_224_px():
    """The figures README quotes (ViT-L/14 at 224 px, batch 32 with the KL term's copies, float32)."""
    params = {"image_size": 512, "batch_size": 32, "kl_weight": 1.0, "lora_rank": 8}
    full, frozen, lora = (memory.estimate_training_memory("vit_large_patch14_clip_224.openai", params, mode)
                          for mode in ("full", "frozen", "lora"))
    assert full.side == 224 and full.weights == 303_181_826  # CLIP ViT-L/14's 303 M and the 2-class head
    assert lora.trainable == 24 * 8 * ((1024 + 3072) + (1024 + 1024) + (1024 + 4096) + (4096 + 1024)) + 2050
    gib = [round(e.total / 2**30) for e in (full, lora, frozen)]
    assert gib == [36, 33, 3]


def test_tunings_per_backbone():
    backbones = {"backbones": ["a", "b", "c"]}
    assert memory.expert_tunings(backbones) == ["full"] * 3
    assert memory.expert_tunings({**backbones, "tunings": ["lora"]}) == ["lora"] * 3
    assert memory.expert_tunings({**backbones, "tunings": ["full", "lora", "frozen"]}) == ["full", "lora", "frozen"]
    with pytest.raises(ValueError, match="2 tunings for 3 backbones"):
        memory.expert_tunings({**backbones, "tunings": ["full", "lora"]})
    with pytest.raises(ValueError, match=r"unknown tuning mode\(s\) \['svd'\]"):
        memory.expert_tunings({**backbones, "tunings": ["svd"]})
    with pytest.raises(ValueError, match="unknown tuning mode"):
        memory.estimate_training_memory(TINY_VIT, PARAMS, "svd")


def test_dfd_check_estimates_each_expert_in_its_mode():
    params = {**PARAMS, "backbones": ["test_efficientnet", TINY_VIT, TINY_VIT], "tunings": ["full", "lora", "frozen"],
              "mixed_precision": "no"}
    report = preflight.Report()
    preflight._check_device_and_memory({"04_train_moe": params}, report)
    lines = [line for line in report.notes if "training memory" in line]
    assert len(lines) == 3 and not report.problems
    assert lines[0].startswith("04 training memory of a test_efficientnet expert at 32 px, batch 8: about ")
    assert lines[1].startswith(f"04 training memory of a {TINY_VIT} expert (lora: 21,634 of 327,874 parameters train) at 160 px")
    assert lines[2].startswith(f"04 training memory of a {TINY_VIT} expert (frozen: 130 of 306,370 parameters train) at 160 px")
    report = preflight.Report()
    preflight._check_device_and_memory({"04_train_moe": {**params, "tunings": ["lora", "full"]}}, report)
    assert report.problems == ["04 tunings: 2 tunings for 3 backbones: give one for all or one per backbone"]


@pytest.mark.parametrize(("tuning", "settings"), [("lora", {"lora_rank": 4}), ("effort", {"effort_rank": 2})])
def test_the_adapter_counts_match_the_trainings_own(tuning, settings):
    """The estimate's trainable parameters are those the training really trains in that mode
    (dfd_lib.training.tuning on a real tiny ViT, peft for LoRA)."""
    if tuning == "lora":
        pytest.importorskip("peft")
    from dfd_lib.training.tuning import apply_tuning

    torch.manual_seed(0)
    expert = Expert(TINY_VIT)
    apply_tuning(expert, tuning, lora_rank=settings.get("lora_rank", 8), effort_rank=settings.get("effort_rank", 1))
    trains = sum(p.numel() for p in expert.parameters() if p.requires_grad)
    estimate = memory.estimate_training_memory(TINY_VIT, {**PARAMS, **settings}, tuning)
    assert estimate.trainable == trains
    frozen, full = (memory.estimate_training_memory(TINY_VIT, PARAMS, mode) for mode in ("frozen", "full"))
    assert frozen.total < estimate.total < full.total
