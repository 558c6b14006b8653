"""Several trainings at once, each in its own process: notebook 04's experts, loss-ablation variants and
ladder rungs on a machine that one training does not fill (the CPU demo: one torch thread per training
on 2 cores). A training's weights do not depend on the process it runs in: its initialisation, data
order and augmentation derive from its seed (:mod:`dfd_lib.training.trainer`), and each process sets the
training's own ``threads``, so the results are those of the same trainings one after another.

``processes`` = 1 trains in the calling process, one after another (the default, and what a GPU
wants: trainings in parallel on one GPU compete for its memory). The processes are started once with
``spawn`` (safe under a Jupyter kernel's threads) and kept for the next call until the caller exits;
they write into their trainings' folders only, and a training that fails or a process that dies loses
nothing finished: the other trainings run to the end, then the first error is raised, and a rerun with
``resume`` continues from the last checkpoints. An interrupted call stops its processes.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from logging.handlers import QueueHandler
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from dfd_lib.core.logs import ROOT_LOGGER
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.trainer import TrainResult, train_expert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingJob:
    """One call of :func:`dfd_lib.training.trainer.train_expert`."""

    train_table: pd.DataFrame
    val_table: pd.DataFrame
    config: TrainConfig
    out_dir: Path
    resume: bool = True

    def run(self) -> TrainResult:
        return train_expert(self.train_table, self.val_table, self.config, self.out_dir, resume=self.resume)


class TrainingFailed(RuntimeError):
    """A training of :func:`run_trainings` failed; the others ran to their end."""


def run_trainings(jobs: Sequence[TrainingJob], processes: int = 1) -> list[TrainResult]:
    """Each job's :class:`~dfd_lib.training.trainer.TrainResult`, in ``jobs``' order, trained ``processes`` at a
    time (1: in this process, one after another)."""
    jobs = list(jobs)
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ValueError(f"processes must be an int >= 1, got {processes!r}")
    if processes > 1 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError(f"training_processes {processes} inside an accelerate launch group of {os.environ['WORLD_SIZE']}: "
                         "the group already trains each model on every process; give 1")
    if processes == 1 or len(jobs) <= 1:
        return [job.run() for job in jobs]
    folders = [Path(job.out_dir).resolve() for job in jobs]
    if len(set(folders)) < len(folders):
        raise ValueError("two trainings would write into the same folder: " + ", ".join(
            sorted({str(f) for f in folders if folders.count(f) > 1})))
    workers = min(processes, len(jobs))
    log.info("training %d models, %d at a time in their own processes", len(jobs), workers)
    executor, records = _pool(processes)
    try:
        futures = [executor.submit(_run_job, job) for job in jobs]
        pending = set(futures)
        while pending:
            pending = wait(pending, timeout=RELAY_SECONDS)[1]
            _relay(records)
        _relay(records, linger=RELAY_SECONDS)  # the last lines may arrive after their training's result
    except BaseException:  # an interrupted notebook: no training may go on behind its back
        _close(processes, terminate=True)
        raise
    if any(isinstance(future.exception(), BrokenProcessPool) for future in futures):
        _close(processes, terminate=True)  # a dead process broke the pool: the next call starts a new one
    return _results(jobs, futures)


RELAY_SECONDS = 0.2  # how often the caller hands on its pool's log records
_POOLS: dict[int, tuple[ProcessPoolExecutor, Any]] = {}  # by size, with its log queue: kept for the next call
_THREADS_AT_START: list[int] = []  # in a pool process: torch's own thread count


def _pool(processes: int) -> tuple[ProcessPoolExecutor, Any]:
    """The pool of ``processes`` processes and the queue of their log records, started once (about 5 s of imports
    each) and kept until this process exits; started with ``spawn``, safe beside a Jupyter kernel's threads."""
    if processes in _POOLS and getattr(_POOLS[processes][0], "_broken", False):
        _close(processes, terminate=True)
    if processes not in _POOLS:
        context = multiprocessing.get_context("spawn")
        records = context.Queue()
        executor = ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_start_process,
                                       initargs=(records,))
        _POOLS[processes] = (executor, records)
    return _POOLS[processes]


def _relay(records, linger: float = 0.0) -> None:
    """The pool's log records so far, handled in the calling thread by their loggers: each message reaches a
    notebook's cell (or a terminal) once, as this process's own do (a pool process writing to its stderr would
    show in the cell and be echoed to the kernel's terminal as well)."""
    while True:
        try:
            record = records.get(timeout=linger) if linger else records.get_nowait()
        except queue.Empty:
            return
        logging.getLogger(record.name).handle(record)


def _close(processes: int, terminate: bool = False) -> None:
    executor, _ = _POOLS.pop(processes, (None, None))
    if executor is None:
        return
    children = list((getattr(executor, "_processes", None) or {}).values())  # no public handle on them
    executor.shutdown(wait=not terminate, cancel_futures=True)
    if terminate:
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(timeout=10)


def _close_all() -> None:
    """At exit: the pool processes stopped, not waited for (between calls they hold nothing unsaved)."""
    for processes in list(_POOLS):
        _close(processes, terminate=True)


# threading's exit hooks run in reverse order, before atexit's: this one before concurrent.futures' own,
# which would wait for each process to finish exiting (the hook concurrent.futures itself uses; no public one)
threading._register_atexit(_close_all)


def _start_process(records) -> None:
    """A pool process: the library's messages sent to the caller (:class:`_ToLogger`); Ctrl-C and a kernel's
    interrupt are the caller's to handle (it stops its processes), not a traceback from each of them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logger = logging.getLogger(ROOT_LOGGER)
    logger.handlers[:] = [QueueHandler(records)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _THREADS_AT_START.append(torch.get_num_threads())


def _run_job(job: TrainingJob) -> TrainResult:
    """In a pool process: the training at its own ``threads`` (0: torch's own count, not what an earlier training set)."""
    torch.set_num_threads(job.config.threads or _THREADS_AT_START[0])
    return job.run()


def _results(jobs: list[TrainingJob], futures: list[Future]) -> list[TrainResult]:
    failures = [(job, future.exception()) for job, future in zip(jobs, futures) if future.exception() is not None]
    for job, error in failures:
        log.error("training in %s failed: %s", job.out_dir, error)
    if failures:
        job, error = failures[0]
        died = isinstance(error, BrokenProcessPool)
        raise TrainingFailed(
            f"{len(failures)} of {len(jobs)} trainings failed, the first in {job.out_dir}: "
            + ("a training process died (killed, or out of memory?)" if died else f"{type(error).__name__}: {error}")
            + "; finished trainings are kept, and a rerun with resume continues the others from their last checkpoint"
        ) from error
    return [future.result() for future in futures]

