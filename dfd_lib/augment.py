"""Enriching a dataset with edited, regenerated and degraded images (notebook 03).

:func:`augment_dataset` plans a deterministic work list from a manifest (which source image,
which family, which seed), runs it — edits from :mod:`dfd_lib.edits`, Stable Diffusion
img2img / inpainting from :mod:`dfd_lib.generation`, label-preserving degradations — and
returns one manifest row per written image. Each new image inherits its source's ``group``,
``split`` and ``cluster``, so every re-split keeps it on its source's side.

Output goes to ``out_dir/<family>/<id>.png`` with a ``<id>.json`` sidecar holding its row:
a rerun reuses what exists (resume), a failing image is logged and skipped, and the
source files are only read. Under ``accelerate launch`` the work list is split between
processes (``PartialState().split_between_processes``); as a plain call it runs alone
(``python -m dfd_lib.augment --help`` is the command line for that).

:func:`attach_to_resplits` then gives every new image the cluster and the train/val side of
its source's group in every re-split of notebook 02, so training never sees an edit of an
image it validates on, and :func:`save_augmented_manifest` writes the rows notebook 04 reads.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from dfd_lib import edits, generation
from dfd_lib.atomic import atomic_write
from dfd_lib.images import ImageLoadError, load_rgb
from dfd_lib.manifest import COLUMNS, file_sha1
from dfd_lib.paths import resolve

SD_FAMILIES: dict[str, str] = {"sd_img2img": "img2img", "sd_inpaint": "inpaint"}  # family -> pipeline task
DEGRADED, DEGRADED_FAKE = "degraded", "degraded_fake"
ALL_FAMILIES: tuple[str, ...] = (*edits.EDIT_FAMILIES, *SD_FAMILIES, DEGRADED)
FAILURE_COLUMNS = ["id", "family", "parent", "reason"]
_FINGERPRINT_KEY = "_fingerprint"  # sidecar only, not a manifest column
MASK_COLUMN = "inpaint_mask"  # optional source-table column: a mask image per source (white = repaint)


@dataclass
class AugmentConfig:
    """What to generate; the same config and source table give the same images."""

    families: tuple[str, ...] = ALL_FAMILIES  # edit families, "sd_img2img", "sd_inpaint", "degraded"
    images_per_family: int = 16  # new images written per family
    seed: int = 0  # fixes every source choice, edit and generation
    sd_checkpoint: str | None = None  # diffusers folder or .safetensors file; None = tiny random pipeline
    sd_inpaint_checkpoint: str | None = None  # a dedicated inpainting checkpoint for "sd_inpaint"; None = sd_checkpoint
    sd_single_file_config: str | None = None  # for a single-file checkpoint offline: a diffusers folder with its configs
    strength: float = 0.6  # img2img / inpainting strength (share of the steps that run)
    steps: int = 4  # denoising steps before strength is applied
    guidance_scale: float = 1.0  # <= 1 disables classifier-free guidance; 5-8 suits real checkpoints
    batch_size: int = 8  # images per Stable Diffusion call
    keep_unmasked: bool = True  # inpainting: paste the source back outside the mask (a fake differs only inside it)
    image_size: int | None = None  # Stable Diffusion working size; None = the pipeline's native size
    device: str | None = None  # None = this process's accelerate device (CUDA if present)
    degrade_fake_fraction: float = 0.0  # share of "degraded" images made from fakes (they stay fakes)
    source_splits: tuple[str, ...] | None = None  # draw sources only from these splits; None = all
    torch_threads: int | None = 1  # torch CPU threads during the run (1 is fastest for small CPU models on a
    # busy machine, see bench/RESULTS.md); None = leave torch's setting

    def __post_init__(self) -> None:
        self.families = tuple(self.families)
        unknown = [f for f in self.families if f not in ALL_FAMILIES]
        if unknown:
            raise ValueError(f"unknown augmentation famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                             f"expected some of {list(ALL_FAMILIES)}")
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"families are listed twice: {list(self.families)}")
        if self.images_per_family < 0:
            raise ValueError(f"images_per_family must be >= 0; got {self.images_per_family}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1]; got {self.strength}")
        if self.steps < 1 or int(self.steps * self.strength) < 1:
            raise ValueError(f"steps * strength must be at least 1; got {self.steps} * {self.strength}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.image_size is not None and self.image_size < 64:
            raise ValueError(f"image_size must be at least 64 (or None); got {self.image_size}")
        if not 0.0 <= self.degrade_fake_fraction <= 1.0:
            raise ValueError(f"degrade_fake_fraction must be in [0, 1]; got {self.degrade_fake_fraction}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 (or None); got {self.torch_threads}")
        if self.source_splits is not None:
            self.source_splits = tuple(self.source_splits)
        self.device = self.device or None  # '' (a notebook parameter) = automatic
        # '' (a notebook parameter) = the tiny pipeline; relative paths are under the project root
        self.sd_checkpoint = str(resolve(self.sd_checkpoint)) if self.sd_checkpoint else None
        self.sd_inpaint_checkpoint = str(resolve(self.sd_inpaint_checkpoint)) if self.sd_inpaint_checkpoint else None
        self.sd_single_file_config = str(resolve(self.sd_single_file_config)) if self.sd_single_file_config else None
        # a missing checkpoint must stop the run before anything is written
        if any(f in SD_FAMILIES for f in self.families):
            for what, value in (("checkpoint", self.sd_checkpoint), ("single-file config", self.sd_single_file_config),
                                ("inpainting checkpoint", self.sd_inpaint_checkpoint if "sd_inpaint" in self.families else None)):
                if value is not None and not Path(value).exists():
                    raise FileNotFoundError(f"Stable Diffusion {what} not found: {value}")

    def checkpoint_for(self, task: str) -> str | None:
        """The checkpoint that serves ``task`` ("img2img" or "inpaint"); None = the tiny pipeline."""
        return (self.sd_inpaint_checkpoint if task == "inpaint" else None) or self.sd_checkpoint


@dataclass
class _Job:
    id: str
    family: str
    seed: int
    source: dict  # the source manifest row
    donor_path: str | None = None
    fingerprint: str = ""  # what decides the image: a resumed run reuses a file only if this matches


def _family_seed(seed: int, family: str, index: int) -> int:
    """A per-image seed (index -1: the family's planning seed), independent of which other
    families run, so ids and images stay stable when the family list changes."""
    return int(np.random.SeedSequence([seed, zlib.crc32(family.encode()), index + 1]).generate_state(1)[0])


def plan_jobs(table: pd.DataFrame, config: AugmentConfig) -> list[_Job]:
    """The deterministic work list: for each family, which source (and donor) each image uses."""
    pool = table if config.source_splits is None else table[table["split"].isin(config.source_splits)]
    pool = pool.reset_index(drop=True)
    reals = pool[pool["label"] == 0]
    fakes = pool[pool["label"] == 1]
    jobs: list[_Job] = []
    for family in config.families:
        rng = np.random.default_rng(_family_seed(config.seed, family, -1))
        n = config.images_per_family
        candidates = reals
        if family == DEGRADED and config.degrade_fake_fraction > 0 and len(fakes):
            n_fake = int(round(n * config.degrade_fake_fraction))
            picks = _pick(fakes, n_fake, rng) + _pick(reals, n - n_fake, rng)
        else:
            picks = _pick(candidates, n, rng)
        if n and not picks:
            print(f"augment: no source images for family {family!r}; skipped", file=sys.stderr)
        for index, row in enumerate(picks):
            out_family = DEGRADED_FAKE if family == DEGRADED and int(row["label"]) == 1 else family
            job = _Job(f"{out_family}-s{config.seed}-{index:05d}", out_family,
                       _family_seed(config.seed, family, index), row)
            if family in edits.NEEDS_DONOR:
                # donors come from the same split: no content crosses a split boundary
                same_split = reals[reals["split"].astype(str) == str(row.get("split"))] if "split" in reals else reals
                donors = same_split if len(same_split) else reals
                job.donor_path = str(donors.iloc[int(rng.integers(len(donors)))]["path"])
            job.fingerprint = _fingerprint(job, config)
            jobs.append(job)
    return jobs


def _fingerprint(job: _Job, config: AugmentConfig) -> str:
    """A digest of everything that decides ``job``'s image: its source (path and content hash),
    donor, mask, seed and, for Stable Diffusion, the checkpoint and generation settings."""
    key: dict = {"family": job.family, "parent": str(job.source.get("path")), "parent_hash": _text(job.source.get("hash")),
                 "seed": job.seed, "donor": job.donor_path}
    if job.family in SD_FAMILIES:
        task = SD_FAMILIES[job.family]
        key.update(checkpoint=config.checkpoint_for(task), strength=config.strength, steps=config.steps,
                   guidance_scale=config.guidance_scale, image_size=config.image_size,
                   keep_unmasked=config.keep_unmasked, mask=_text(job.source.get(MASK_COLUMN)))
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _text(value) -> str | None:
    return None if value is None or _is_missing(value) or str(value) == "" else str(value)


def _pick(candidates: pd.DataFrame, n: int, rng: np.random.Generator) -> list[dict]:
    if n <= 0 or not len(candidates):
        return []
    order = rng.choice(len(candidates), size=n, replace=n > len(candidates))
    return [candidates.iloc[int(i)].to_dict() for i in order]


# --------------------------------------------------------------------------- running
def _paths(out_dir: Path, job: _Job) -> tuple[Path, Path]:
    folder = out_dir / job.family
    return folder / f"{job.id}.png", folder / f"{job.id}.json"


def _load_done(out_dir: Path, job: _Job) -> dict | None:
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


def _write(out_dir: Path, job: _Job, image: Image.Image, label: int, params: dict) -> dict:
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
    row = {k: (None if _is_missing(v) else (v.item() if isinstance(v, np.generic) else v)) for k, v in row.items()}
    sidecar = json.dumps({**row, _FINGERPRINT_KEY: job.fingerprint}, sort_keys=True)
    atomic_write(row_path, lambda tmp: tmp.write_text(sidecar, encoding="utf-8"))
    return row


def _is_missing(value) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _run_edit(job: _Job, out_dir: Path) -> dict:
    image = load_rgb(job.source["path"])
    rng = np.random.default_rng(job.seed)
    if job.family in (DEGRADED, DEGRADED_FAKE):
        edited, params = edits.degrade(image, rng)
        return _write(out_dir, job, edited, int(job.source["label"]), params)
    try:
        donor = load_rgb(job.donor_path) if job.donor_path else None
    except ImageLoadError as exc:
        raise ImageLoadError(f"donor {job.donor_path}: {exc.reason}") from exc
    edited, params = edits.apply_edit(job.family, image, rng, donor=donor)
    if job.donor_path:
        params["donor"] = job.donor_path
    return _write(out_dir, job, edited, 1, params)


def _run_sd_batch(jobs: list[_Job], get_pipe, pipe_name: str, config: AugmentConfig, out_dir: Path,
                  failures: list[dict]) -> list[dict]:
    task = SD_FAMILIES[jobs[0].family]
    ready = []
    for job in jobs:
        try:
            image = load_rgb(job.source["path"])
            given = _given_mask(job, image) if task == "inpaint" else None
        except (ImageLoadError, OSError, ValueError) as exc:
            failures.append(_failure(job, exc))
            continue
        ready.append((job, image, given))
    if not ready:
        return []
    pipe = get_pipe()  # loaded only once some source is readable
    prepared = []
    for job, image, given in ready:
        rng = np.random.default_rng(job.seed)
        prompt = generation.make_prompt(rng)
        mask = (given or generation.random_inpaint_mask(image.size, rng)) if task == "inpaint" else None
        prepared.append((job, image, prompt, mask))
    if len(prepared) > 1:
        try:
            outputs = generation.generate(
                pipe, [p[1] for p in prepared], [p[2] for p in prepared], [p[0].seed for p in prepared],
                strength=config.strength, steps=config.steps, guidance_scale=config.guidance_scale,
                masks=[p[3] for p in prepared] if task == "inpaint" else None, size=config.image_size,
                keep_unmasked=config.keep_unmasked)
        except Exception:  # noqa: BLE001 - retried one by one below, to isolate the failing image
            outputs = None
        if outputs is not None:
            rows = [_write_or_fail(out_dir, job, output, _sd_params(job, prompt, mask, pipe_name, config), failures)
                    for (job, _image, prompt, mask), output in zip(prepared, outputs)]
            return [row for row in rows if row is not None]
    rows = []
    for job, image, prompt, mask in prepared:
        try:
            output = generation.generate(pipe, [image], [prompt], [job.seed], strength=config.strength,
                                         steps=config.steps, guidance_scale=config.guidance_scale,
                                         masks=[mask] if mask is not None else None, size=config.image_size,
                                         keep_unmasked=config.keep_unmasked)[0]
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
            failures.append(_failure(job, exc))
            continue
        rows.append(_write_or_fail(out_dir, job, output, _sd_params(job, prompt, mask, pipe_name, config), failures))
    return [row for row in rows if row is not None]


def _given_mask(job: _Job, image: Image.Image) -> Image.Image | None:
    """The source row's own inpainting mask (column :data:`MASK_COLUMN`), checked against its image."""
    value = _text(job.source.get(MASK_COLUMN))
    if value is None:
        return None
    try:
        mask = load_rgb(value).convert("L")
    except ImageLoadError as exc:
        raise ImageLoadError(f"mask {value}: {exc.reason}") from exc
    if mask.size != image.size:
        raise ValueError(f"mask {value} is {mask.width}x{mask.height} but its source is {image.width}x{image.height}")
    return mask


def _write_or_fail(out_dir: Path, job: _Job, image: Image.Image, params: dict, failures: list[dict]) -> dict | None:
    try:
        return _write(out_dir, job, image, 1, params)
    except OSError as exc:
        failures.append(_failure(job, exc))
        return None


def _sd_params(job: _Job, prompt: str, mask: Image.Image | None, pipe_name: str, config: AugmentConfig) -> dict:
    params = {"pipeline": pipe_name, "task": SD_FAMILIES[job.family], "prompt": prompt, "strength": config.strength,
              "steps": config.steps, "guidance_scale": config.guidance_scale, "size": config.image_size}
    if mask is not None:
        params["mask_box"] = list(mask.getbbox() or ())
        params["keep_unmasked"] = config.keep_unmasked
        if _text(job.source.get(MASK_COLUMN)):
            params["mask"] = _text(job.source.get(MASK_COLUMN))
    return params


def _failure(job: _Job, exc: BaseException) -> dict:
    reason = exc.reason if isinstance(exc, ImageLoadError) else f"{type(exc).__name__}: {exc}"
    print(f"augment: {job.id} from {job.source.get('path')} failed: {reason}", file=sys.stderr)
    return {"id": job.id, "family": job.family, "parent": str(job.source.get("path")), "reason": reason}


def augment_dataset(table: pd.DataFrame, config: AugmentConfig, out_dir: str | os.PathLike,
                    progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate ``config``'s families from ``table``'s images into ``out_dir``.

    Returns ``(new_rows, failures)``: the manifest rows of every image now in ``out_dir``
    for this plan (made now or by an earlier run), with the extra columns ``parent``,
    ``seed`` and ``params`` (JSON); and one row per image that failed, with its reason.
    """
    from accelerate import PartialState

    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise ValueError(f"source table lacks column(s) {missing}")
    if config.source_splits is not None and "split" not in table.columns:
        raise ValueError("source_splits is set but the source table has no 'split' column")
    out_dir = Path(out_dir).resolve()
    # cpu=True lets torchrun / accelerate launch split the work between CPU processes too
    state = PartialState(cpu=config.device == "cpu" or (config.device is None and not torch.cuda.is_available()))
    jobs = plan_jobs(table, config)
    sources = {str(Path(p).resolve()) for p in table["path"]}
    clash = [str(path) for job in jobs for path in _paths(out_dir, job) if str(path) in sources]
    if clash:
        raise ValueError(f"out_dir {out_dir} would overwrite source images (e.g. {clash[0]}); choose another folder")
    threads = torch.get_num_threads()
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    try:
        rows, failures = _run_jobs(jobs, config, out_dir, state, progress)
    finally:
        torch.set_num_threads(threads)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        rows, failures = gather_object(rows), gather_object(failures)
    new_rows = pd.DataFrame(rows, columns=COLUMNS + ["parent", "seed", "params"])
    new_rows = new_rows.sort_values("path", kind="stable").reset_index(drop=True)
    return new_rows, pd.DataFrame(failures, columns=FAILURE_COLUMNS)


def _run_jobs(jobs: list[_Job], config: AugmentConfig, out_dir: Path, state, progress: bool) -> tuple[list, list]:
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
        bar = tqdm(total=len(todo), desc=f"augment[{state.process_index}]", disable=not progress)
        pipes: dict[str, object] = {}
        for job in todo:
            if job.family in SD_FAMILIES:
                continue
            try:
                rows.append(_run_edit(job, out_dir))
            except Exception as exc:  # noqa: BLE001 - log, skip, go on
                failures.append(_failure(job, exc))
            bar.update(1)
        for family, task in SD_FAMILIES.items():
            sd_jobs = [job for job in todo if job.family == family]
            if not sd_jobs:
                continue

            checkpoint = config.checkpoint_for(task)

            def get_pipe(task=task, checkpoint=checkpoint):
                if task not in pipes:
                    pipes[task] = generation.load_pipeline(task, checkpoint, seed=config.seed,
                                                           device=config.device or state.device,
                                                           single_file_config=config.sd_single_file_config)
                return pipes[task]

            name = Path(checkpoint).name if checkpoint else f"tiny-random-{task}"
            for start in range(0, len(sd_jobs), config.batch_size):
                batch = sd_jobs[start:start + config.batch_size]
                rows += _run_sd_batch(batch, get_pipe, name, config, out_dir, failures)
                bar.update(len(batch))
        bar.close()
    return rows, failures


# --------------------------------------------------------------------------- re-splits and manifest
def attach_to_resplits(resplits: pd.DataFrame, augmented: pd.DataFrame) -> pd.DataFrame:
    """``augmented`` with each row's ``cluster`` and every ``resplit_<i>`` taken from its source's
    group in ``resplits`` (the table :func:`dfd_lib.split.save_resplits` writes), so training on
    ``resplit_i == "train"`` of ``pd.concat([resplits, attached])`` keeps every image on its
    source's side. Rows whose group has no cluster there (sources from the test split, or from
    another dataset) are dropped and counted in ``.attrs["dropped"]`` (and one stderr line).
    Raises :class:`dfd_lib.split.LeakageError` if the concatenation puts a group on both sides.
    """
    from dfd_lib import split

    columns = split.resplit_columns(resplits)
    if not columns or not {"group", "cluster"} <= set(resplits.columns):
        raise ValueError("resplits must be a re-split table (group, cluster, resplit_<i>); see split.save_resplits")
    if "group" not in augmented.columns:
        raise ValueError("augmented rows need a 'group' column (the group of the image they come from)")
    known = resplits[resplits["cluster"].notna() & resplits["group"].notna()]
    # groups compared as text: a CSV round trip may turn "12" into 12 on one side only
    membership = known[["cluster", *columns]].assign(_group=known["group"].astype(str)).drop_duplicates()
    straddling = membership["_group"][membership["_group"].duplicated()].unique()
    if len(straddling):
        raise split.LeakageError(f"{len(straddling)} group(s) have several clusters or sides in the re-split table, "
                                 f"e.g. {list(straddling[:5])}")
    keys = augmented["group"].astype(str).where(augmented["group"].notna())
    present = keys.isin(membership["_group"])
    dropped = augmented[~present]
    if len(dropped):
        parents = dropped["parent"] if "parent" in dropped.columns else dropped["group"]
        print(f"attach_to_resplits: dropped {len(dropped)} augmented image(s) whose source group is in no re-split "
              f"(e.g. test-split sources), e.g. from {parents.iloc[0]}", file=sys.stderr)
    kept = augmented[present].drop(columns=["cluster", *split.resplit_columns(augmented)])
    attached = kept.assign(_group=keys[present]).merge(membership, on="_group", how="left", validate="many_to_one")
    attached = attached.drop(columns="_group")
    ordered = [c for c in COLUMNS if c in attached.columns]
    attached = attached[ordered + [c for c in attached.columns if c not in ordered]].reset_index(drop=True)
    combined = pd.concat([resplits, attached], ignore_index=True)
    combined["group"] = combined["group"].astype(str)
    split.check_no_group_leakage(combined)
    attached.attrs["dropped"] = int(len(dropped))
    return attached


def save_augmented_manifest(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the augmented rows as a manifest CSV (:meth:`dfd_lib.manifest.Manifest.load` reads
    it back; paths below its folder are stored relative to it)."""
    from dfd_lib.manifest import Manifest

    return Manifest(table.copy()).save(path)


def family_counts(rows: pd.DataFrame, failures: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per new family: its label, images written and images that failed."""
    counts = rows.groupby("family").agg(label=("label", "first"), images=("path", "size"))
    counts["label"] = counts["label"].map({0: "real", 1: "fake"})
    failed = failures["family"].value_counts() if failures is not None and len(failures) else pd.Series(dtype=int)
    counts = counts.reindex(counts.index.union(failed.index))
    counts["images"] = counts["images"].fillna(0).astype(int)
    counts["failed"] = failed.reindex(counts.index).fillna(0).astype(int)
    return counts


def resplit_side_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images on each side of every re-split, by class: one row per ``resplit_<i>``."""
    from dfd_lib import split

    label = table["label"].map({0: "real", 1: "fake"})
    out = {}
    for column in split.resplit_columns(table):
        out[column] = {f"{side}_{cls}": int(((table[column] == side) & (label == cls)).sum())
                       for side in (split.TRAIN, split.VAL) for cls in ("real", "fake")}
    return pd.DataFrame.from_dict(out, orient="index")


def plot_augmentation_grid(rows: pd.DataFrame, path: str | os.PathLike | None = None, per_family: int = 2):
    """One row per family: ``per_family`` examples, each as source | augmented image |
    absolute difference (bright = changed). Saved to ``path`` when given; returns the figure."""
    import matplotlib.pyplot as plt

    from dfd_lib.images import try_load_rgb
    from dfd_lib.viz import save_figure

    families = sorted(rows["family"].unique()) if len(rows) else []
    if not families:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no augmented images", ha="center", va="center")
    else:
        fig, axes = plt.subplots(len(families), 3 * per_family, figsize=(1.9 * 3 * per_family, 2.0 * len(families)),
                                 squeeze=False)
        for r, family in enumerate(families):
            examples = rows[rows["family"] == family].head(per_family)
            for e in range(per_family):
                cells = axes[r, 3 * e:3 * e + 3]
                for ax in cells:
                    ax.set_xticks([])
                    ax.set_yticks([])
                if e >= len(examples):
                    for ax in cells:
                        ax.axis("off")
                    continue
                row = examples.iloc[e]
                source, _ = try_load_rgb(row["parent"])
                made, _ = try_load_rgb(row["path"])
                for ax, image, title in ((cells[0], source, "source"), (cells[1], made, "augmented")):
                    if image is None:
                        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
                    else:
                        ax.imshow(image)
                    if r == 0:
                        ax.set_title(title, fontsize=9)
                if source is not None and made is not None and source.size == made.size:
                    diff = np.abs(np.asarray(made, np.int16) - np.asarray(source, np.int16)).max(axis=-1)
                    cells[2].imshow(diff, cmap="magma", vmin=0, vmax=255)
                if r == 0:
                    cells[2].set_title("|difference|", fontsize=9)
            kind = "real" if int(examples["label"].iloc[0]) == 0 else "fake"
            axes[r, 0].set_ylabel(f"{family}\n({kind})", fontsize=9)
        fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    """``python -m dfd_lib.augment`` (or ``accelerate launch -m dfd_lib.augment`` on several
    GPUs): generate into a run folder; notebook 03 with the same settings then finds every
    image already made and writes the augmented manifest."""
    parser.add_argument("--run-dir", required=True, help="run folder holding resplits.csv (from notebook 02)")
    parser.add_argument("--out", default="", help="output folder ('' = <run>/augmented)")
    parser.add_argument("--families", nargs="+", default=list(ALL_FAMILIES), help=f"some of {list(ALL_FAMILIES)}")
    parser.add_argument("--images-per-family", type=int, default=AugmentConfig.images_per_family)
    parser.add_argument("--sd-checkpoint", default="", help="diffusers folder or .safetensors ('' = tiny random pipeline)")
    parser.add_argument("--sd-inpaint-checkpoint", default="", help="a dedicated inpainting checkpoint ('' = --sd-checkpoint)")
    parser.add_argument("--sd-single-file-config", default="", help="diffusers folder with the configs of a single file")
    parser.add_argument("--strength", type=float, default=AugmentConfig.strength)
    parser.add_argument("--steps", type=int, default=AugmentConfig.steps)
    parser.add_argument("--guidance-scale", type=float, default=AugmentConfig.guidance_scale)
    parser.add_argument("--sd-batch-size", type=int, default=AugmentConfig.batch_size)
    parser.add_argument("--seed", type=int, default=AugmentConfig.seed)
    parser.add_argument("--source-splits", nargs="+", default=["train", "val"])


def run(args) -> int:
    from dfd_lib import runs
    from dfd_lib.split import load_resplits

    try:
        run_dir = runs.open_run(args.run_dir)
        config = AugmentConfig(families=tuple(args.families), images_per_family=args.images_per_family,
                               sd_checkpoint=args.sd_checkpoint, sd_inpaint_checkpoint=args.sd_inpaint_checkpoint,
                               sd_single_file_config=args.sd_single_file_config,
                               strength=args.strength, steps=args.steps, guidance_scale=args.guidance_scale,
                               batch_size=args.sd_batch_size, seed=args.seed, source_splits=tuple(args.source_splits))
        resplits = load_resplits(run_dir.require(runs.RESPLITS, "02_cluster_split"))
    except (ValueError, FileNotFoundError) as exc:
        print(f"augment: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else run_dir.path(runs.AUGMENTED_DIR)
    rows, failures = augment_dataset(resplits, config, out)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(family_counts(rows, failures).to_string())
        print(f"{len(rows)} images in {out}; {len(failures)} failed")
    return 0


if __name__ == "__main__":
    import argparse

    _parser = argparse.ArgumentParser(prog="python -m dfd_lib.augment", description=add_arguments.__doc__)
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
