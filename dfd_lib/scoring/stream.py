"""``dfd predict``'s engine: score any number of files (images and videos) at the model's
speed, with memory bounded whatever the folder size, into a CSV written as batches finish.

- Inputs are walked lazily (:func:`iter_input_files`): a folder of 100k files is never held
  as images, only one file per DataLoader worker plus one model batch at a time.
- Decoding, video frame sampling, face detection and preprocessing run in DataLoader worker
  processes (``workers``); the main process only runs the model. On a GPU the batches come
  in pinned memory and are copied with ``non_blocking=True``.
- Rows are appended to the CSV (one ``write`` + flush per batch of files), so a crash loses
  at most the batch in flight; ``resume`` skips the files the CSV already lists (a partly
  written last line is dropped first).

One file gives one row: an image's (faces: the rule's face, see :mod:`dfd_lib.scoring.faces`),
a video's (the mean over its sampled frames, the max beside it), or its error; with
``per_frame`` a video also gives one row per frame (``kind`` = ``frame``).

With ``maps_dir`` (``dfd predict --maps DIR``, a mixture with localisation heads) each scored photo's map is
written there from the same forward pass (:mod:`dfd_lib.scoring.maps`) before its row, which names the file in
the column ``map``; videos get none (the column stays empty), and face crops are refused (a photo's map is of
the whole photo).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dfd_lib.core.cpus import available_cores
from dfd_lib.core.logs import progress_bar
from dfd_lib.scoring.calibration import VerdictThreshold
from dfd_lib.scoring.faces import FaceOptions, faces_text, summarise_faces
from dfd_lib.scoring.file_crops import FileCrops, ScoringFiles, as_is, worker_init
from dfd_lib.scoring.inputs import iter_input_files
from dfd_lib.scoring.maps import full_resolution, write_map
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.scoring.videos import DEFAULT_FRAMES

AUTO_WORKERS_FROM = 64  # files


@dataclass(frozen=True)
class StreamOptions:
    """What ``dfd predict`` does with each file."""

    faces: FaceOptions | None = None  # None: score whole images
    frames: int = DEFAULT_FRAMES  # frames sampled evenly from each video
    per_frame: bool = False  # also one row per video frame
    workers: int | None = None  # DataLoader processes decoding (0: the main process; None: by the file count)
    verdicts: VerdictThreshold | None = None  # adds the columns verdict, threshold, threshold_source
    maps_dir: Path | None = None  # each photo's localisation map written here; adds the column map

    def __post_init__(self):
        if self.maps_dir is not None and self.faces is not None:
            raise ValueError("--maps draws each photo's map over the whole photo: score without --faces")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


# --------------------------------------------------------------------------- rows


def stream_columns(num_experts: int) -> list[str]:
    return ["path", "kind", "frame", "prob_fake", "prob_fake_max", "frames_scored",
            *[f"prob_expert_{i}" for i in range(num_experts)], "faces_found", "face_box", "faces", "error"]


def file_rows(item: FileCrops, probs: np.ndarray, experts: np.ndarray, options: StreamOptions) -> list[dict]:
    """The CSV rows of one scored file (``probs``/``experts``: its crops' scores in order)."""
    if item.error:
        return [{"path": item.path, "kind": item.kind, "error": item.error}]
    rule = options.faces.rule if options.faces is not None else "max"
    views, start = [], 0
    for frame, count, boxes in item.views:
        scores = summarise_faces(list(probs[start : start + count]), list(experts[start : start + count]), boxes, rule)
        start += count
        row = {"path": item.path, "kind": "frame" if item.kind == "video" else "image", "prob_fake": scores.prob,
               **{f"prob_expert_{i}": p for i, p in enumerate(scores.expert_probs)}}
        if item.kind == "video":
            row["frame"] = frame
        if options.faces is not None:
            row.update(faces_found=scores.faces_found, face_box=scores.face_box, faces=faces_text(scores.probs, scores.boxes))
        views.append(row)
    if item.kind == "image":
        return views
    frame_probs = [v["prob_fake"] for v in views]
    summary = {"path": item.path, "kind": "video", "prob_fake": float(np.mean(frame_probs)),
               "prob_fake_max": float(np.max(frame_probs)), "frames_scored": len(views)}
    for i in range(experts.shape[1]):
        summary[f"prob_expert_{i}"] = float(np.mean([v[f"prob_expert_{i}"] for v in views]))
    if options.faces is not None:  # frames in which a face was found
        summary["faces_found"] = sum(v["faces_found"] > 0 for v in views)
    return [summary, *(views if options.per_frame else [])]


def check_maps(predictor: Predictor, options: StreamOptions) -> None:
    """A ``ValueError`` when ``options`` ask for maps this predictor cannot draw."""
    if options.maps_dir is None:
        return
    predictor.require_maps()
    if predictor.backend != "torch":
        raise ValueError(f"the {predictor.backend} backend's exported graph has no localisation map: "
                         f"--maps needs --backend torch")


def csv_columns(predictor: Predictor, options: StreamOptions) -> list[str]:
    """The columns of the CSV :func:`score_stream` writes with this predictor and these options."""
    verdict_columns = list(VerdictThreshold.COLUMNS) if options.verdicts is not None else []
    map_columns = ["map"] if options.maps_dir is not None else []
    return stream_columns(predictor.num_experts) + verdict_columns + map_columns


def check_columns(path: Path, columns: list[str]) -> None:
    """A ``ValueError`` when the non-empty CSV ``path`` has other columns (``--resume`` onto another run's CSV)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open(newline="") as handle:
        header = handle.readline().strip()
    if header.split(",") != columns:
        raise ValueError(f"{path}: its columns ({header}) are not this run's ({','.join(columns)}); "
                         f"resume with the same weights and options, or write to another --out")


class CsvAppender:
    """Appends rows to a CSV, one write and flush per batch; ``resume`` keeps what is there."""

    def __init__(self, path: Path, columns: list[str], resume: bool):
        self.path, self.columns = Path(path), columns
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (resume and self.path.is_file() and self.path.stat().st_size > 0)
        if not fresh:
            check_columns(self.path, columns)
        self.handle = self.path.open("w" if fresh else "a", newline="")
        if fresh:
            self.write([])

    def write(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, restval="", lineterminator="\n")
        if self.handle.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)
        self.handle.write(buffer.getvalue())
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def done_paths(csv_path: Path) -> frozenset[str]:
    """The paths a CSV already lists; a last line cut short by a crash is removed first."""
    if not csv_path.is_file() or csv_path.stat().st_size == 0:
        return frozenset()
    with csv_path.open("rb+") as handle:
        data = handle.read()
        if not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)
    with csv_path.open(newline="") as handle:
        return frozenset(row["path"] for row in csv.DictReader(handle) if row.get("path"))


# --------------------------------------------------------------------------- the loop


@dataclass
class StreamSummary:
    files: int = 0
    scored: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: int = 0  # already in the CSV (resume)
    fake: int = 0  # files whose verdict is fake (with StreamOptions.verdicts)


def count_files(inputs: list[str], skip: frozenset[str], problems: list[str]) -> int:
    """How many files a run will score (one lazy walk, names only: for the progress bar)."""
    return sum(str(p) not in skip for p in iter_input_files(inputs, problems))


def auto_workers(files: int) -> int:
    """Decoding processes for ``files`` files: none for a few (starting one takes seconds),
    else one per spare core, at most 3."""
    return 0 if files < AUTO_WORKERS_FROM else max(0, min(3, available_cores() - 1))


def score_stream(predictor: Predictor, inputs: list[str], out: Path, options: StreamOptions = StreamOptions(),
                 resume: bool = False, progress: bool = True, problems: list[str] | None = None) -> StreamSummary:
    """Score every file ``inputs`` name into the CSV ``out``, appending batch by batch."""
    check_maps(predictor, options)
    out = Path(out)
    skip = done_paths(out) if resume else frozenset()
    problems = [] if problems is None else problems
    total = count_files(inputs, skip, problems)
    summary = StreamSummary(skipped=len(skip))
    if not total and not skip:
        return summary  # nothing to score: no CSV
    dataset = ScoringFiles(inputs, predictor.transform, predictor.preprocess, options.faces, options.frames, skip)
    workers = auto_workers(total) if options.workers is None else options.workers
    if workers and predictor.device.type == "cpu":  # the model's threads and the decoders share the cores
        torch.set_num_threads(max(1, min(torch.get_num_threads(), available_cores() - workers)))
    # spawned, not forked: a process that has used OpenCV's thread pool deadlocks its forked children
    loader = DataLoader(dataset, batch_size=None, collate_fn=as_is, num_workers=workers,
                        pin_memory=predictor.device.type == "cuda", worker_init_fn=worker_init if workers else None,
                        prefetch_factor=4 if workers else None, multiprocessing_context="spawn" if workers else None)
    writer = CsvAppender(out, csv_columns(predictor, options), resume)
    bar = progress_bar(total=total, desc="scoring", unit="file", disable=not progress, smoothing=0.1)
    pending: list[FileCrops] = []
    try:
        for item in loader:
            pending.append(item)
            if sum(len(p.tensor) for p in pending if not p.error) >= predictor.batch_size:
                _flush(predictor, pending, options, writer, summary, bar)
        _flush(predictor, pending, options, writer, summary, bar)
    finally:
        writer.close()
        bar.close()
    return summary


def _flush(predictor: Predictor, pending: list[FileCrops], options: StreamOptions, writer: CsvAppender,
           summary: StreamSummary, bar) -> None:
    """Score the pending files' crops (in model batches), append their rows, empty ``pending``."""
    if not pending:
        return
    ready = [p for p in pending if not p.error]
    probs, experts, masks = np.empty(0), np.empty((0, predictor.num_experts)), None
    if ready:
        crops = torch.cat([p.tensor for p in ready])
        outs = [predictor.predict_tensor(crops[i : i + predictor.batch_size])
                for i in range(0, len(crops), predictor.batch_size)]
        probs = torch.cat([o["prob"] for o in outs]).numpy()
        experts = torch.cat([o["expert_probs"] for o in outs]).numpy()
        if options.maps_dir is not None:
            masks = torch.cat([o["mask"] for o in outs])
    rows, start = [], 0
    for item in pending:
        count = 0 if item.error else len(item.tensor)
        new_rows = file_rows(item, probs[start : start + count], experts[start : start + count], options)
        if masks is not None and item.kind == "image" and not item.error:  # written before its row: resumable
            new_rows[0]["map"] = str(write_map(options.maps_dir, item.path, full_resolution(masks[start], item.size)))
        if options.verdicts is not None:  # the file's own row comes first, then its frames'
            for row in new_rows:
                row.update(options.verdicts.fields(row.get("prob_fake")))
            summary.fake += new_rows[0]["verdict"] == "fake"
        rows.extend(new_rows)
        start += count
        summary.files += 1
        if item.error:
            summary.failed.append((item.path, item.error))
        else:
            summary.scored += 1
    writer.write(rows)
    bar.update(len(pending))
    pending.clear()
