"""The full profile's real path on a CPU (`pipelines/full-mini.yaml`): the 7 original backbones
pretrained from a Hugging Face cache built here (hub layout, random weights, HF_HUB_OFFLINE=1), Stable
Diffusion from a diffusers folder, notebooks 01 to 05; the mixture loads in `dfd predict` and `dfd serve`."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from hub_cache import cache_timm_weights, cached_revision, use_hub_cache

from dfd_lib.cli import main as dfd_main
from dfd_lib.core import runs
from dfd_lib.models.backbones import canonical_backbone_name
from dfd_lib.models.experts import ORIGINAL_BACKBONES


@pytest.mark.slow
def test_full_mini_runs_end_to_end_from_the_hugging_face_cache(tmp_path, monkeypatch, capsys):
    hub = use_hub_cache(monkeypatch, tmp_path / "hf-home")  # the environment the notebooks' kernels inherit
    revisions = {}
    for name in sorted(set(ORIGINAL_BACKBONES)):
        repo, _ = cache_timm_weights(hub, name)
        revisions[name] = f"hub:{repo}@{cached_revision(hub, repo)}"
    assert dfd_main(["check", "--profile", "full-mini"]) == 0, capsys.readouterr().out

    from dfd_lib.pipeline.chain import run_pipeline

    result = run_pipeline("full-mini", run="full-mini", reports_dir=tmp_path / "reports", progress=False)
    assert result.ok, [step.error for step in result.steps]
    run = runs.RunDir(result.run_dir)
    started = json.loads(run.path(runs.ENVIRONMENT).read_text())["weights"]["04_train_moe"]
    config = json.loads((run.path(runs.MOE_WEIGHTS) / "config.json").read_text())
    assert config["backbones"] == [canonical_backbone_name(name) for name in ORIGINAL_BACKBONES]  # the 7 originals
    experts = [name for name in started if name.startswith("expert")]
    assert len(experts) == 7
    for name, backbone in zip(experts, config["backbones"]):
        assert started[name] == revisions[backbone], name  # each expert started from the cache's weights

    test_images = pd.read_csv(run.path(runs.MANIFEST)).query("split == 'test'")["path"].head(4)
    images = [str(run.path(runs.MANIFEST).parent / p) if not p.startswith("/") else p for p in test_images]
    out = tmp_path / "preds.csv"
    assert dfd_main(["predict", *images, "--weights", str(run.path(runs.MOE_WEIGHTS)), "--out", str(out)]) == 0
    scored = pd.read_csv(out)
    assert len(scored) == 4 and scored["prob_fake"].between(0, 1).all() and "prob_expert_6" in scored.columns

    from fastapi.testclient import TestClient

    from dfd_lib.serving.app import create_app

    with TestClient(create_app(run.path(runs.MOE_WEIGHTS))) as client:
        health = client.get("/health").json()
    assert health["model"]["experts"] == 7 and health["model"]["backbones"] == config["backbones"]
