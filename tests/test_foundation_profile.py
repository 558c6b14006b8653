"""The full-foundation profile: `dfd check` names every model it lacks (the 7 CNNs' four architectures,
CLIP's ViT-L/14 for step 01 and as a LoRA expert, SigLIP as a frozen expert, two Stable Diffusion models)
with an empty Hugging Face cache and passes with one that holds them; `dfd fetch-weights` says offline
what it would fetch. The cache holds small stand-ins: both commands look the files up, never load them."""
from __future__ import annotations

import pytest
from hub_cache import cache_folder, cache_stand_in, use_hub_cache
from tuning_modes import NEEDS_TUNING_MODES

from dfd_lib.cli import main as dfd_main
from dfd_lib.models.backbones import canonical_backbone_name
from dfd_lib.models.experts import ORIGINAL_BACKBONES
from dfd_lib.pipeline.profiles import load_profile
from dfd_lib.synth import diffusion

CLIP, SIGLIP = "vit_large_patch14_clip_224.openai", "vit_base_patch16_siglip_224.webli"
SD = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-inpainting")
# the competition data is not here: the smoke demo instead, small training settings, one image per family
ON_THIS_MACHINE = ["-p", "dataset=demo-smoke", "-p", "labels_csv=", "-p", "val_dataset=", "-p", "val_labels_csv=",
                   "-p", "test_dataset=", "-p", "test_labels_csv=", "-p", "03.images_per_family=1",
                   "-p", "04.batch_size=2", "-p", "04.image_size=32"]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    return use_hub_cache(monkeypatch, tmp_path / "hf-home")


@pytest.fixture
def stand_in_cache(tmp_path, monkeypatch):
    hub = use_hub_cache(monkeypatch, tmp_path / "hf-home")
    for name in sorted({canonical_backbone_name(n) for n in (*ORIGINAL_BACKBONES, CLIP, SIGLIP)}):
        cache_stand_in(hub, name)
    tiny = diffusion.save_pipeline(diffusion.build_tiny_pipeline("img2img"), tmp_path / "sd")
    for repo in SD:
        cache_folder(hub, repo, tiny)
    return hub


def test_the_profile_is_the_full_method_plus_two_foundation_experts():
    full, foundation = load_profile("full"), load_profile("full-foundation")
    train = foundation["steps"]["04_train_moe"]
    assert train["backbones"] == full["steps"]["04_train_moe"]["backbones"] + [CLIP, SIGLIP]
    assert train["tunings"] == ["full"] * 7 + ["lora", "frozen"] and train["lora_rank"] == 8
    assert foundation["steps"]["01_features_umap"] == {"backbone": CLIP, "image_size": 0}
    assert foundation["steps"]["02_cluster_split"]["n_clusters"] == len(train["backbones"])
    assert foundation["params"] == {k: v for k, v in full["params"].items() if k != "backbone"}  # 01's: CLIP, above
    for step in ("03_sd_augment", "05_inference"):
        assert foundation["steps"][step] == full["steps"][step]


@NEEDS_TUNING_MODES
@pytest.mark.slow
def test_check_names_each_missing_model(empty_cache, capsys):
    assert dfd_main(["check", "--profile", "full-foundation", *ON_THIS_MACHINE]) == 1
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    missing = [line for line in problems if "not in the Hugging Face cache" in line]
    for name in ("convnextv2_tiny", "tf_efficientnet_b4", "tf_efficientnet_b5", "tf_efficientnet_b6", SIGLIP):
        assert sum(f"04_train_moe backbone {name}" in line for line in missing) == 1, name
    assert any(f"01_features_umap backbone {CLIP}" in line for line in missing)
    assert any(f"04_train_moe backbone {CLIP}" in line for line in missing)
    assert sum("Stable Diffusion" in line and "not in the Hugging Face cache" in line for line in problems) == 2
    assert len(problems) == 9, problems  # the models, nothing else
    assert f"training memory of a {CLIP} expert (lora: 3,147,778 of 306,327,554 parameters train) at 224 px" in out
    assert f"training memory of a {SIGLIP} expert (frozen: 1,538 of 92,885,762 parameters train) at 224 px" in out


@NEEDS_TUNING_MODES
@pytest.mark.slow
def test_check_passes_with_a_cache_that_holds_them(stand_in_cache, capsys):
    assert dfd_main(["check", "--profile", "full-foundation", *ON_THIS_MACHINE]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.count("backbone") >= 8 and out.count("hub:timm/") == 7  # 01's CLIP, and 04's 6 distinct backbones
    assert all(f"hub:{repo}@" in out for repo in SD) and "all checks passed" in out


@NEEDS_TUNING_MODES
def test_fetch_weights_offline_says_what_it_would_fetch(empty_cache, capsys):
    assert dfd_main(["fetch-weights", "--profile", "full-foundation"]) == 1
    out = capsys.readouterr().out
    assert out.count("MISSING") == 9 and "would fetch 9 item(s)" in out
    assert f"MISSING: 01_features_umap backbone {CLIP}:" in out and f"MISSING: 04_train_moe backbone {SIGLIP}:" in out


@NEEDS_TUNING_MODES
def test_fetch_weights_finds_them_in_the_cache(stand_in_cache, capsys):
    assert dfd_main(["fetch-weights", "--profile", "full-foundation"]) == 0
    assert "9 of 9 ready" in capsys.readouterr().out
