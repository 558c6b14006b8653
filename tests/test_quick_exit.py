"""A process ending through dfd_lib.core.quick_exit still runs every exit handler and flushes its output and
logs; only the interpreter's finalisation is skipped."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_every_exit_handler_runs_and_the_output_is_flushed(tmp_path):
    early, late, log_file = tmp_path / "early.txt", tmp_path / "late.txt", tmp_path / "log.txt"
    script = textwrap.dedent(f"""
        import atexit, logging, sys
        atexit.register(lambda: open({str(early)!r}, "w").write("before install"))
        from dfd_lib.core import quick_exit
        quick_exit.install()
        quick_exit.install()  # twice: still one handler
        atexit.register(lambda: open({str(late)!r}, "w").write("after install"))
        logging.basicConfig(filename={str(log_file)!r}, level=logging.INFO)
        logging.getLogger("kit").info("a buffered log line")
        class Finalised:
            def __del__(self):
                print("finalised")  # the teardown that is skipped
        kept = Finalised()
        sys.stdout.write("no newline at the end")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "no newline at the end"  # flushed; the object's __del__ never ran
    assert early.read_text() == "before install" and late.read_text() == "after install"
    assert "a buffered log line" in log_file.read_text()
