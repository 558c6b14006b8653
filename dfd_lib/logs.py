"""The library's diagnostics: python ``logging`` under the ``dfd_lib`` logger (progress bars stay tqdm).

Modules log to ``logging.getLogger(__name__)`` and configure nothing. Entry points — the ``dfd``
command and :func:`dfd_lib.pipeline.runs.open_run`, the first call of every notebook — call
:func:`setup_logging` once, which prints messages to stderr through ``tqdm.write`` so they never
break a progress bar: INFO as plain text, warnings and errors with their level in front.
"""
from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

ROOT_LOGGER = "dfd_lib"


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
