"""Resuming within an epoch, from a step checkpoint (``TrainConfig.checkpointing_steps``): the epoch's
running totals the checkpoint keeps (:class:`EpochTotals`, saved in
:attr:`~dfd_lib.training.training_state.Progress.partial`), and the epoch's batches after those
already done, in the same order (the order derives from ``(seed, epoch)``), skipped by the sampler
rather than read."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dfd_lib.training.losses import loss_names


@dataclass
class EpochTotals:
    """An epoch's running totals, so that a resumed epoch's history row counts the steps done before the
    kill. Saved, ``seen`` and ``sums`` are every process's together (the epoch's row sums them anyway);
    the timings are the main process's."""

    epoch: int
    steps: int = 0  # loop steps done in this epoch (each consumed grad_accum_steps micro-batches)
    seen: int = 0  # images learned from
    sums: dict[str, float] = field(default_factory=dict)  # per loss: the sum over those images
    data_seconds: float = 0.0  # waiting for data
    seconds: float = 0.0  # training so far
    lr: float = math.nan  # at the epoch's first step


def epoch_totals(partial: dict, epoch: int, lr: float, is_main_process: bool) -> EpochTotals:
    """The totals of ``epoch``: a step checkpoint's (``partial``) when it is of this epoch, else zero
    (``lr``: the learning rate now, at the epoch's first step)."""
    zero = dict.fromkeys(("overall", *loss_names()), 0.0)  # every registered term, 0 when off
    if partial.get("epoch") != epoch:
        return EpochTotals(epoch, sums=zero, lr=lr)
    totals = EpochTotals(**partial)
    if not is_main_process:  # the saved counts are every process's together: count them once
        totals.seen, totals.sums = 0, zero
    return totals


def summed(accelerator, totals: EpochTotals) -> list[float]:
    """``[images seen, *loss sums]`` of the epoch so far, summed over processes (every process takes part)."""
    values = torch.tensor([totals.seen, *totals.sums.values()], dtype=torch.float64, device=accelerator.device)
    return [float(value) for value in accelerator.reduce(values, "sum")]


def saved_totals(accelerator, totals: EpochTotals) -> dict:
    """``totals`` as a step checkpoint keeps them: counts summed over processes (every process takes part)."""
    sums = summed(accelerator, totals)
    return {**asdict(totals), "seen": int(sums[0]), "sums": dict(zip(totals.sums, sums[1:]))}


def epoch_batches(accelerator, loader, skip: int) -> tuple[Any, Iterator]:
    """The loader of the epoch's rest and its batches after the first ``skip`` micro-batches (never read)."""
    if not skip:
        return loader, iter(loader)
    loader = accelerator.skip_first_batches(loader, skip)
    batches = iter(loader)
    # A DataLoader draws its workers' base seed from the global RNG as its iteration starts. The uninterrupted
    # run drew it before the restored RNG state was saved: drawing it again would shift every later draw.
    with torch.random.fork_rng(devices=[]):
        first = next(batches)
    return loader, _chained(first, batches)


def _chained(first: Any, rest: Iterator) -> Iterator:
    yield first
    yield from rest  # closing this closes the loader's iteration too
