"""The standard way to weights, offline: `dfd check` lists what a run lacks before it starts, `dfd
fetch-weights` says what it would download, and Stable Diffusion loads by hub id from the cache."""
from __future__ import annotations

import time

import pytest
import yaml
from hub_cache import cache_folder, cache_timm_weights, use_hub_cache

from dfd_lib.cli import main as dfd_main
from dfd_lib.models.experts import ORIGINAL_BACKBONES
from dfd_lib.synth import diffusion

TINY_SD = "dfd-tests/tiny-stable-diffusion"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    return use_hub_cache(monkeypatch, tmp_path / "hf-home")


@pytest.fixture
def full_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding the four original backbones and a tiny Stable Diffusion model."""
    hub = use_hub_cache(monkeypatch, tmp_path / "hf-home")
    for name in sorted(set(ORIGINAL_BACKBONES)):
        cache_timm_weights(hub, name)
    cache_folder(hub, TINY_SD, diffusion.save_pipeline(diffusion.build_tiny_pipeline("img2img"), tmp_path / "sd"))
    return hub


def _profile(tmp_path, **steps) -> str:
    """A profile like full's at a miniature size, on the smoke demo dataset."""
    profile = {"params": {"dataset": "demo-smoke", "image_size": 32, "batch_size": 2, "num_workers": 0},
               "steps": {"03_sd_augment": {"sd_checkpoint": TINY_SD, "images_per_family": 1},
                         "04_train_moe": {"backbones": list(ORIGINAL_BACKBONES), "batch_size": 2}, **steps}}
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


@pytest.mark.slow
def test_check_of_the_full_profile_lists_what_this_machine_lacks(empty_cache, capsys):
    started = time.perf_counter()
    assert dfd_main(["check", "--profile", "full"]) == 1
    seconds = time.perf_counter() - started
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    for role in ("dataset", "val_dataset", "test_dataset"):
        assert any(line.startswith(f"PROBLEM: {role} not found") for line in problems)
    for name in ("convnextv2_tiny", "tf_efficientnet_b4", "tf_efficientnet_b5", "tf_efficientnet_b6"):
        assert any(name in line and "not in the Hugging Face cache" in line for line in problems), name
    assert sum("Stable Diffusion" in line for line in problems) == 2
    assert seconds < 60  # seconds, not hours into a run


@pytest.mark.slow
def test_check_passes_when_the_cache_holds_the_weights(full_cache, tmp_path, capsys):
    assert dfd_main(["check", "--profile", _profile(tmp_path)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.count("hub:timm/") == 4 and f"hub:{TINY_SD}@" in out and "training memory" in out


def test_fetch_weights_offline_says_what_it_would_fetch(empty_cache, tmp_path, capsys):
    assert dfd_main(["fetch-weights", "--profile", _profile(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("MISSING") == 5 and "would fetch 5 item(s)" in out
    assert "ok: 01_features_umap backbone tf_efficientnet_lite0: package:" in out


def test_fetch_weights_finds_a_full_cache(full_cache, tmp_path, capsys):
    assert dfd_main(["fetch-weights", "--profile", _profile(tmp_path)]) == 0
    assert "6 of 6 ready" in capsys.readouterr().out


def test_stable_diffusion_loads_by_hub_id_from_the_cache(full_cache):
    from dfd_lib.synth.config import EnrichmentConfig

    assert diffusion.is_hub_id(TINY_SD) and not diffusion.is_hub_id("notebooks")
    config = EnrichmentConfig(families=("sd_img2img",), sd_checkpoint=TINY_SD)
    assert config.checkpoint_for("img2img") == TINY_SD  # kept as an id, not made a path
    pipe = diffusion.load_pipeline("img2img", TINY_SD, device="cpu")
    assert diffusion.native_size(pipe) == diffusion.TINY_IMAGE_SIZE
    with pytest.raises(diffusion.DiffusionUnavailableError, match="dfd fetch-weights"):
        diffusion.load_pipeline("img2img", "dfd-tests/not-cached", device="cpu")


@pytest.mark.slow
def test_the_pipeline_checks_before_its_first_step(empty_cache, tmp_path, caplog):
    from dfd_lib.pipeline.chain import run_pipeline
    from dfd_lib.pipeline.steps import PipelineError

    profile = _profile(tmp_path)
    with pytest.raises(PipelineError, match="not in the Hugging Face cache"):
        run_pipeline(profile, run="refused", reports_dir=tmp_path / "reports", progress=False)
    assert not (tmp_path / "reports" / "refused" / "notebooks").exists()  # stopped before anything ran
