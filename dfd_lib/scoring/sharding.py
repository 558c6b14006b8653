"""``dfd predict`` under ``accelerate launch --num_processes N`` (``WORLD_SIZE`` > 1): the same
CSV as one process, scored by N.

The ordered input list (the files one process would score, in its order) is dealt out: process
``r`` scores files ``r, r+N, r+2N, ...`` into its own part file ``OUT.part-<r>-of-<N>`` with the
one-process engine (:func:`dfd_lib.scoring.stream.score_stream`, so ``--resume`` works per part).
After a barrier process 0 merges the parts into ``OUT`` in the one-process order (the rows of
a file together, as written), removes them, and alone reports the summary. With ``--resume``
the rows already in ``OUT`` are kept first and their files skipped, as one process does; an
``OUT`` of other columns stops every process before anything is scored. The process group, the
dealing and the part names are :mod:`dfd_lib.core.shards`', shared with ``dfd embed``.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from dfd_lib.core.shards import ShardGroup, part_path
from dfd_lib.scoring.inputs import iter_input_files
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.scoring.stream import StreamOptions, StreamSummary, check_columns, csv_columns, done_paths, score_stream


class Shards(ShardGroup):
    """This process's place among the N scoring together (:class:`dfd_lib.core.shards.ShardGroup`)."""

    def score(self, predictor: Predictor, inputs: list[str], out: Path, options: StreamOptions,
              resume: bool = False, progress: bool = True, problems: list[str] | None = None) -> StreamSummary | None:
        """Score this process's share, then (process 0) merge the parts into ``out``. Returns the
        summary of all processes on process 0, None on the others. A ``ValueError`` in any
        process (``--resume`` onto other columns, found before anything is scored) is raised in
        every process."""
        out = Path(out)
        error = None
        if resume and self.is_main:
            done_paths(out)  # drops a line a crash cut short, once, before anyone reads it
            error = _columns_error(out, csv_columns(predictor, options))
        self.raise_any(error)
        prior = done_paths(out) if resume else frozenset()
        listed = problems if self.is_main and problems is not None else []
        files = [str(p) for p in iter_input_files(inputs, listed) if str(p) not in prior]
        mine, part = self.mine(files), part_path(out, self.rank, self.processes)
        summary = StreamSummary()
        try:
            if mine:
                summary = score_stream(predictor, mine, part, options, resume=resume,
                                       progress=progress and self.is_main, problems=[])
            elif not resume:
                part.unlink(missing_ok=True)  # a part left by an earlier run
        except ValueError as exc:  # a part of an earlier run with other columns
            error = str(exc)
        results = self.gather((summary, error))  # also the barrier: every part is complete
        errors = [e for _, e in results if e]
        if errors:
            raise ValueError(errors[0])
        if not self.is_main:
            return None
        parts = [part_path(out, r, self.processes) for r in range(self.processes)]
        merge_parts(parts, out, files, keep=bool(prior))
        return _total([one for one, _ in results], files, skipped=len(prior))


def _columns_error(out: Path, columns: list[str]) -> str | None:
    try:
        check_columns(out, columns)
    except ValueError as exc:
        return str(exc)
    return None


def _total(summaries: list[StreamSummary], files: list[str], skipped: int) -> StreamSummary:
    """One summary of every process's, the unreadable files in the one-process order."""
    order = {path: i for i, path in enumerate(files)}
    total = StreamSummary(skipped=skipped)
    for one in summaries:
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
        if existing.split("\n", 1)[0].split(",") != header:  # Shards.score checked first: a file changed meanwhile
            raise ValueError(f"{out}: its columns are not this run's ({','.join(header)}); "
                             f"resume with the same weights and options, or write to another --out")
    merged = out.with_name(out.name + ".merging")
    with merged.open("w", newline="") as handle:
        handle.write(existing + buffer.getvalue())
    os.replace(merged, out)
    for part in present:
        part.unlink()
