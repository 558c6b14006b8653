"""Ending a process without tearing its modules down.

A process that has imported torch, timm, scikit-learn and matplotlib spends more than a second, after its last
line, on the interpreter's finalisation: every module dict cleared, every object freed one by one. Nothing of
the kit's is written there (artefacts are written atomically and closed by the code that writes them), so a
notebook kernel of the pipeline skips it: at exit, every exit handler still runs (logging's flush, the training
pool's clean-up, temporary folders), the standard streams are flushed, and then the process ends at once
(``os._exit``). Per notebook this saves about 2.5 s of a 5-step smoke run's 75 s (bench/RESULTS.md).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys


def exit_without_teardown() -> None:
    """The last exit handler: runs every other one, flushes, and ends the process with status 0."""
    atexit.unregister(exit_without_teardown)
    atexit._run_exitfuncs()  # the handlers registered before this one (atexit runs the latest first)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # a stream closed or replaced by None
            pass
    os._exit(0)


def install() -> None:
    """Make :func:`exit_without_teardown` this process's way out (call it once, early)."""
    atexit.unregister(exit_without_teardown)
    atexit.register(exit_without_teardown)
