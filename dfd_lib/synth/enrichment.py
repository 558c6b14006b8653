"""Enriching a dataset with edited, regenerated and degraded images (notebook 03).

:func:`enrich_dataset` runs the work list of :mod:`dfd_lib.synth.plan` through the one fake
factory (:mod:`dfd_lib.synth.factory`) and returns one manifest row per written image. Each new
image inherits its source's ``group``, ``split`` and ``cluster``; :func:`dfd_lib.data.resplit_table.attach_to_resplits`
then puts it on its source's side of every re-split.

Output goes to ``out_dir/<family>/<id>.png`` with a ``<id>.json`` sidecar holding its row:
a rerun reuses what exists (resume), a failing image is logged and skipped, and the
source files are only read. Under ``accelerate launch`` the work list is split between
processes (``PartialState().split_between_processes``); as a plain call it runs alone
(``dfd augment`` / ``python -m dfd_lib.synth.cli`` is the command line for that).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image

from dfd_lib.core.atomic import atomic_write
from dfd_lib.core.faults import crash_point
from dfd_lib.core.logs import progress_bar
from dfd_lib.data.images import ImageLoadError, load_rgb
from dfd_lib.data.manifest import COLUMNS, FAKE, Manifest, file_sha1
from dfd_lib.synth import diffusion, factory
from dfd_lib.synth.config import EnrichmentConfig
from dfd_lib.synth.plan import MASK_COLUMN, Job, is_missing, plan_jobs, text_or_none

FAILURE_COLUMNS = ["id", "family", "parent", "reason"]
ROW_COLUMNS = COLUMNS + ["parent", "seed", "params"]
_FINGERPRINT_KEY = "_fingerprint"  # sidecar only, not a manifest column
log = logging.getLogger(__name__)


def enrich_dataset(table: pd.DataFrame, config: EnrichmentConfig, out_dir: str | os.PathLike,
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate ``config``'s families from ``table``'s images into ``out_dir``.

    Returns ``(new_rows, failures)``: the manifest rows of every image now in ``out_dir``
    for this plan (made now or by an earlier run), with the extra columns ``parent``,
    ``seed`` and ``params`` (JSON); and one row per image that failed, with its reason.
    """
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise ValueError(f"source table lacks column(s) {missing}")
    out_dir = Path(out_dir).resolve()
    # cpu=True lets torchrun / accelerate launch split the work between CPU processes too
    state = PartialState(cpu=config.device == "cpu" or (not config.device and not torch.cuda.is_available()))
    jobs = plan_jobs(table, config)
    sources = {str(Path(p).resolve()) for p in table["path"]}
    clash = [str(path) for job in jobs for path in _paths(out_dir, job) if str(path) in sources]
    if clash:
        raise ValueError(f"out_dir {out_dir} would overwrite source images (e.g. {clash[0]}); choose another folder")
    threads = torch.get_num_threads()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    try:
        rows, failures = _run_jobs(jobs, config, out_dir, state, progress)
    finally:
        torch.set_num_threads(threads)
    if state.num_processes > 1:
        rows, failures = gather_object(rows), gather_object(failures)
    new_rows = pd.DataFrame(rows, columns=ROW_COLUMNS).sort_values("path", kind="stable").reset_index(drop=True)
    return new_rows, pd.DataFrame(failures, columns=FAILURE_COLUMNS)


def save_augmented_manifest(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the new rows as a manifest CSV (:meth:`dfd_lib.data.manifest.Manifest.load` reads it
    back; paths below its folder are stored relative to it)."""
    return Manifest(table.copy()).save(path)


# --------------------------------------------------------------------------- running


def _run_jobs(jobs: list[Job], config: EnrichmentConfig, out_dir: Path, state, progress: bool) -> tuple[list, list]:
    """This process's share of ``jobs``: edits first, then Stable Diffusion in batches."""
    rows: list[dict] = []
    failures: list[dict] = []
    # process k takes jobs k, k+n, k+2n, ...: every process gets its share of slow (SD) and fast families
    n = state.num_processes
    interleaved = [job for k in range(n) for job in jobs[k::n]]
    with state.split_between_processes(interleaved) as my_jobs:
        todo = []
        for job in my_jobs:
            done = _load_done(out_dir, job)
            if done is not None:
                rows.append(done)
            else:
                todo.append(job)
        bar = progress_bar(total=len(todo), desc=f"augment[{state.process_index}]", disable=not progress)
        for job in (job for job in todo if job.family not in factory.SD_FAMILIES):
            try:
                rows.append(_run_edit(job, out_dir))
            except Exception as exc:  # noqa: BLE001 - log, skip, go on
                failures.append(_failure(job, exc))
            bar.update(1)
            crash_point("enrichment.image")
        for family, task in factory.SD_FAMILIES.items():
            sd_jobs = [job for job in todo if job.family == family]
            if sd_jobs:
                device = config.device or state.device
                rows += _run_regenerations(sd_jobs, task, config, device, out_dir, failures)
                bar.update(len(sd_jobs))
        bar.close()
    return rows, failures


def _run_edit(job: Job, out_dir: Path) -> dict:
    image = load_rgb(job.source["path"])
    try:
        donor = load_rgb(job.donor_path) if job.donor_path else None
    except ImageLoadError as exc:
        raise ImageLoadError(f"donor {job.donor_path}: {exc.reason}") from exc
    edited, params = factory.make_edit(job.family, image, np.random.default_rng(job.seed), donor=donor)
    if job.donor_path:
        params["donor"] = job.donor_path
    label = int(job.source["label"]) if job.family in (factory.DEGRADED, factory.DEGRADED_FAKE) else FAKE
    return _write(out_dir, job, edited, label, params)


def _run_regenerations(jobs: list[Job], task: str, config: EnrichmentConfig, device, out_dir: Path,
                       failures: list[dict]) -> list[dict]:
    """The Stable Diffusion images of ``jobs`` (one family), ``config.sd_batch_size`` per call."""
    ready: list[tuple[Job, factory.DiffusionRequest]] = []
    for job in jobs:
        try:
            image = load_rgb(job.source["path"])
            mask = _given_mask(job, image) if task == "inpaint" else None
        except (ImageLoadError, OSError, ValueError) as exc:
            failures.append(_failure(job, exc))
            continue
        ready.append((job, factory.diffusion_request(job.family, image, np.random.default_rng(job.seed), job.seed, mask)))
    if not ready:
        return []  # the pipeline is loaded only once some source is readable
    checkpoint = config.checkpoint_for(task)
    pipe = diffusion.load_pipeline(task, checkpoint, seed=config.seed, device=device,
                                   single_file_config=config.sd_single_file_config or None)
    name = (checkpoint if diffusion.is_hub_id(checkpoint) else Path(checkpoint).name) if checkpoint else f"tiny-random-{task}"
    settings = config.diffusion
    rows = []
    for index, image in factory.generate_batches(pipe, [request for _job, request in ready], settings, config.sd_batch_size):
        job, request = ready[index]
        if isinstance(image, Exception):
            failures.append(_failure(job, image))
            continue
        params = factory.diffusion_params(job.family, request, name, settings)
        if text_or_none(job.source.get(MASK_COLUMN)):
            params["mask"] = text_or_none(job.source.get(MASK_COLUMN))
        try:
            rows.append(_write(out_dir, job, image, FAKE, params))
        except OSError as exc:
            failures.append(_failure(job, exc))
    return rows


def _given_mask(job: Job, image: Image.Image) -> Image.Image | None:
    """The source row's own inpainting mask (column :data:`MASK_COLUMN`), checked against its image."""
    value = text_or_none(job.source.get(MASK_COLUMN))
    if value is None:
        return None
    try:
        mask = load_rgb(value).convert("L")
    except ImageLoadError as exc:
        raise ImageLoadError(f"mask {value}: {exc.reason}") from exc
    if mask.size != image.size:
        raise ValueError(f"mask {value} is {mask.width}x{mask.height} but its source is {image.width}x{image.height}")
    return mask


def _failure(job: Job, exc: BaseException) -> dict:
    reason = exc.reason if isinstance(exc, ImageLoadError) else f"{type(exc).__name__}: {exc}"
    log.warning("augment: %s from %s failed: %s", job.id, job.source.get("path"), reason)
    return {"id": job.id, "family": job.family, "parent": str(job.source.get("path")), "reason": reason}


# --------------------------------------------------------------------------- files


def _paths(out_dir: Path, job: Job) -> tuple[Path, Path]:
    folder = out_dir / job.family
    return folder / f"{job.id}.png", folder / f"{job.id}.json"


def _load_done(out_dir: Path, job: Job) -> dict | None:
    image_path, row_path = _paths(out_dir, job)
    if not (image_path.is_file() and row_path.is_file()):
        return None
    try:
        row = json.loads(row_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a damaged sidecar: make the image again
    if row.pop(_FINGERPRINT_KEY, None) != job.fingerprint:
        return None  # made by another plan (other sources, settings or checkpoint): make it again
    row["path"] = str(image_path)
    return row


def _write(out_dir: Path, job: Job, image: Image.Image, label: int, params: dict) -> dict:
    """Write image then row sidecar, each atomically: an interrupted write never looks done."""
    image_path, row_path = _paths(out_dir, job)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(image_path, lambda tmp: image.save(tmp, format="PNG"))
    source = job.source
    row = {
        "path": str(image_path), "label": int(label), "family": job.family, "source": source.get("source"),
        "group": source.get("group"), "width": image.width, "height": image.height,
        "hash": file_sha1(image_path), "split": source.get("split"), "cluster": source.get("cluster"),
        "parent": str(source["path"]), "seed": job.seed, "params": json.dumps(params, sort_keys=True),
    }
    row = {k: (None if is_missing(v) else (v.item() if isinstance(v, np.generic) else v)) for k, v in row.items()}
    sidecar = json.dumps({**row, _FINGERPRINT_KEY: job.fingerprint}, sort_keys=True)
    atomic_write(row_path, lambda tmp: tmp.write_text(sidecar, encoding="utf-8"))
    return row
