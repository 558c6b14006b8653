"""bench/gpu_check.py at tiny sizes (--dry), so the one-command GPU check never rots between GPU runs."""
from __future__ import annotations

import importlib.util

from dfd_lib.core.paths import PROJECT_ROOT


def test_the_gpu_check_runs_dry(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", PROJECT_ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rows = gpu_check.main(["--dry", "--json", str(tmp_path / "rows.json")])
    kinds = {row["what"].split()[0] for row in rows}
    assert kinds == {"predictor", "train", "stable", "embedding"}
    assert sum(row["what"].startswith("train") for row in rows) == 2  # with and without checkpointing
    assert all(row["images_per_s"] > 0 and row["peak_mib"] > 0 for row in rows)
    assert (tmp_path / "rows.json").is_file() and "peak MiB" in capsys.readouterr().out
