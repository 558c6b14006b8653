"""``dfd check``: a preflight of a profile in seconds, before hours of work find a missing folder.

It looks at what the run needs (:mod:`dfd_lib.pipeline.needs`): the datasets exist, a sample of their
images decodes and their labels parse; settings of different steps agree (:mod:`dfd_lib.pipeline.consistency`:
the backbones against the number of re-splits, the ablation's re-split); every backbone's and Stable Diffusion checkpoint's weights
resolve; the disk holds the augmented images and checkpoints; the device (a GPU? bf16?); and an
estimate of each expert's training memory in its tuning mode at the configured batch size
(:mod:`dfd_lib.pipeline.memory`) against the GPU's (or, on a CPU, the machine's) memory. ``dfd pipeline``
runs the same checks before its first step.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dfd_lib.core.paths import REPORTS_DIR, resolve
from dfd_lib.data.images import ImageLoadError, is_image_path, load_rgb
from dfd_lib.data.manifest import Manifest, ManifestError
from dfd_lib.models.backbones import canonical_backbone_name
from dfd_lib.models.experts import Expert
from dfd_lib.pipeline import memory, needs
from dfd_lib.pipeline.consistency import cross_step_checks
from dfd_lib.pipeline.parameters import ParameterError, parse_overrides
from dfd_lib.pipeline.profiles import step_values
from dfd_lib.pipeline.steps import PipelineError

SAMPLE_IMAGES = 8  # images decoded per dataset
PNG_BYTES_PER_PIXEL = 1.6  # a PNG of a photo: about half of its 3 raw bytes per pixel
log = logging.getLogger(__name__)


@dataclass
class Report:
    """What the checks found: ``problems`` stop a run; ``notes`` say what was checked."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_profile(profile: str, overrides: dict | None = None, only: str | None = None, start: str | None = None,
                  **dirs) -> Report:
    """Every check of the selected steps of ``profile`` with ``overrides`` (``dirs``: notebooks_dir,
    pipelines_dir, recorded, as for :func:`dfd_lib.pipeline.profiles.step_values`)."""
    values = step_values(profile, overrides, only, start, **dirs)
    report = Report()
    for dataset in needs.datasets(values):
        _check_dataset(dataset, report)
    for backbone in needs.backbones(values):
        resolved = needs.resolve_backbone(backbone)
        _record(report, resolved.ok, f"{backbone.step} backbone {backbone.name}: {resolved.source}")
    for checkpoint in needs.diffusion_checkpoints(values):
        resolved = needs.resolve_diffusion(checkpoint)
        _record(report, resolved.ok, f"03 Stable Diffusion ({checkpoint.task}) {checkpoint.checkpoint}: {resolved.source}")
    problems, notes = cross_step_checks(step_values(profile, overrides, **dirs))
    report.problems += problems
    report.notes += notes
    _check_device_and_memory(values, report)
    _check_disk(values, report)
    return report


def _record(report: Report, ok: bool, line: str) -> None:
    (report.notes if ok else report.problems).append(line)


# --------------------------------------------------------------------------- datasets


def _check_dataset(dataset: needs.Dataset, report: Report) -> None:
    path = resolve(dataset.path)
    if not path.exists():
        report.problems.append(f"{dataset.role} not found: {path}")
        return
    if dataset.labels_csv:
        names = _competition_names(resolve(dataset.labels_csv), dataset.role, report)
        sample = [path / name for name in itertools.islice(names, SAMPLE_IMAGES)]
    elif path.is_file():
        sample = _manifest_sample(path, dataset.role, report)
    else:
        sample = list(itertools.islice((p for p in _walk(path) if is_image_path(p)), SAMPLE_IMAGES))
        if not sample:
            report.problems.append(f"{dataset.role} {path}: no image files below it")
    bad = []
    for image in sample:
        try:
            load_rgb(image)
        except ImageLoadError as exc:
            bad.append(f"{image.name} ({exc.reason})")
    if bad:
        report.problems.append(f"{dataset.role} {path}: {len(bad)} of {len(sample)} sampled images do not decode: {', '.join(bad[:3])}")
    elif sample:
        report.notes.append(f"{dataset.role} {path}: {len(sample)} sampled images decode")


def _walk(folder: Path):
    """Files below ``folder`` in a stable order, lazily (a sample must not list 672k files first)."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def _competition_names(labels_csv: Path, role: str, report: Report) -> list[str]:
    if not labels_csv.is_file():
        report.problems.append(f"{role} labels not found: {labels_csv}")
        return []
    try:
        labels = pd.read_csv(labels_csv, dtype={"img_name": str}, nrows=10_000)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        report.problems.append(f"{role} labels {labels_csv}: cannot be read ({exc})")
        return []
    if not {"img_name", "target"} <= set(labels.columns):
        report.problems.append(f"{role} labels {labels_csv}: need the columns img_name,target; found {list(labels.columns)}")
        return []
    targets = pd.to_numeric(labels["target"], errors="coerce")
    if not targets.isin([0, 1]).all():
        report.problems.append(f"{role} labels {labels_csv}: targets other than 0 and 1 in the first {len(labels)} rows")
    return list(labels["img_name"])


def _manifest_sample(path: Path, role: str, report: Report) -> list[Path]:
    try:
        table = Manifest.load(path).table
    except (ManifestError, ValueError) as exc:
        report.problems.append(f"{role} {path}: not a readable manifest ({exc})")
        return []
    return [Path(p) for p in table["path"].head(SAMPLE_IMAGES)]


# --------------------------------------------------------------------------- device, memory and disk


def _check_device_and_memory(values: dict[str, dict], report: Report) -> None:
    params = values.get(needs.TRAIN_STEP)
    gpu = torch.cuda.is_available()
    if gpu:
        props = torch.cuda.get_device_properties(0)
        available, where = props.total_memory, f"GPU {props.name}"
        report.notes.append(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, bf16 "
                            f"{'supported' if torch.cuda.is_bf16_supported() else 'not supported'}")
    else:
        available, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
        report.notes.append(f"device: CPU ({os.cpu_count()} cores), no GPU")
    if not params:
        return
    if params.get("mixed_precision") == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        report.problems.append(f"04 mixed_precision bf16: {torch.cuda.get_device_name(0)} does not support bf16 (use fp16)")
    if params.get("mixed_precision") in ("bf16", "fp16") and not gpu:
        report.notes.append(f"04 mixed_precision {params['mixed_precision']} applies on a GPU only: float32 here")
    try:
        tunings = memory.expert_tunings(params)
    except ValueError as exc:
        report.problems.append(f"04 tunings: {exc}")
        return
    known = set(known_backbones(params["backbones"]))
    for name, tuning in dict.fromkeys((n, t) for n, t in zip(params["backbones"], tunings) if n in known):
        half = gpu and params.get("mixed_precision") in ("bf16", "fp16")
        estimate = memory.estimate_training_memory(name, params, tuning, half=half)
        need = estimate.total
        about = "at most" if params.get("grad_checkpointing") else "about"
        mode = "" if tuning == "full" else f" ({tuning}: {estimate.trainable:,} of {estimate.weights:,} parameters train)"
        line = (f"04 training memory of a {name} expert{mode} at {estimate.side} px, batch {params['batch_size']}"
                f"{' in ' + str(params['grad_accum_steps']) + ' micro-batches' if int(params.get('grad_accum_steps') or 1) > 1 else ''}: "
                f"{about} {need / 2**30:.1f} GiB of {available / 2**30:.1f} GiB ({where})")
        _record(report, need < 0.9 * available, line if need < 0.9 * available else
                line + ": set grad_accum_steps or grad_checkpointing, or lower batch_size or image_size")


def known_backbones(names) -> list[str]:
    """The distinct names timm knows (an unknown one is already a problem of the weights check)."""
    known = []
    for name in dict.fromkeys(names):
        try:
            canonical_backbone_name(name)
        except ValueError:
            continue
        known.append(name)
    return known


def _check_disk(values: dict[str, dict], report: Report) -> None:
    """Room for notebook 03's images and notebook 04's training states under ``reports/``."""
    synth, train = values.get(needs.SYNTH_STEP), values.get(needs.TRAIN_STEP)
    need = 0.0
    if synth:
        side = int(synth.get("sd_image_size") or 512)
        need += int(synth["images_per_family"]) * len(synth["families"]) * side * side * PNG_BYTES_PER_PIXEL
    if train:
        need += 6 * sum(_expert_bytes(train))  # state (weights, 2 moments, EMA), best EMA, the mixture's share
    folder = REPORTS_DIR
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    line = f"disk: about {need / 2**30:.1f} GiB needed for augmented images and checkpoints, {free / 2**30:.1f} GiB free in {folder}"
    _record(report, need < free, line)


def _expert_bytes(train: dict) -> list[int]:
    """The float32 weights of every model notebook 04 trains, each of its own backbone (a ViT-L expert
    beside CNNs is not six times a CNN): the experts (backbones cycled), model (a) of the first backbone,
    and the loss ablation's three of the ablation re-split's backbone."""
    backbones = [name for name in train["backbones"] if name in set(known_backbones(train["backbones"]))]
    if not backbones:
        return []
    with torch.device("meta"):
        sizes = {name: sum(p.numel() for p in Expert(name).parameters()) * 4 for name in dict.fromkeys(backbones)}
    experts = max(len(train["backbones"]), int(train.get("max_experts") or 0))
    trained = [backbones[i % len(backbones)] for i in range(experts)] + [backbones[0]]
    trained += [backbones[int(train.get("ablation_resplit") or 0) % len(backbones)]] * (3 if train.get("run_ablation") else 0)
    return [sizes[name] for name in trained]


# --------------------------------------------------------------------------- dfd check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="demo", help="pipelines/<profile>.yaml: smoke, demo, full ... (or a .yaml path)")
    parser.add_argument("--only", help="check only these steps, e.g. 01,04")
    parser.add_argument("--from", dest="start", help="check this step and all later ones")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="the same overrides as dfd pipeline")


def run(args: argparse.Namespace) -> int:
    try:
        report = check_profile(args.profile, parse_overrides(args.param), args.only, args.start)
    except (PipelineError, ParameterError) as exc:
        log.error("dfd check: %s", exc)
        return 2
    for note in report.notes:
        print(f"ok: {note}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    print(f"{len(report.problems)} problem(s)" if report.problems else "all checks passed")
    return 0 if report.ok else 1
