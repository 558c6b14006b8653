"""Image embeddings of a manifest, streamed to an on-disk cache (notebook 01), and read back by
notebook 02 from the run folder.

:func:`extract_embeddings` encodes every row of a manifest table with a backbone (a timm
name built by :func:`dfd_lib.models.backbones.create_backbone`, or any module such as a trained
expert), decoding in DataLoader workers and writing each batch straight into a memory-mapped
``.npy`` file, so a dataset of any size never sits in memory as one tensor. The backbone is any
timm name, a CNN or a ViT such as CLIP's ``vit_large_patch14_clip_224.openai``: its mean, std and
interpolation come from its own timm data config, and so does its input side with ``image_size: 0``
(a ViT takes that side only). The cache key covers the manifest's content, the backbone's identity
and the preprocessing, so a rerun reads the file instead of recomputing. :func:`embed_run` also records which cache entry the
run's map was drawn from, and :func:`dfd_lib.embed.embedding_store.load_run_embeddings` reads exactly that entry back.

Given a :class:`dfd_lib.core.shards.ShardGroup` (``dfd embed`` under ``accelerate launch
--num_processes N``), each process embeds every N-th batch into a part of the entry and process 0
merges the parts into the entry one process writes (:mod:`dfd_lib.embed.embedding_parts`); a
killed run keeps the finished parts.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dfd_lib.core import runs
from dfd_lib.core.atomic import atomic_write
from dfd_lib.core.config import StepConfig
from dfd_lib.core.faults import crash_point
from dfd_lib.core.logs import progress_bar
from dfd_lib.core.paths import cache_dir as default_cache_dir
from dfd_lib.core.paths import resolve
from dfd_lib.core.shards import ShardGroup
from dfd_lib.data.images import load_rgb
from dfd_lib.embed.embedding_parts import merge_embedding_parts, part_complete, part_files, part_key_source
from dfd_lib.embed.embedding_store import EmbeddingResult, manifest_identity, read_cache
from dfd_lib.models.backbones import backbone_data_config, backbone_transform, create_backbone

CACHE_FORMAT = 1  # bump when the file layout or the meaning of a key changes


@dataclass
class EmbeddingConfig(StepConfig):
    """How notebook 01 embeds its images."""

    backbone: str = "tf_efficientnet_lite0"  # timm name (lite0 has real ImageNet weights offline)
    backbone_weights: str = ""  # a local .safetensors/.pth file; empty = packaged (or random) weights
    pretrained: bool = True
    image_size: int = 224  # input side in pixels; 0 = the backbone's own (its timm data config: 224 for a CLIP ViT-L/14)
    crop_pct: float = 1.0  # 1.0 embeds the whole image (an edit near the border still counts)
    batch_size: int = 64
    num_workers: int = 2  # DataLoader decoding processes
    device: str = "auto"  # auto (CUDA if present), cpu, cuda, cuda:1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}")
        if self.image_size != 0 and self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels (or 0 for the backbone's own), got {self.image_size}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")


class _ImageRows(Dataset):
    """Decodes one manifest row per item; a failure yields a blank image and its reason."""

    def __init__(self, paths: list[str], transform, image_size: int):
        self.paths, self.transform, self.image_size = paths, transform, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_rgb(self.paths[index])), index, ""
        except Exception as err:  # any decode/transform failure is reported, never fatal
            reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
            return torch.zeros(3, self.image_size, self.image_size), index, reason


def module_identity(module: nn.Module) -> str:
    """A hash of a module's class and every tensor of its state dict (a checkpoint's identity)."""
    digest = hashlib.sha1(type(module).__qualname__.encode())
    for key, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return "module:" + digest.hexdigest()


def _weights_identity(weights_path: str | os.PathLike | None) -> str | None:
    if weights_path is None:
        return None
    stat = os.stat(weights_path)
    return f"{Path(weights_path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _timm_model_of(module: nn.Module) -> nn.Module:
    """The first submodule that carries a timm ``pretrained_cfg`` (an Expert wraps its timm model)."""
    return next((sub for sub in module.modules() if hasattr(sub, "pretrained_cfg")), module)


def _data_config_of(module: nn.Module) -> dict[str, Any]:
    """timm's data config of the module's timm model."""
    return backbone_data_config(_timm_model_of(module))


def input_side(image_size: int, module: nn.Module, data_config: dict[str, Any]) -> int:
    """The side images are embedded at: ``image_size``, or with 0 the backbone's own. A backbone that takes
    its own side only (a ViT's position embeddings: timm's ``fixed_input_size``) is refused at another
    side here, by name, rather than failing in its first batch."""
    own = int(data_config["input_size"][-1])
    if image_size == 0:
        return own
    cfg = getattr(_timm_model_of(module), "pretrained_cfg", {})
    if cfg.get("fixed_input_size", False) and image_size != own:
        name = cfg.get("architecture", type(module).__name__)
        raise ValueError(f"backbone {name} takes {own} px inputs only (timm's data config); "
                         f"set image_size to {own} or 0, not {image_size}")
    return int(image_size)


def _pooled(output: Any) -> torch.Tensor:
    if isinstance(output, dict):
        if "features" not in output:
            raise ValueError(f"the backbone returned a dict without 'features' (keys: {sorted(output)})")
        output = output["features"]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"the backbone must return a tensor or a dict with 'features', got {type(output).__name__}")
    if output.ndim == 4:  # an unpooled feature map: global average pool
        output = output.mean(dim=(2, 3))
    elif output.ndim == 3:  # tokens
        output = output.mean(dim=1)
    return output.float()


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def extract_embeddings(
    table: pd.DataFrame,
    config: EmbeddingConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    model: nn.Module | None = None,
    progress: bool = True,
    shards: ShardGroup | None = None,
) -> EmbeddingResult:
    """Embed every row of ``table`` (a manifest with a ``path`` column), or read the cache.

    The backbone is ``config.backbone`` (with ``config.backbone_weights``), or ``model`` when given
    (any module: a trained expert, ...). The cache lives in ``cache_dir`` (default ``<cache>/embeddings``).
    With ``shards`` every process of the group calls this with the same table; each embeds its shard
    (on its own GPU under ``device="auto"``) and all return the entry process 0 merged.
    """
    config = config or EmbeddingConfig()
    if "path" not in table.columns:
        raise ValueError("the table needs a 'path' column (a manifest table)")
    if len(table) == 0:
        raise ValueError("the table has no rows to embed")
    if model is None:
        weights = str(resolve(config.backbone_weights)) if config.backbone_weights else None
        model = create_backbone(config.backbone, pretrained=config.pretrained, num_classes=0, weights_path=weights)
        identity = f"name:{config.backbone}|weights:{model.weights_source}|file:{_weights_identity(weights)}"
    elif isinstance(model, nn.Module):
        identity = module_identity(model)
    else:
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    data_config = _data_config_of(model)
    side = input_side(config.image_size, model, data_config)
    transform = backbone_transform(data_config, image_size=side, crop_pct=config.crop_pct)

    key_source = json.dumps(
        {"format": CACHE_FORMAT, "manifest": manifest_identity(table), "rows": len(table),
         "backbone": identity, "image_size": side, "crop_pct": config.crop_pct,
         "mean": list(data_config["mean"]), "std": list(data_config["std"]),
         "interpolation": data_config["interpolation"]},
        sort_keys=True,
    )
    key = hashlib.sha1(key_source.encode()).hexdigest()[:20]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "embeddings"
    array_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"

    from_cache = meta_path.is_file() and array_path.is_file()
    if not from_cache:
        folder.mkdir(parents=True, exist_ok=True)
        paths = table["path"].astype(str).tolist()
        if shards is None:
            _compute(_loader(paths, transform, side, config), model, _resolve_device(config.device), array_path,
                     meta_path, key_source, progress)
        else:
            _compute_sharded(paths, transform, side, config, model, array_path, meta_path, key_source, progress, shards)
    result = read_cache(table, array_path, meta_path, from_cache)
    result.weights_source = getattr(model, "weights_source", "") or identity
    return result


def embed_run(run: runs.RunDir, table: pd.DataFrame, config: EmbeddingConfig, progress: bool = True,
              shards: ShardGroup | None = None) -> EmbeddingResult:
    """Notebook 01: embed the run's manifest rows into the run's cache and record which entry the
    run's map is drawn from, so notebook 02 clusters exactly these embeddings (``shards``: by
    several processes, process 0 records)."""
    result = extract_embeddings(table, config, cache_dir=run.path(runs.EMBEDDINGS_DIR), progress=progress, shards=shards)
    if shards is not None and not shards.is_main:
        return result
    index = {"array": result.cache_path.name, "config": config.to_dict(), "weights_source": result.weights_source}
    atomic_write(run.path(runs.EMBEDDINGS_INDEX), lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    _remove_other_entries(run.path(runs.EMBEDDINGS_DIR), keep=result.cache_path)
    run.record_weights(runs.FEATURES.name, {config.backbone: result.weights_source})
    return result


def _remove_other_entries(folder: Path, keep: Path) -> None:
    """A run's embeddings folder holds the entry its map was drawn from, nothing older: an entry of another
    manifest or backbone is no result of this run (and would make it differ from a fresh one)."""
    for path in folder.glob("*"):
        if path.suffix in (".npy", ".json") and path.stem != keep.stem and path.name != Path(runs.EMBEDDINGS_INDEX).name:
            path.unlink()


def _loader(paths: list[str], transform, side: int, config: EmbeddingConfig) -> DataLoader:
    return DataLoader(_ImageRows(paths, transform, side), batch_size=config.batch_size, shuffle=False,
                      num_workers=config.num_workers, pin_memory=torch.cuda.is_available())


def _compute_sharded(paths: list[str], transform, side: int, config: EmbeddingConfig, model: nn.Module,
                     array_path: Path, meta_path: Path, key_source: str, progress: bool, shards: ShardGroup) -> None:
    """This process's part of the entry (its batches, as one process forms them; kept from a killed run
    when complete), then process 0's merge; every process returns once the entry is complete, or
    raises what any process raised."""
    part_array, part_meta = part_files(array_path, meta_path, shards.rank, shards.processes)
    part_key = part_key_source(key_source, shards.rank, shards.processes, config.batch_size)
    error = None
    try:
        if not part_complete(part_array, part_meta, part_key):
            device = _resolve_device(shards.device(config.device) or "auto")
            loader = _loader(shards.mine(paths, config.batch_size), transform, side, config)
            _compute(loader, model, device, part_array, part_meta, part_key, progress and shards.is_main, allow_empty=True)
    except (RuntimeError, ValueError, OSError) as exc:
        error = f"process {shards.rank}: {type(exc).__name__}: {exc}"
    keys = shards.gather((key_source, error))  # also the barrier: every part is complete
    error = next((e for _, e in keys if e), None)
    if error is None and len({k for k, _ in keys}) > 1:
        error = "the processes were given different tables to embed (their cache keys differ)"
    if error is None and shards.is_main:
        try:
            merge_embedding_parts(array_path, meta_path, key_source, paths, shards.processes, config.batch_size)
        except (RuntimeError, OSError) as exc:
            error = str(exc)
    shards.raise_any(error, RuntimeError)


def _compute(loader: DataLoader, model: nn.Module, device: torch.device, array_path: Path, meta_path: Path,
             key_source: str, progress: bool, allow_empty: bool = False) -> None:
    """Embed ``loader``'s rows into the entry ``array_path`` / ``meta_path``; ``allow_empty``: a part
    whose images all failed (or that has none) is complete with an empty array."""
    paths = loader.dataset.paths
    was_training = model.training
    model = model.to(device).eval()
    partial = array_path.with_name(f"{array_path.stem}.{os.getpid()}.partial.npy")  # concurrent runs never share it
    out: np.ndarray | None = None
    written, failed = 0, []
    try:
        with torch.inference_mode():
            for images, indices, reasons in progress_bar(loader, desc="embedding", unit="batch", disable=not progress):
                ok = torch.tensor([reason == "" for reason in reasons])
                failed += [(int(i), reason) for i, reason in zip(indices, reasons) if reason]
                if not ok.any():
                    continue
                batch = images[ok].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    features = _pooled(model(batch)).cpu().numpy()
                if out is None:  # the width is known only after the first forward pass
                    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                                    shape=(len(paths), features.shape[1]))
                out[written:written + len(features)] = features
                written += len(features)
                crash_point("embeddings.batch")
    except BaseException:
        partial.unlink(missing_ok=True)  # an interrupted run leaves no half-written cache
        raise
    finally:
        model.train(was_training)
    if out is None and not allow_empty:
        raise RuntimeError(f"none of the {len(paths)} images could be decoded; first reason: {failed[0][1]}")
    if out is None:
        np.save(partial, np.zeros((0, 0), np.float32))
    else:
        out.flush()
        del out
    os.replace(partial, array_path)
    failed_rows = {index for index, _ in failed}
    meta = {"key": json.loads(key_source), "embedded_rows": [i for i in range(len(paths)) if i not in failed_rows],
            "failed": [{"row": i, "path": paths[i], "reason": r} for i, r in failed]}
    # the metadata file marks the cache entry complete
    atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)))
