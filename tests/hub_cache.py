"""A Hugging Face cache built here, in the hub's own layout, so the kit's standard loading path
(timm + huggingface_hub, ``HF_HUB_OFFLINE=1``) runs offline in tests:
``$HF_HOME/hub/models--timm--<name>/snapshots/<revision>/model.safetensors`` and ``refs/main``."""
from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file


def cache_timm_weights(hub_cache: Path, name: str, seed: int = 0) -> tuple[str, dict[str, torch.Tensor]]:
    """Random weights of timm model ``name`` (its 1000-class ImageNet head) as the cache entry of
    its hub repo; returns the repo id and the state dict written."""
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    return _write_weights(hub_cache, timm.models.get_pretrained_cfg(name).hf_hub_id, seed, state), state


def cache_stand_in(hub_cache: Path, name: str) -> str:
    """A small file in the place of timm model ``name``'s hub weights, for what only looks the file up and
    never loads it (`dfd check`, `dfd fetch-weights`): a ViT-L's real 1.2 GB is too much to write in a test."""
    return _write_weights(hub_cache, timm.models.get_pretrained_cfg(name).hf_hub_id, 0, {"stand_in": torch.zeros(1)})


def _write_weights(hub_cache: Path, repo: str, seed: int, state: dict[str, torch.Tensor]) -> str:
    revision = hashlib.sha1(f"{repo}:{seed}".encode()).hexdigest()
    folder = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    return repo


def use_hub_cache(monkeypatch, hf_home: Path) -> Path:
    """Point huggingface_hub (already imported, so its constants are patched too) at ``hf_home``, offline."""
    from huggingface_hub import constants

    hub = hf_home / "hub"
    hub.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def cache_folder(hub_cache: Path, repo: str, folder: Path) -> str:
    """Every file of ``folder`` (a ``save_pretrained`` folder) as the cached snapshot of ``repo``; its revision."""
    import shutil

    revision = hashlib.sha1(repo.encode()).hexdigest()
    entry = hub_cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / revision, dirs_exist_ok=True)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(revision)
    return revision


def cached_revision(hub_cache: Path, repo: str) -> str:
    """The revision ``refs/main`` of ``repo`` points at in the cache."""
    return (hub_cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").read_text()
