"""OpenVINO models whose lifetimes overlap (the pipeline's experts, a Predictor beside them) leave the
thread's alternate signal stack valid (``dfd_lib/core/signal_stack.py``): a signal a Python handler
catches afterwards — here SIGCHLD, as a DataLoader worker's exit raises it — does not kill the process.
Run in a child process, since the failure is a SIGSEGV."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("openvino")

SCRIPT = textwrap.dedent("""
    import gc, signal, subprocess, sys
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops
    from dfd_lib.core.signal_stack import current_signal_stack
    from dfd_lib.scoring.backends import OpenVINOMixture

    parameter = ops.parameter([1, 3, 8, 8], np.float32)
    ov.save_model(ov.Model([ops.relu(parameter)], [parameter]), sys.argv[1])

    def mapped(address):
        for line in open("/proc/self/maps"):
            low, high = (int(part, 16) for part in line.split()[0].split("-"))
            if low <= address < high:
                return True
        return False

    first, second = OpenVINOMixture(sys.argv[1]), OpenVINOMixture(sys.argv[1])
    del first; gc.collect()
    third = OpenVINOMixture(sys.argv[1])
    del second; gc.collect()
    del third; gc.collect()  # the order that left a released model's stack in place
    address, size = current_signal_stack()
    print("stack", hex(address), size, "mapped" if mapped(address) else "UNMAPPED", flush=True)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    subprocess.run(["true"], check=True)
    print("a handled signal after the releases: survived", flush=True)
""")


def test_overlapping_openvino_models_leave_a_valid_signal_stack(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "relu.xml")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert " mapped" in done.stdout and "survived" in done.stdout, done.stdout
