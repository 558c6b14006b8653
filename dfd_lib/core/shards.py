"""Work shared by the N processes ``accelerate launch --num_processes N`` (or ``torchrun``) starts:
each takes its shard of an ordered list, writes its own part, and process 0 merges the parts into
what one process would have written (``dfd predict``, ``dfd embed``, notebook 04's test scores).

The list is dealt, not cut: process ``r`` of ``N`` takes items ``r, r+N, r+2N, ...`` (or blocks
of items so: whole batches), so the shards stay within one item (block) of each other whatever
the list's order (a folder of large videos then small images); :func:`interleave` puts them back
in the one-process order. A part is a file of its own beside the output (:func:`part_path`); a killed
run resumes from the parts already written. Several nodes need the output's folder on a file
system every node sees.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from dfd_lib.core.cpus import available_cores

T = TypeVar("T")


def world_size() -> int:
    """How many processes ``accelerate launch`` / ``torchrun`` started (1 when run plainly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def part_path(out: str | os.PathLike, rank: int, processes: int) -> Path:
    """Where process ``rank`` of ``processes`` writes its part of ``out``: ``OUT.part-<r>-of-<N>``."""
    return Path(out).with_name(f"{Path(out).name}.part-{rank}-of-{processes}")


def deal(items: Sequence[T], rank: int, processes: int, block: int = 1) -> list[T]:
    """Process ``rank``'s shard of ``items``: items ``rank, rank+processes, ...``; with ``block`` > 1,
    runs of ``block`` consecutive items are dealt so (a model's batches: each process forwards exactly
    the batches one process would, so their float sums round alike)."""
    if not 0 <= rank < processes or block < 1:
        raise ValueError(f"rank must be in [0, {processes}) and block >= 1, got {rank}, {block}")
    return [item for start in range(rank * block, len(items), processes * block) for item in items[start:start + block]]


def interleave(shards: Sequence[Sequence[T]], block: int = 1) -> list[T]:
    """The inverse of :func:`deal`: the shards of all processes, in rank order, back in the list's order."""
    merged: list[T] = []
    for start in range(0, max((len(s) for s in shards), default=0), block):
        for shard in shards:
            merged.extend(shard[start:start + block])
    return merged


class ShardGroup:
    """This process's place among the N working together (accelerate's ``PartialState``)."""

    def __init__(self, device: str | None = None):
        from accelerate import PartialState  # deferred: a plain one-process command does not import accelerate

        cpu = device == "cpu" or (device in (None, "", "auto") and not torch.cuda.is_available())
        self.state = PartialState(cpu=cpu)  # gloo between CPU processes, NCCL between GPUs
        self.rank, self.processes = self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process

    def mine(self, items: Sequence[T], block: int = 1) -> list[T]:
        return deal(items, self.rank, self.processes, block)

    def device(self, requested: str | None) -> str | None:
        """An explicit device as given; else (``None``, ``auto``) each process its own GPU, or the CPU."""
        if (requested and requested != "auto") or not torch.cuda.is_available():
            return requested
        return str(self.state.device)

    def threads(self, requested: int | None) -> int | None:
        """On the CPU the cores are shared between the processes unless ``requested`` says otherwise."""
        if requested is not None or torch.cuda.is_available():
            return requested
        return max(1, available_cores() // self.processes)

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process (also a barrier)."""
        from accelerate.utils import gather_object  # deferred: only under several processes

        return list(gather_object([value]))

    def first_error(self, error: str | None) -> str | None:
        """A barrier that tells every process the first ``error`` any process had (None: none had)."""
        return next((e for e in self.gather(error) if e), None)

    def raise_any(self, error: str | None, kind: type[Exception] = ValueError) -> None:
        """A barrier that raises ``kind`` in every process when any process had an ``error``: no
        process is left waiting at a later barrier for one that stopped."""
        first = self.first_error(error)
        if first:
            raise kind(first)

    def close(self) -> None:
        self.state.destroy_process_group()  # every process leaves the group before exiting
