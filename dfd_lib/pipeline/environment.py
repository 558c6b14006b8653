"""What a run ran on: the environment snapshot in ``reports/<run>/environment.json``, and how two
snapshots differ (what ``dfd rerun`` warns about).

The snapshot holds every installed distribution (``pip freeze``'s content, read through
``importlib.metadata`` so no subprocess is needed), python, torch with its CUDA and cuDNN versions,
the devices, the thread count, the git commit and whether the tree had uncommitted changes. Steps
add to the same file: the starting weights of every model (``weights``) and the content digest of
every input dataset (``inputs``); a resumed run keeps both.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
import sys

import torch

from dfd_lib.core.paths import PROJECT_ROOT

# shown first in the report; the full list is under "pip_freeze"
KEY_PACKAGES = ("torch", "torchvision", "timm", "diffusers", "transformers", "accelerate", "scikit-learn",
                "umap-learn", "numpy", "pandas", "papermill", "dfd-kit")
# what a step adds to environment.json and a new snapshot must keep
STEP_RECORDS = ("weights", "inputs", "trainings")


def pip_freeze() -> list[str]:
    """``name==version`` of every installed distribution, sorted by name."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[name.lower()] = f"{name}=={dist.version}"
    return [found[name] for name in sorted(found)]


def git_state(root=PROJECT_ROOT) -> tuple[str | None, bool | None]:
    """(commit, whether the work tree has uncommitted changes); (None, None) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty if commit else None


def torch_versions() -> dict:
    cuda = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn, "gpus": devices,
            "device": devices[0] if devices else f"cpu ({os.cpu_count()} cores)", "torch_threads": torch.get_num_threads()}


def environment_snapshot() -> dict:
    freeze = pip_freeze()
    versions = {name: _version(name) for name in KEY_PACKAGES}
    commit, dirty = git_state()
    return {"python": sys.version.split()[0], "platform": platform.platform(), **torch_versions(),
            "packages": versions, "git_commit": commit, "git_dirty": dirty,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "pip_freeze": freeze}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def snapshot_keeping(earlier: dict) -> dict:
    """A new snapshot that keeps what the steps recorded in ``earlier`` (a resumed run's weights and inputs)."""
    return {**environment_snapshot(), **{key: earlier[key] for key in STEP_RECORDS if key in earlier}}


def differences(recorded: dict, current: dict) -> list[str]:
    """Readable lines for what differs between two snapshots that could change results: the code's
    commit (and uncommitted changes), python, torch/CUDA/cuDNN, the device, threads and any package."""
    lines = []
    for key in ("git_commit", "git_dirty", "python", "torch", "cuda", "cudnn", "device", "torch_threads"):
        if recorded.get(key) != current.get(key):
            lines.append(f"{key}: {recorded.get(key)!r} then, {current.get(key)!r} now")
    before, after = _freeze_map(recorded), _freeze_map(current)
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            lines.append(f"package {name}: {before.get(name) or 'absent'} then, {after.get(name) or 'absent'} now")
    return lines


def _freeze_map(snapshot: dict) -> dict[str, str]:
    if snapshot.get("pip_freeze"):
        return {line.split("==", 1)[0].lower(): line.split("==", 1)[-1] for line in snapshot["pip_freeze"]}
    return {name: version for name, version in (snapshot.get("packages") or {}).items() if version}
