"""One thread owns the model: requests queue their images, the thread scores them in batches.

A web server handles many requests at once, but a torch model is not meant to run several
forwards concurrently on shared weights (and Grad-CAM hooks must not see another request's
forward). So every use of the model goes through this worker's single thread, while
decoding and preprocessing stay in the server's thread pool. Images that arrive while a
batch is running are scored together in the next batch (up to ``max_batch``): no waiting
window, so a lone request is never delayed, and a busy server gets batching for free.

The queue is bounded (``max_queue`` images and calls waiting or running): past it a submit
raises :class:`QueueFull` at once, with a wait estimated from the measured time per image,
so an overloaded server answers 503 instead of holding ever more decoded images in memory.
"""
from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from dfd_lib.scoring.predictor import Predictor


@dataclass
class _Score:
    tensor: torch.Tensor  # preprocessed (3, S, S)
    future: Future


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future


_STOP = object()


@dataclass
class WorkerStats:
    images: int = 0
    batches: int = 0
    calls: int = 0
    refused: int = 0  # submissions refused because the queue was full
    model_seconds: float = 0.0  # time spent in scoring batches

    @property
    def mean_batch(self) -> float:
        return self.images / self.batches if self.batches else 0.0


class QueueFull(RuntimeError):
    """The model's queue holds ``max_queue`` jobs; ``retry_after`` is the estimated wait in seconds."""

    def __init__(self, queued: int, max_queue: int, retry_after: int):
        self.queued, self.max_queue, self.retry_after = queued, max_queue, retry_after
        super().__init__(f"the server is busy: {queued} images are queued for the model (limit {max_queue}); "
                         f"retry in about {retry_after} s")


DEFAULT_MAX_QUEUE = 64


class ModelWorker:
    """Serialises every use of ``predictor``'s model onto one thread and batches scoring."""

    def __init__(self, predictor: Predictor, max_batch: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE):
        max_batch = predictor.batch_size if max_batch is None else max_batch
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.queued = 0  # jobs submitted and not finished
        self._queued_lock = threading.Lock()
        self.stats = WorkerStats()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque = deque()
        self._thread = threading.Thread(target=self._serve, name="dfd-model", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submitting

    def retry_after(self) -> int:
        """Seconds until the queue has room, from the measured time per image (at least 1)."""
        per_image = self.stats.model_seconds / self.stats.images if self.stats.images else 1.0
        return max(1, math.ceil(self.queued * per_image))

    def _reserve(self, count: int) -> None:
        with self._queued_lock:
            if self.queued + count > self.max_queue:
                self.stats.refused += 1
                raise QueueFull(self.queued, self.max_queue, self.retry_after())
            self.queued += count

    def _release(self, count: int) -> None:
        with self._queued_lock:
            self.queued -= count

    def submit_scores(self, tensors: list[torch.Tensor]) -> list[Future]:
        """One future per tensor, resolving to ``(prob, expert_probs)``; :class:`QueueFull`
        when they do not fit in the queue (then none is queued)."""
        if not self._thread.is_alive():
            raise RuntimeError("the model worker has stopped")
        self._reserve(len(tensors))
        futures = []
        for tensor in tensors:
            future: Future = Future()
            self._jobs.put(_Score(tensor, future))
            futures.append(future)
        return futures

    def submit_call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the model thread, between batches (one place in the queue)."""
        if not self._thread.is_alive():
            raise RuntimeError("the model worker has stopped")
        self._reserve(1)
        future: Future = Future()
        self._jobs.put(_Call(fn, future))
        return future

    async def score(self, tensors: list[torch.Tensor]) -> list[tuple[float, list[float]]]:
        futures = self.submit_scores(tensors)
        return [await asyncio.wrap_future(f) for f in futures]

    async def call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.submit_call(fn))

    def close(self, timeout: float | None = 10.0) -> None:
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the model thread

    def _next(self, block: bool = True):
        if self._pending:
            return self._pending.popleft()
        return self._jobs.get() if block else self._jobs.get_nowait()

    def _serve(self) -> None:
        while True:
            job = self._next()
            if job is _STOP:
                return
            if isinstance(job, _Call):
                self._run_call(job)
                continue
            batch = [job]
            while len(batch) < self.max_batch:
                try:
                    following = self._next(block=False)
                except queue.Empty:
                    break
                if isinstance(following, _Score):
                    batch.append(following)
                else:  # a call or the stop signal: keep the order, run it after this batch
                    self._pending.append(following)
                    break
            self._run_scores(batch)

    def _run_scores(self, batch: list[_Score]) -> None:
        taken = len(batch)
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            self._release(taken)
            return
        start = time.perf_counter()
        try:
            out = self.predictor.predict_tensor(torch.stack([job.tensor for job in batch]))
        except BaseException as exc:  # every waiting request learns about it; the thread lives on
            self._release(taken)
            for job in batch:
                job.future.set_exception(exc)
            return
        self.stats.model_seconds += time.perf_counter() - start
        self._release(taken)
        self.stats.images += len(batch)
        self.stats.batches += 1
        for row, job in enumerate(batch):
            job.future.set_result((float(out["prob"][row]), [float(p) for p in out["expert_probs"][row]]))

    def _run_call(self, job: _Call) -> None:
        if not job.future.set_running_or_notify_cancel():
            self._release(1)
            return
        try:
            result = job.fn()
        except BaseException as exc:
            self._release(1)
            job.future.set_exception(exc)
            return
        self._release(1)
        self.stats.calls += 1
        job.future.set_result(result)
