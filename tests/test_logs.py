"""Progress where nobody can see a bar: log lines, not carriage returns piled into one line."""
from __future__ import annotations

import io
import subprocess
import sys

from dfd_lib.core.logs import LoggedProgress, progress_bar

SCRIPT = ("from dfd_lib.core.logs import progress_bar, setup_logging\n"
          "setup_logging()\n"
          "for _ in progress_bar(range(50), desc='scoring', unit='img'):\n"
          "    pass\n")


def test_progress_to_a_file_or_pipe_is_log_lines():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "scoring: 50/50 img (100%), in 0:00"


def test_a_terminal_keeps_tqdm(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not isinstance(progress_bar(range(3), desc="x"), LoggedProgress)
    monkeypatch.setenv("DFD_PIPELINE_STEP", "04_train_moe")  # a headless notebook step: lines again
    assert isinstance(progress_bar(range(3), desc="x"), LoggedProgress)
