"""How many CPU cores the kit plans its parallel work for.

The experts forwarded at once, OpenVINO's threads, the decoding workers of ``dfd predict``, the threads of
``dfd serve`` and of each sharded process are all shares of this count: the cores this process may run on
(its CPU affinity: a container's or ``taskset``'s limit, not the machine's total), or ``DFD_CPUS`` when set,
for a machine shared with other jobs (two test workers on two cores: 1 each). Torch's own thread count
follows ``OMP_NUM_THREADS`` as usual; set both, or more threads than cores spin against each other (on
this 2-core CPU two processes of 2 OpenMP threads each ran one model 8x slower than one thread each).
"""
from __future__ import annotations

import os

CPUS_ENV = "DFD_CPUS"


def available_cores() -> int:
    """``DFD_CPUS`` when set (an int >= 1), else the cores this process may run on."""
    chosen = os.environ.get(CPUS_ENV, "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(f"{CPUS_ENV} must be an int >= 1, got {chosen!r}")
        return int(chosen)
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity on this platform (macOS)
        return os.cpu_count() or 1
