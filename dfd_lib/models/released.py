"""The original release's checkpoint (docs/method.md): read it safely, write it for tests and
benchmarks, and ``dfd convert-weights`` into our format.

``weight.pth`` is the state dict of an ``nn.ModuleList`` of experts (``<i>.baseline_extractor.<timm key>``)
and ``ema.state`` maps each expert index to ``{"decay", "num_updates", "shadow_params",
"collected_params"}``, where ``shadow_params`` are the averaged values of ``expert.parameters()`` in
order (parameters only, no buffers). Both are pickles, so they are read with
``torch.load(weights_only=True)``: anything but tensors and plain containers is refused. The EMA
values are folded into the weights once, here, so nothing downstream ever swaps weights.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from dfd_lib.core.atomic import atomic_write
from dfd_lib.models.checkpoints import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    MixtureConfig,
    assign_state,
    build_on_meta,
    save_mixture,
)
from dfd_lib.models.experts import ORIGINAL_BACKBONES, MixtureOfExperts

RELEASED_WEIGHTS_FILE = "weight.pth"
RELEASED_EMA_FILE = "ema.state"
log = logging.getLogger(__name__)


def is_released_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / RELEASED_WEIGHTS_FILE).is_file() and (path / RELEASED_EMA_FILE).is_file()


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
    model = build_on_meta(backbones)
    state = fold_ema(dict(state), ema_state, model, source=str(ema_path))
    assign_state(model, state, released_layout=True, source=str(weight_path))
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
        log.error("dfd convert-weights: %s", exc)
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
