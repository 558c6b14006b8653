"""Checkpoints of a mixture of experts: the released format (read) and ours (read and write).

Released format (DESIGN.md §1): ``weight.pth`` is the state dict of an ``nn.ModuleList`` of
experts (``<i>.baseline_extractor.<timm key>``) and ``ema.state`` maps each expert index to
``{"decay", "num_updates", "shadow_params", "collected_params"}``, where ``shadow_params``
are the averaged values of ``expert.parameters()`` in order (parameters only, no buffers).
Both are pickles, so they are read with ``torch.load(weights_only=True)``: anything but
tensors and plain containers is refused. The EMA values are folded into the weights once,
here, so nothing downstream ever swaps weights.

Our format: a directory with ``model.safetensors`` (keys ``experts.<i>.baseline_extractor.*``,
EMA already folded) and ``config.json`` (:class:`MixtureConfig`). Writes are atomic, so a
training run stopped mid-save never leaves a half-written checkpoint.

``dfd convert-weights SRC DST`` turns the first into the second.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dfd_lib.atomic import atomic_write
from dfd_lib.models import ORIGINAL_BACKBONES, MixtureOfExperts, build_mixture, canonical_backbone_name

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RELEASED_WEIGHTS_FILE = "weight.pth"
RELEASED_EMA_FILE = "ema.state"
FORMAT_VERSION = 1
PREPROCESS_MODES = ("compat", "default")
INTERPOLATIONS = ("bilinear", "bicubic")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why in one line."""


@dataclass
class MixtureConfig:
    """What a mixture checkpoint needs besides its tensors: the experts and the preprocessing."""

    backbones: list[str]
    image_size: int = 512
    mean: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
    std: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
    interpolation: str = "bilinear"
    antialias: bool = True
    preprocess: str = "compat"  # the order the experts were trained with (see dfd_lib.inference)
    ema_folded: bool = True
    provenance: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping) -> MixtureConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys in mixture config: {', '.join(unknown)}")
        return cls(**data)


# --------------------------------------------------------------------------- writing


def save_mixture(model: MixtureOfExperts, directory: str | os.PathLike, config: MixtureConfig) -> Path:
    """Write ``model`` (EMA already folded / the weights to serve) and ``config`` to ``directory``."""
    directory = Path(directory)
    if list(config.backbones) != model.backbones:
        raise ValueError(f"config names backbones {config.backbones} but the model has {model.backbones}")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    metadata = {"format": "pt", "dfd_format_version": str(FORMAT_VERSION)}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(config.to_json() + "\n", encoding="utf-8"))
    return directory


# --------------------------------------------------------------------------- reading ours


def is_released_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / RELEASED_WEIGHTS_FILE).is_file() and (path / RELEASED_EMA_FILE).is_file()


def is_mixture_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def read_config(directory: str | os.PathLike) -> MixtureConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        return MixtureConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a dfd-kit checkpoint directory)") from None
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid mixture config: {exc}") from None


def _build_on_meta(backbones: Sequence[str]) -> MixtureOfExperts:
    # No memory and no random init for weights that are about to be replaced.
    with torch.device("meta"):
        return build_mixture(backbones)


def _assign_state(model: MixtureOfExperts, state: Mapping[str, torch.Tensor], released_layout: bool, source: str):
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
    model = _build_on_meta(config.backbones)
    _assign_state(model, state, released_layout=False, source=str(weights))
    return model, config


# --------------------------------------------------------------------------- reading the release


def _safe_torch_load(path: Path, mmap: bool = True):
    """``torch.load`` that unpickles tensors and plain containers only."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "Unsupported" in line or "global" in line.lower()), first[0] if first else "")
        raise CheckpointError(
            f"{path}: refused: holds objects other than tensors and plain containers, which could run code "
            f"when unpickled ({detail.strip()})"
        ) from None
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc).lower():  # legacy (pre-zip) torch.save files cannot be mapped
            return _safe_torch_load(path, mmap=False)
        raise CheckpointError(f"{path}: cannot read checkpoint: {str(exc).splitlines()[0]}") from None
    except (EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from None


def fold_ema(
    state: dict[str, torch.Tensor],
    ema_state: Mapping,
    model: MixtureOfExperts,
    source: str = RELEASED_EMA_FILE,
) -> dict[str, torch.Tensor]:
    """Replace each expert's parameters in the released-layout ``state`` by its EMA shadow
    values (``shadow_params`` follow ``expert.parameters()`` order; buffers are not averaged)."""
    if not isinstance(ema_state, Mapping):
        raise CheckpointError(f"{source}: expected a dict of expert index -> EMA state, got {type(ema_state).__name__}")
    indices = {int(k) for k in ema_state}
    expected = set(range(len(model.experts)))
    if indices != expected:
        raise CheckpointError(f"{source}: EMA states for experts {sorted(indices)}, the model has experts {sorted(expected)}")
    folded = dict(state)
    for i, expert in enumerate(model.experts):
        entry = ema_state.get(i, ema_state.get(str(i)))
        shadow = entry.get("shadow_params") if isinstance(entry, Mapping) else None
        if not isinstance(shadow, (list, tuple)):
            raise CheckpointError(f"{source}: expert {i} has no 'shadow_params' list")
        names = [name for name, _ in expert.named_parameters()]
        if len(shadow) != len(names):
            raise CheckpointError(
                f"{source}: expert {i} ({expert.backbone_name}) has {len(names)} parameters but "
                f"{len(shadow)} EMA shadow values"
            )
        for name, param, value in zip(names, expert.parameters(), shadow):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(param.shape):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise CheckpointError(
                    f"{source}: expert {i} EMA value for {name} has shape {got}, the model expects {tuple(param.shape)}"
                )
            folded[f"{i}.{name}"] = value.to(param.dtype)
    return folded


def released_paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[Path, Path]:
    """``(weight.pth, ema.state)`` from a folder holding both, or from the two paths."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a folder holding {RELEASED_WEIGHTS_FILE} and {RELEASED_EMA_FILE}")
        return folder / RELEASED_WEIGHTS_FILE, folder / RELEASED_EMA_FILE
    paths = [Path(p) for p in source]
    if len(paths) == 1:
        return released_paths(paths[0])
    if len(paths) != 2:
        raise CheckpointError(f"give a folder or the two files {RELEASED_WEIGHTS_FILE} and {RELEASED_EMA_FILE}, got {len(paths)} paths")
    return paths[0], paths[1]


def load_released(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    backbones: Sequence[str] = ORIGINAL_BACKBONES,
) -> tuple[MixtureOfExperts, MixtureConfig]:
    """The released ``weight.pth`` + ``ema.state`` as a mixture with the EMA folded in."""
    weight_path, ema_path = released_paths(source)
    state = _safe_torch_load(weight_path)
    ema_state = _safe_torch_load(ema_path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weight_path}: expected a state dict of tensors")
    model = _build_on_meta(backbones)
    state = fold_ema(dict(state), ema_state, model, source=str(ema_path))
    _assign_state(model, state, released_layout=True, source=str(weight_path))
    decays = sorted({float(entry.get("decay", float("nan"))) for entry in ema_state.values()})
    config = MixtureConfig(
        backbones=list(backbones),
        preprocess="compat",
        provenance={
            "source": f"{weight_path} + {ema_path}",
            "converted": "released weight.pth with ema.state shadow parameters folded in",
            "ema_decay": ",".join(f"{d:g}" for d in decays),
        },
    )
    return model, config


def load_weights(path: str | os.PathLike, backbones: Sequence[str] | None = None) -> tuple[MixtureOfExperts, MixtureConfig]:
    """Either format, told apart by the files in ``path``."""
    path = Path(path)
    if is_mixture_dir(path):
        return load_mixture(path)
    if is_released_dir(path):
        return load_released(path, backbones or ORIGINAL_BACKBONES)
    raise CheckpointError(
        f"{path}: no weights found: expected {WEIGHTS_FILE} + {CONFIG_FILE} (dfd-kit) or "
        f"{RELEASED_WEIGHTS_FILE} + {RELEASED_EMA_FILE} (the original release)"
    )


# --------------------------------------------------------------------------- dfd convert-weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="+", help=f"a folder holding {RELEASED_WEIGHTS_FILE} and {RELEASED_EMA_FILE}, or those two files")
    parser.add_argument("dst", help="output folder (model.safetensors + config.json)")
    parser.add_argument(
        "--backbones",
        default=",".join(ORIGINAL_BACKBONES),
        help="comma-separated timm names of the experts, in checkpoint order (default: the released 7)",
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    backbones = [name.strip() for name in args.backbones.split(",") if name.strip()]
    try:
        model, config = load_released(args.src, backbones)
        out = save_mixture(model, args.dst, config)
    except (CheckpointError, ValueError) as exc:
        print(f"dfd convert-weights: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out / WEIGHTS_FILE} and {out / CONFIG_FILE} ({len(backbones)} experts, EMA folded) "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def save_released(
    model: MixtureOfExperts,
    directory: str | os.PathLike,
    shadow_params: Sequence[Sequence[torch.Tensor]] | None = None,
    decay: float = 0.995,
    num_updates: int = 0,
) -> tuple[Path, Path]:
    """Write ``model`` in the released layout (for tests, benchmarks and sharing with users of
    the original code). ``shadow_params[i]`` are expert i's EMA values in ``parameters()``
    order; by default the current parameters."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if shadow_params is None:
        shadow_params = [[p.detach().clone() for p in expert.parameters()] for expert in model.experts]
    ema_state = {
        i: {"decay": float(decay), "num_updates": int(num_updates),
            "shadow_params": [t.detach().cpu().contiguous() for t in shadow], "collected_params": None}
        for i, shadow in enumerate(shadow_params)
    }
    weight_path, ema_path = directory / RELEASED_WEIGHTS_FILE, directory / RELEASED_EMA_FILE
    atomic_write(weight_path, lambda tmp: torch.save(model.experts.state_dict(), tmp))
    atomic_write(ema_path, lambda tmp: torch.save(ema_state, tmp))
    return weight_path, ema_path
