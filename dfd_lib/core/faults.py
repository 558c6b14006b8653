"""Crash points: where the crash-consistency tests kill a run (``tests/test_crash_consistency.py``).

``DFD_CRASH_AT=<step>/<point>:<n>`` makes the notebook kernel of pipeline step ``<step>``
(``DFD_PIPELINE_STEP``, set by ``dfd pipeline``) SIGKILL itself the ``n``-th time it passes
``crash_point("<point>")``: no cleanup handler, ``finally`` or ``atexit`` runs, as when the machine
loses power or the OOM killer strikes. The points sit where a kill is most likely to leave something
half-written: between an embedding batch and the next, between generated images, between optimiser
steps, inside a checkpoint swap, and between writing a temporary file and renaming it into place.
Unset — always, outside those tests — a crash point costs one environment lookup.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

CRASH_ENV = "DFD_CRASH_AT"
RUNNER_ENV = "DFD_PIPELINE_RUNNER_PID"  # the process running the chain: it never kills itself, only the kernels it starts
POINTS = ("embeddings.batch", "enrichment.image", "training.step", "training.checkpoint", "atomic.before_replace")
_passed: Counter = Counter()


def crash_point(point: str) -> None:
    """SIGKILL this process if ``DFD_CRASH_AT`` names this step and ``point`` and its count is reached."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    where, _, count = spec.partition(":")
    step, _, name = where.rpartition("/")
    if name != point or (step and step != os.environ.get("DFD_PIPELINE_STEP")):
        return
    if os.environ.get(RUNNER_ENV) == str(os.getpid()):
        return  # the runner's own writes while a step runs (a test worker running several chains)
    _passed[point] += 1
    if _passed[point] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
