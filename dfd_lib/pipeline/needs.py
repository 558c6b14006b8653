"""What a run of a profile needs before its first step: its datasets, the weights of every backbone
and Stable Diffusion checkpoint, and what each weight resolves to here, found the way the steps will
find them (``dfd check``, ``dfd fetch-weights`` and the check ``dfd pipeline`` runs first)."""
from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub import constants, file_exists

from dfd_lib.core import runs
from dfd_lib.core.paths import resolve
from dfd_lib.models.backbones import (
    HUB_WEIGHT_FILES,
    WeightsUnavailableError,
    cached_hub_weights,
    canonical_backbone_name,
    hub_repo,
    hub_weights_file,
    packaged_source,
)
from dfd_lib.synth import factory

DEMO_DATASETS = ("demo", "demo-smoke")
EMBED_STEP, SYNTH_STEP, TRAIN_STEP = runs.FEATURES.name, runs.AUGMENT.name, runs.TRAIN.name


@dataclass(frozen=True)
class Dataset:
    """A dataset a run reads: ``path`` (a folder or a manifest) and, for the competition layout, its labels CSV."""

    role: str  # "dataset", "val_dataset" or "test_dataset"
    path: str
    labels_csv: str = ""


@dataclass(frozen=True)
class Backbone:
    """A backbone a step builds, and how it asks for weights."""

    step: str
    name: str
    pretrained: bool = True
    weights_file: str = ""  # an explicit local file


@dataclass(frozen=True)
class Diffusion:
    """A checkpoint a model-backed family of notebook 03 loads: for Stable Diffusion a local folder or
    file, or a hub id."""

    task: str  # "img2img", "inpaint" or "img2img+inpaint" (one checkpoint serving both)
    checkpoint: str
    kind: str = "stable_diffusion"  # the registered kind that loads it (dfd_lib.synth.factory)


@dataclass
class Resolved:
    """Where one weight comes from here, or why it cannot be had."""

    ok: bool
    source: str  # file:/package:/hub:<repo>@<revision>/random, or the problem


def datasets(values: dict[str, dict]) -> list[Dataset]:
    """The datasets notebook 01 reads (none for the embedded demo)."""
    params = values.get(EMBED_STEP, {})
    found = []
    for role in ("dataset", "val_dataset", "test_dataset"):
        path = str(params.get(role) or "")
        if path and path not in DEMO_DATASETS:
            labels = str(params.get(role.replace("dataset", "labels_csv")) or "")
            found.append(Dataset(role, path, labels))
    return found


def backbones(values: dict[str, dict]) -> list[Backbone]:
    """Every distinct backbone the selected steps build, with its weights request."""
    found: list[Backbone] = []
    if EMBED_STEP in values:
        params = values[EMBED_STEP]
        found.append(Backbone(EMBED_STEP, str(params["backbone"]), bool(params.get("pretrained", True)),
                              str(params.get("backbone_weights") or "")))
    if TRAIN_STEP in values:
        params = values[TRAIN_STEP]
        names = list(params["backbones"])
        files = [str(w) for w in params.get("backbone_weights") or []] or [""]
        for i, name in enumerate(names):
            found.append(Backbone(TRAIN_STEP, str(name), bool(params.get("pretrained", True)), files[i % len(files)]))
    return list(dict.fromkeys(found))


def diffusion_checkpoints(values: dict[str, dict]) -> list[Diffusion]:
    """The checkpoints the selected model-backed families of notebook 03 load, each asked of its kind
    (none for a built-in model such as the tiny Stable Diffusion pipeline)."""
    params = values.get(SYNTH_STEP)
    if not params:
        return []
    tasks: dict[tuple[str, str], list[str]] = {}
    for family in factory.model_families(params.get("families") or []):
        checkpoint = factory.kind_of(family).checkpoint(family, params)
        if checkpoint:
            tasks.setdefault((family.kind, str(checkpoint)), []).append(family.task)
    return [Diffusion("+".join(dict.fromkeys(names)), checkpoint, kind) for (kind, checkpoint), names in tasks.items()]


def resolve_backbone(backbone: Backbone, fetch: bool = False) -> Resolved:
    """Where ``backbone``'s weights come from here, without building it. The Hugging Face cache is
    read, and written only with ``fetch`` (offline, ``HF_HUB_OFFLINE=1``, it is only read)."""
    try:
        name = canonical_backbone_name(backbone.name)
    except ValueError as exc:
        return Resolved(False, str(exc))
    if backbone.weights_file:
        path = resolve(backbone.weights_file)
        return Resolved(path.is_file(), f"file:{path}" if path.is_file() else f"weights file not found: {path}")
    if not backbone.pretrained:
        return Resolved(True, "random (pretrained: false)")
    packaged = packaged_source(name)
    if packaged:
        return Resolved(True, packaged)
    try:
        _path, source = hub_weights_file(name) if fetch else cached_hub_weights(name)
    except WeightsUnavailableError as exc:
        return _downloadable(name) or Resolved(False, str(exc).split(". Provide them")[0])
    return Resolved(True, source)


def _downloadable(name: str) -> Resolved | None:
    """Online, weights missing from the cache are fine when the hub has them (they download on first use)."""

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        repo, revision = hub_repo(name)
        if any(file_exists(repo, filename, revision=revision) for filename in HUB_WEIGHT_FILES):
            return Resolved(True, f"hub:{repo} (not cached yet: downloads on first use, or now with dfd fetch-weights)")
    except (WeightsUnavailableError, Exception):  # noqa: BLE001 - no network, a proxy, a bad token: not downloadable
        return None
    return None


def resolve_diffusion(checkpoint: Diffusion, fetch: bool = False) -> Resolved:
    """Where the checkpoint's kind finds it: for Stable Diffusion a local diffusers folder or single file,
    or a hub id found in (or, with ``fetch``, downloaded into) the Hugging Face cache."""
    try:
        return Resolved(True, factory.get_kind(checkpoint.kind).locate(checkpoint.checkpoint, fetch=fetch))
    except FileNotFoundError as exc:  # DiffusionUnavailableError is one
        return Resolved(False, str(exc))

