"""Our checkpoints: a mixture of experts (read and write), one expert's best EMA weights, the
mixture assembled from experts (:func:`dfd_lib.models.loading.load_weights` reads either our format or the
released one, :mod:`dfd_lib.models.released`).

Our format: a directory with ``model.safetensors`` (keys ``experts.<i>.baseline_extractor.*``,
EMA already folded; ``experts.<i>.localisation_head.*`` when the experts have localisation heads) and
``config.json`` (:class:`MixtureConfig`, whose ``localisation_head`` names the heads' kind, absent without). Writes are atomic, so a
training run stopped mid-save never leaves a half-written checkpoint. An expert's weights are one
``best_ema.safetensors`` whose metadata holds its backbone and preprocessing.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dfd_lib.core.atomic import atomic_write
from dfd_lib.core.config import StepConfig
from dfd_lib.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, InputTransform, TiledTransform
from dfd_lib.models.backbones import canonical_backbone_name
from dfd_lib.models.experts import Expert, MixtureOfExperts, build_mixture
from dfd_lib.models.localisation import HEAD_KINDS

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
PREPROCESS_MODES = ("default", "compat")  # decoding of files: Pillow, or OpenCV as the release did (scoring.predictor)
_EXPERT_META = "dfd_expert"  # safetensors metadata key of an expert's weights file


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why in one line."""

log = logging.getLogger(__name__)


@dataclass
class MixtureConfig(StepConfig):
    """What a mixture checkpoint needs besides its tensors: the experts and the preprocessing."""

    backbones: list[str]
    image_size: int = 512
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    antialias: bool = True
    preprocess: str = "compat"  # how files are decoded (see dfd_lib.scoring.predictor)
    ema_folded: bool = True
    provenance: dict[str, str] = field(default_factory=dict)
    # the verdict threshold chosen by `dfd calibrate` with its ROC point (dfd_lib.scoring.calibration); empty: not calibrated
    calibration: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # one {image_size, mean, std, interpolation} per expert when the experts differ (a ViT at 224 px beside CNNs
    # at 512 px: each its own backbone's); empty: every expert takes the shared fields above (written only when set)
    expert_inputs: list[dict] = field(default_factory=list)
    # the kind of every expert's localisation head (dfd_lib.models.localisation); empty: no heads (written only when set)
    localisation_head: str = ""

    def __post_init__(self):
        if isinstance(self.backbones, str) or not self.backbones:
            raise ValueError("MixtureConfig.backbones must be a non-empty list of timm model names")
        self.backbones = [canonical_backbone_name(str(name)) for name in self.backbones]
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"MixtureConfig.image_size must be an int >= 8, got {self.image_size!r}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise ValueError(f"MixtureConfig.{name} needs 3 values (R, G, B), got {values}")
            setattr(self, name, values)
        if min(self.std) <= 0:
            raise ValueError(f"MixtureConfig.std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"MixtureConfig.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"MixtureConfig.preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(f"checkpoint format {self.format_version} is newer than this dfd-kit reads ({FORMAT_VERSION})")
        self.provenance = {str(k): str(v) for k, v in dict(self.provenance).items()}
        self.calibration = dict(self.calibration or {})
        threshold = self.calibration.get("threshold") if self.calibration else 0.0
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"MixtureConfig.calibration needs a threshold in [0, 1], got {threshold!r}")
        self.expert_inputs = self._checked_expert_inputs()
        if self.localisation_head and self.localisation_head not in HEAD_KINDS:
            raise ValueError(f"MixtureConfig.localisation_head must be one of {HEAD_KINDS} or empty, got {self.localisation_head!r}")

    def _checked_expert_inputs(self) -> list[dict]:
        if isinstance(self.expert_inputs, (str, Mapping)) or not isinstance(self.expert_inputs, Sequence):
            raise ValueError(f"MixtureConfig.expert_inputs must be a list (one entry per expert), got {self.expert_inputs!r}")
        if self.expert_inputs and len(self.expert_inputs) != len(self.backbones):
            raise ValueError(f"MixtureConfig.expert_inputs has {len(self.expert_inputs)} entries for {len(self.backbones)} experts")
        checked = []
        for i, entry in enumerate(self.expert_inputs):
            unknown = set(entry) - set(EXPERT_INPUT_FIELDS) if isinstance(entry, Mapping) else {"(not a mapping)"}
            if unknown:
                raise ValueError(f"MixtureConfig.expert_inputs[{i}]: unknown field(s) {sorted(unknown)}; "
                                 f"an entry holds {EXPERT_INPUT_FIELDS}")
            shared = {"image_size": self.image_size, "mean": self.mean, "std": self.std, "interpolation": self.interpolation}
            one = MixtureConfig(backbones=[self.backbones[i]], **{**shared, **entry})  # the shared fields' checks
            checked.append({"image_size": one.image_size, "mean": list(one.mean), "std": list(one.std),
                            "interpolation": one.interpolation})
        return checked

    @property
    def shared_input(self) -> bool:
        """Whether every expert takes the same input (the shared fields): one transform, no tiling."""
        return not self.expert_inputs

    @property
    def expert_sizes(self) -> list[int]:
        """Each expert's input side."""
        return [e["image_size"] for e in self.expert_inputs] if self.expert_inputs else [self.image_size] * len(self.backbones)

    def expert_transforms(self) -> list[InputTransform]:
        """Each expert's own preprocessing."""
        entries = self.expert_inputs or [{"image_size": self.image_size, "mean": self.mean, "std": self.std,
                                          "interpolation": self.interpolation}] * len(self.backbones)
        return [InputTransform(e["image_size"], e["mean"], e["std"], e["interpolation"], self.antialias) for e in entries]

    def transform(self) -> InputTransform | TiledTransform:
        """The model input of an image: the shared ``(3, S, S)`` transform, or with :attr:`expert_inputs` the tiled
        ``(3, H, W)`` one holding each expert's own input (:class:`~dfd_lib.data.preprocess.TiledTransform`)."""
        if self.shared_input:
            return InputTransform(self.image_size, self.mean, self.std, self.interpolation, self.antialias)
        return TiledTransform(self.expert_transforms())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(3, H, W)`` of one model input (:meth:`transform`)."""
        if self.shared_input:
            return 3, self.image_size, self.image_size
        return TiledTransform(self.expert_transforms()).shape

    def to_json(self) -> str:
        saved = dataclasses.asdict(self)
        if not saved["expert_inputs"]:  # a mixture with one preprocessing keeps the file older readers know
            saved.pop("expert_inputs")
        if not saved["localisation_head"]:  # a mixture without heads: the file as before heads existed
            saved.pop("localisation_head")
        return json.dumps(saved, indent=2)


EXPERT_INPUT_FIELDS = ("image_size", "mean", "std", "interpolation")


# --------------------------------------------------------------------------- writing


def save_mixture(model: MixtureOfExperts, directory: str | os.PathLike, config: MixtureConfig) -> Path:
    """Write ``model`` (EMA already folded / the weights to serve) and ``config`` to ``directory``."""
    directory = Path(directory)
    if list(config.backbones) != model.backbones:
        raise ValueError(f"config names backbones {config.backbones} but the model has {model.backbones}")
    if (config.localisation_head or None) != model.head_kind:
        raise ValueError(f"config names localisation head {config.localisation_head!r} but the model has {model.head_kind!r}")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    metadata = {"format": "pt", "dfd_format_version": str(FORMAT_VERSION)}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_safetensors(tensors, tmp, metadata))
    atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(config.to_json() + "\n", encoding="utf-8"))
    return directory


# --------------------------------------------------------------------------- reading ours


def is_mixture_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def read_config(directory: str | os.PathLike) -> MixtureConfig:
    """The mixture's config; a calibration made for other weights than those beside it is dropped (with
    a warning), so a verdict never uses a threshold chosen for another model."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = MixtureConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a dfd-kit checkpoint directory)") from None
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid mixture config: {exc}") from None
    made_for = config.calibration.get(CALIBRATED_WEIGHTS) if config.calibration else None
    weights = Path(directory) / WEIGHTS_FILE
    if made_for and weights.is_file() and made_for != weights_digest(weights):
        log.warning("%s: its calibration was made for other weights (they changed since): ignored, verdicts use 0.5 "
                    "until `dfd calibrate` runs again", path)
        config = dataclasses.replace(config, calibration={})
    return config


CALIBRATED_WEIGHTS = "weights_sha256"  # in a calibration: the digest of the weights it was chosen for


def weights_digest(path: Path) -> str:
    """sha256 of a weights file (cached while its size and modification time stay the same)."""
    stat = path.stat()
    return _file_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_on_meta(backbones: Sequence[str], localisation_head: str | None = None) -> MixtureOfExperts:
    # No memory and no random init for weights that are about to be replaced.
    with torch.device("meta"):
        return build_mixture(backbones, localisation_head=localisation_head or None)


def assign_state(model: MixtureOfExperts, state: Mapping[str, torch.Tensor], released_layout: bool, source: str):
    target = model.experts if released_layout else model
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: keys do not match the experts {model.backbones}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    target.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: tensors not provided by the checkpoint: {left[:5]}")
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()


def load_mixture(directory: str | os.PathLike) -> tuple[MixtureOfExperts, MixtureConfig]:
    """Our format: ``(model in eval mode on the CPU, config)``."""
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{weights}: cannot read safetensors file: {exc}") from None
    model = build_on_meta(config.backbones, config.localisation_head)
    assign_state(model, state, released_layout=False, source=str(weights))
    model.input_sizes = None if config.shared_input else config.expert_sizes
    return model, config


# --------------------------------------------------------------------------- one expert


def save_expert_weights(path: str | os.PathLike, expert: Expert, meta: Mapping) -> Path:
    """An expert's weights and ``meta`` (backbone, image_size, mean, std, ...) as one safetensors file, atomically."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in expert.state_dict().items()}
    head = {"localisation_head": expert.head_kind} if expert.head_kind else {}  # absent: the file as before heads
    metadata = {"format": "pt", _EXPERT_META: json.dumps({"backbone": expert.backbone_name, **head, **meta})}
    return atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, metadata))


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """``save_file``, then its JSON header rewritten with sorted keys (safetensors writes the metadata in
    a hash map's random order): the same tensors and metadata always give the same bytes, so a file's
    digest says whether its content changed (a run's fingerprints, a calibration's weights)."""
    save_file(dict(tensors), str(path), metadata=dict(metadata))
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(canonical) <= size:  # the header's length stays; safetensors allows trailing spaces
            handle.seek(8)
            handle.write(canonical.ljust(size, b" "))


def load_expert(weights_path: str | os.PathLike) -> tuple[Expert, dict]:
    """An expert from its weights file (``best_ema.safetensors``) and the metadata stored with it."""
    with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
        meta = json.loads(handle.metadata()[_EXPERT_META])
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    expert = Expert(meta["backbone"], pretrained=False, localisation_head=meta.get("localisation_head"))
    expert.load_state_dict(state, strict=True)
    return expert.eval(), meta


def mixture_from_experts(weights_paths: Sequence[str | os.PathLike],
                         provenance: dict | None = None) -> tuple[MixtureOfExperts, MixtureConfig]:
    """The experts' weights files as one mixture and its config (our checkpoint format). Experts trained
    with one preprocessing share the config's fields; experts that differ (a ViT at its own size beside
    CNNs) each keep theirs in :attr:`MixtureConfig.expert_inputs`."""
    experts, metas = zip(*(load_expert(path) for path in weights_paths))
    inputs = [{"image_size": int(meta["image_size"]), "mean": [float(v) for v in meta["mean"]],
               "std": [float(v) for v in meta["std"]], "interpolation": meta.get("interpolation", "bilinear")}
              for meta in metas]
    shared = all(entry == inputs[0] for entry in inputs)
    model = MixtureOfExperts(list(experts))
    config = MixtureConfig(
        backbones=[e.backbone_name for e in experts], **inputs[0], antialias=True, preprocess="default", ema_folded=True,
        provenance=provenance or {}, expert_inputs=[] if shared else inputs,
        localisation_head=model.head_kind or "",  # heads on every expert or on none
    )
    model.input_sizes = None if shared else config.expert_sizes
    return model, config
