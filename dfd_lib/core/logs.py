"""The library's diagnostics: python ``logging`` under the ``dfd_lib`` logger, and progress bars.

Modules log to ``logging.getLogger(__name__)`` and configure nothing. Entry points — the ``dfd``
command and :func:`dfd_lib.core.runs.open_run`, the first call of every notebook — call
:func:`setup_logging` once, which prints messages to stderr through ``tqdm.write`` so they never
break a progress bar: INFO as plain text, warnings and errors with their level in front.

Progress: :func:`progress_bar` is tqdm (a widget in a notebook, a bar in a terminal), except where a
bar cannot be seen: in a notebook that ``dfd pipeline`` runs headless (``DFD_PIPELINE_STEP`` set), and
in a command whose stderr is a file or a pipe (``dfd predict ... 2> log``). There progress becomes a log
line every ``DFD_PROGRESS_SECONDS`` (default 10) and one at the end.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from tqdm.auto import tqdm

ROOT_LOGGER = "dfd_lib"
PIPELINE_STEP_ENV = "DFD_PIPELINE_STEP"  # set by dfd pipeline for the kernel of the step it runs
PROGRESS_SECONDS_ENV = "DFD_PROGRESS_SECONDS"


class _TqdmHandler(logging.Handler):
    """Writes through ``tqdm.write`` to the *current* ``sys.stderr`` (a notebook or a test may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def setup_logging(level: int | str = logging.INFO) -> logging.Logger:
    """Show the library's messages at ``level`` and above on stderr (idempotent)."""
    logger = logging.getLogger(ROOT_LOGGER)
    if not any(isinstance(handler, _TqdmHandler) for handler in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    return logger


def progress_bar(iterable=None, total: int | None = None, desc: str = "", disable: bool = False, unit: str = "it", **options):
    """tqdm, or :class:`LoggedProgress` (same interface) where a bar cannot be seen: in a step that ``dfd
    pipeline`` runs headless, or when stderr is a file or a pipe rather than a terminal (outside a notebook),
    where carriage-return bars would pile up into one long line."""
    if os.environ.get(PIPELINE_STEP_ENV) or not (_in_notebook() or _is_terminal(sys.stderr)):
        return LoggedProgress(iterable, total=total, desc=desc, disable=disable, unit=unit)
    return tqdm(iterable, total=total, desc=desc, disable=disable, unit=unit, **options)


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (tqdm draws a widget there)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LoggedProgress:
    """The part of tqdm's interface the library uses, reported as log lines: ``desc: n/total unit (p%),
    rate, ETA | postfix`` at most every ``interval`` seconds, and once when closed."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", disable: bool = False, unit: str = "it",
                 interval: float | None = None):
        self.iterable, self.desc, self.disable, self.unit = iterable, desc, disable, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.interval = interval if interval is not None else float(os.environ.get(PROGRESS_SECONDS_ENV, 10))
        self.n, self.postfix, self.closed = 0, "", False
        self.started = self.last = time.perf_counter()
        self.log = logging.getLogger(f"{ROOT_LOGGER}.progress")

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.disable and now - self.last >= self.interval:
            self.last = now
            self.log.info(self.line(now))

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed and not self.disable and self.n:
            self.log.info(self.line(time.perf_counter(), done=True))
        self.closed = True

    def line(self, now: float, done: bool = False) -> str:
        seconds = max(now - self.started, 1e-9)
        rate = self.n / seconds
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = f", ETA {_clock((self.total - self.n) / rate)}" if self.total and rate > 0 and not done else ""
        timing = f"in {_clock(seconds)}" if done else f"{rate:.3g} {self.unit}/s{left}"
        return f"{self.desc}: {count} {self.unit}{share}, {timing}" + (f" | {self.postfix}" if self.postfix else "")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"
