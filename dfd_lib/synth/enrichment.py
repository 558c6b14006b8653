"""Enriching a dataset with edited, regenerated and degraded images (notebook 03).

:func:`enrich_dataset` runs the work list of :mod:`dfd_lib.synth.plan` through the families of the
one fake factory (:mod:`dfd_lib.synth.factory`): image kinds one image at a time, model-backed kinds
in batches of one loaded model per family. It returns one manifest row per written image. Each new
image inherits its source's ``group``, ``split`` and ``cluster``; :func:`dfd_lib.data.resplit_table.attach_to_resplits`
then puts it on its source's side of every re-split.

Output goes to ``out_dir/<family>/<id>.png`` with its manipulation mask in ``out_dir/masks/<family>/<id>.png``
(the row's ``mask``; none for degraded reals, see :mod:`dfd_lib.synth.masks`) and a ``<id>.json`` sidecar holding its row:
a rerun reuses what exists (resume), a failing image is logged and skipped, and the
source files are only read. A family that loses more than ``config.max_failed_share`` of its
planned images stops the run with a summary (:mod:`dfd_lib.synth.failure_budget`). Under
``accelerate launch`` the work list is split between processes
(``PartialState().split_between_processes``); as a plain call it runs alone (``dfd augment`` /
``python -m dfd_lib.synth.cli`` is the command line for that).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
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
from dfd_lib.data.manifest import COLUMNS, MASK, Manifest, file_sha1
from dfd_lib.synth import factory, masks
from dfd_lib.synth.config import EnrichmentConfig
from dfd_lib.synth.failure_budget import check_failure_budget
from dfd_lib.synth.kinds import Family, is_missing
from dfd_lib.synth.plan import Job, plan_jobs

FAILURE_COLUMNS = ["id", "family", "parent", "reason"]
ROW_COLUMNS = COLUMNS + ["parent", "seed", "params", MASK]
_FINGERPRINT_KEY = "_fingerprint"  # sidecar only, not a manifest column
log = logging.getLogger(__name__)


def enrich_dataset(table: pd.DataFrame, config: EnrichmentConfig, out_dir: str | os.PathLike,
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate ``config``'s families from ``table``'s images into ``out_dir``.

    Returns ``(new_rows, failures)``: the manifest rows of every image now in ``out_dir``
    for this plan (made now or by an earlier run), with the extra columns ``parent``,
    ``seed``, ``params`` (JSON) and ``mask`` (its mask file, or empty); and one row per image
    that failed, with its reason.
    :class:`~dfd_lib.synth.failure_budget.FailureBudgetExceeded` when a family lost more than
    ``config.max_failed_share`` of its planned images (what was made stays in ``out_dir``).
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
    failures = pd.DataFrame(failures, columns=FAILURE_COLUMNS)
    check_failure_budget(Counter(job.family for job in jobs), new_rows, failures, config.max_failed_share)
    return new_rows, failures


def save_augmented_manifest(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the new rows as a manifest CSV (:meth:`dfd_lib.data.manifest.Manifest.load` reads it
    back; paths below its folder are stored relative to it)."""
    return Manifest(table.copy()).save(path)


# --------------------------------------------------------------------------- running


def _run_jobs(jobs: list[Job], config: EnrichmentConfig, out_dir: Path, state, progress: bool) -> tuple[list, list]:
    """This process's share of ``jobs``: image kinds first, then each model-backed family in batches."""
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
        by_model: dict[str, list[Job]] = {family.name: [] for family in factory.model_families()}
        for job in todo:
            family = factory.get_family(job.family)
            if family.name in by_model:
                by_model[family.name].append(job)
                continue
            try:
                rows.append(_run_image_job(family, job, out_dir))
            except Exception as exc:  # noqa: BLE001 - log, skip, go on
                failures.append(_failure(job, exc))
            bar.update(1)
            crash_point("enrichment.image")
        for name, model_jobs in by_model.items():
            if model_jobs:
                device = config.device or state.device
                rows += _run_model_jobs(factory.get_family(name), model_jobs, config, device, out_dir, failures)
                bar.update(len(model_jobs))
        bar.close()
    return rows, failures


def _run_image_job(family: Family, job: Job, out_dir: Path) -> dict:
    """One image of an image kind (an edit, a degradation) from its source and donor."""
    image = load_rgb(job.source["path"])
    try:
        donor = load_rgb(job.donor_path) if job.donor_path else None
    except ImageLoadError as exc:
        raise ImageLoadError(f"donor {job.donor_path}: {exc.reason}") from exc
    kind = factory.kind_of(family)
    made, params = kind.make(family, image, np.random.default_rng(job.seed), donor=donor)
    if job.donor_path:
        params["donor"] = job.donor_path
    return _write(out_dir, job, made, family.label_for(job.source["label"]), params, kind.mask(family, image, made, job.source))


def _run_model_jobs(family: Family, jobs: list[Job], config: EnrichmentConfig, device, out_dir: Path,
                    failures: list[dict]) -> list[dict]:
    """The images of ``jobs`` (all of model-backed ``family``), ``config.sd_batch_size`` per model call."""
    kind = factory.kind_of(family)
    ready: list[tuple[Job, object]] = []
    for job in jobs:
        try:
            image = load_rgb(job.source["path"])
            ready.append((job, kind.request(family, image, np.random.default_rng(job.seed), job.seed, job.source)))
        except Exception as exc:  # noqa: BLE001 - an unreadable source or mask fails its image alone
            failures.append(_failure(job, exc))
    if not ready:
        return []  # the model is loaded only once some source is readable
    loaded = kind.load(family, config, device)
    rows = []
    for index, image in kind.generate(loaded.model, [request for _job, request in ready], config, config.sd_batch_size):
        job, request = ready[index]
        if isinstance(image, Exception):
            failures.append(_failure(job, image))
            continue
        params = kind.params(family, request, loaded.name, config)
        try:
            mask = kind.mask(family, request, image, config)
            rows.append(_write(out_dir, job, image, family.label_for(job.source["label"]), params, mask))
        except (OSError, ValueError) as exc:
            failures.append(_failure(job, exc))
    return rows


def _failure(job: Job, exc: BaseException) -> dict:
    reason = exc.reason if isinstance(exc, ImageLoadError) else f"{type(exc).__name__}: {exc}"
    log.warning("augment: %s from %s failed: %s", job.id, job.source.get("path"), reason)
    return {"id": job.id, "family": job.family, "parent": str(job.source.get("path")), "reason": reason}


# --------------------------------------------------------------------------- files


def _paths(out_dir: Path, job: Job) -> tuple[Path, Path, Path]:
    """The image, its row sidecar and its mask."""
    folder = out_dir / job.family
    return folder / f"{job.id}.png", folder / f"{job.id}.json", masks.mask_path_for(out_dir, folder / f"{job.id}.png")


def _load_done(out_dir: Path, job: Job) -> dict | None:
    image_path, row_path, mask_path = _paths(out_dir, job)
    if not (image_path.is_file() and row_path.is_file()):
        return None
    try:
        row = json.loads(row_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a damaged sidecar: make the image again
    if row.pop(_FINGERPRINT_KEY, None) != job.fingerprint:
        return None  # made by another plan (other sources, settings or checkpoint): make it again
    if MASK not in row or (row[MASK] and not mask_path.is_file()):
        return None  # made before images recorded their masks, or its mask is gone: make it again (same pixels)
    row["path"] = str(image_path)
    row[MASK] = str(mask_path) if row[MASK] else None
    inherited = _inherited(job.source)
    if any(row.get(name) != value for name, value in inherited.items()):
        # the same image, but its source now sits elsewhere (another clustering, another split): the row
        # follows the source, as it would had the image been made now
        log.info("augment: %s reused; its source's %s changed since it was made", job.id,
                 ", ".join(name for name, value in inherited.items() if row.get(name) != value))
        row.update(inherited)
        _write_sidecar(row_path, row, job)
    return row


def _inherited(source: dict) -> dict:
    """What a made image takes from its source's row, beyond the image itself."""
    values = {"source": source.get("source"), "group": source.get("group"), "split": source.get("split"),
              "cluster": source.get("cluster")}
    return {k: (None if is_missing(v) else (v.item() if isinstance(v, np.generic) else v)) for k, v in values.items()}


def _write_sidecar(row_path: Path, row: dict, job: Job) -> None:
    sidecar = json.dumps({**row, _FINGERPRINT_KEY: job.fingerprint}, sort_keys=True)
    atomic_write(row_path, lambda tmp: tmp.write_text(sidecar, encoding="utf-8"))


def _write(out_dir: Path, job: Job, image: Image.Image, label: int, params: dict, mask: Image.Image | None) -> dict:
    """Write image, mask (if any) then row sidecar, each atomically: an interrupted write never looks done."""
    image_path, row_path, mask_path = _paths(out_dir, job)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(image_path, lambda tmp: image.save(tmp, format="PNG"))
    if mask is not None:
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(mask_path, lambda tmp: mask.save(tmp, format="PNG"))
    else:
        mask_path.unlink(missing_ok=True)  # a mask left by an earlier plan of this id is not this image's
    source = job.source
    row = {
        "path": str(image_path), "label": int(label), "family": job.family, "source": source.get("source"),
        "group": source.get("group"), "width": image.width, "height": image.height,
        "hash": file_sha1(image_path), "split": source.get("split"), "cluster": source.get("cluster"),
        "parent": str(source["path"]), "seed": job.seed, "params": json.dumps(params, sort_keys=True),
        MASK: str(mask_path) if mask is not None else None,
    }
    row = {k: (None if is_missing(v) else (v.item() if isinstance(v, np.generic) else v)) for k, v in row.items()}
    _write_sidecar(row_path, row, job)
    return row
