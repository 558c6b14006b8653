"""``dfd predict`` under ``accelerate launch --num_processes N`` (``WORLD_SIZE`` > 1): the same
CSV as one process, scored by N.

The ordered input list (the files one process would score, in its order) is dealt out: process
``r`` scores files ``r, r+N, r+2N, ...`` into its own part file ``OUT.part-<r>-of-<N>`` with the
one-process engine (:func:`dfd_lib.scoring.stream.score_stream`, so ``--resume`` works per part).
After a barrier process 0 merges the parts into ``OUT`` in the one-process order (the rows of
a file together, as written), removes them, and alone reports the summary. With ``--resume``
the rows already in ``OUT`` are kept first and their files skipped, as one process does.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import torch

from dfd_lib.scoring.inputs import iter_input_files
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.scoring.stream import StreamOptions, StreamSummary, done_paths, score_stream


def world_size() -> int:
    """How many processes ``accelerate launch`` / ``torchrun`` started (1 when run plainly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def part_path(out: Path, rank: int, processes: int) -> Path:
    return Path(out).with_name(f"{Path(out).name}.part-{rank}-of-{processes}")


class Shards:
    """This process's place among the N scoring together."""

    def __init__(self, device: str | None):
        from accelerate import PartialState  # deferred: a plain `dfd predict` does not import accelerate

        cpu = device == "cpu" or (not device and not torch.cuda.is_available())
        self.state = PartialState(cpu=cpu)  # gloo between CPU processes, NCCL between GPUs
        self.rank, self.processes = self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process

    def device(self, requested: str | None) -> str | None:
        """An explicit ``--device`` as given; else each process its own GPU, or the CPU."""
        if requested or not torch.cuda.is_available():
            return requested
        return str(self.state.device)

    def threads(self, requested: int | None) -> int | None:
        """On the CPU the cores are shared between the processes unless ``--threads`` says otherwise."""
        if requested is not None or torch.cuda.is_available():
            return requested
        return max(1, (os.cpu_count() or 1) // self.processes)

    def close(self) -> None:
        self.state.destroy_process_group()  # every process leaves the group before exiting

    def score(self, predictor: Predictor, inputs: list[str], out: Path, options: StreamOptions,
              resume: bool = False, progress: bool = True, problems: list[str] | None = None) -> StreamSummary | None:
        """Score this process's share, then (process 0) merge the parts into ``out``. Returns the
        summary of all processes on process 0, None on the others. A ``ValueError`` in any
        process (``--resume`` onto other columns) is raised in every process."""
        from accelerate.utils import gather_object  # deferred: only under several processes

        out = Path(out)
        if resume and self.is_main:
            done_paths(out)  # drops a line a crash cut short, once, before anyone reads it
        self.state.wait_for_everyone()
        prior = done_paths(out) if resume else frozenset()
        listed = problems if self.is_main and problems is not None else []
        files = [str(p) for p in iter_input_files(inputs, listed) if str(p) not in prior]
        mine, part = files[self.rank :: self.processes], part_path(out, self.rank, self.processes)
        summary, error = StreamSummary(), None
        try:
            if mine:
                summary = score_stream(predictor, mine, part, options, resume=resume,
                                       progress=progress and self.is_main, problems=[])
            elif not resume:
                part.unlink(missing_ok=True)  # a part left by an earlier run
        except ValueError as exc:
            error = str(exc)
        results = gather_object([(summary, error)])  # also the barrier: every part is complete
        errors = [e for _, e in results if e]
        if errors:
            raise ValueError(errors[0])
        if not self.is_main:
            return None
        parts = [part_path(out, r, self.processes) for r in range(self.processes)]
        merge_parts(parts, out, files, keep=bool(prior))
        order = {path: i for i, path in enumerate(files)}
        total = StreamSummary(skipped=len(prior))
        for one, _ in results:
            total.files += one.files
            total.scored += one.scored
            total.skipped += one.skipped
            total.fake += one.fake
            total.failed.extend(one.failed)
        total.failed.sort(key=lambda item: order.get(item[0], len(order)))
        return total


def merge_parts(parts: list[Path], out: Path, files: list[str], keep: bool = False) -> None:
    """Write the parts' rows to ``out`` in ``files``' order (rows of paths it lacks last), after
    ``out``'s own rows when ``keep``; then remove the parts. No part: ``out`` is left as it is."""
    present = [p for p in parts if p.is_file() and p.stat().st_size > 0]
    if not present:
        return
    header: list[str] | None = None
    groups: dict[str, list[list[str]]] = {}
    for part in present:
        with part.open(newline="") as handle:
            reader = csv.reader(handle)
            columns = next(reader)
            if header is not None and columns != header:
                raise ValueError(f"{part}: its columns are not the other parts' ({','.join(header)})")
            header = columns
            at = columns.index("path")
            for row in reader:
                groups.setdefault(row[at], []).append(row)
    assert header is not None
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # what csv.DictWriter wrote: the same text back
    kept = keep and out.is_file() and out.stat().st_size > 0
    if not kept:
        writer.writerow(header)
    for path in files:
        writer.writerows(groups.pop(path, []))
    for rows in groups.values():
        writer.writerows(rows)
    existing = ""
    if kept:
        with out.open(newline="") as old:
            existing = old.read()
        if existing.split("\n", 1)[0].split(",") != header:  # found only now, after scoring: the parts stay
            raise ValueError(f"{out}: its columns are not this run's ({','.join(header)}); "
                             f"resume with the same weights and options, or write to another --out")
    merged = out.with_name(out.name + ".merging")
    with merged.open("w", newline="") as handle:
        handle.write(existing + buffer.getvalue())
    os.replace(merged, out)
    for part in present:
        part.unlink()
