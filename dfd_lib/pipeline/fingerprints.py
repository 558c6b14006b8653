"""What a step ran on: its fingerprint, recorded in ``reports/<run>/fingerprints.json`` when it succeeds.

A fingerprint holds the step's resolved parameter values, the content digest (sha256) of every run file
it reads (:data:`dfd_lib.core.runs.STEPS`), a signature of every file outside the run its parameters
name (datasets, weights, checkpoints: paths, sizes and modification times, so a dataset of 672k images
is checked in seconds), and the code it ran: the digest of its notebook's code cells and of every
``dfd_lib`` module the notebook imports, directly or not (per module, so a change can be named).

Digests of run files are cached by size and modification time (``.digests.json`` in the run folder):
an unchanged file is never read twice.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import nbformat

from dfd_lib.core import runs
from dfd_lib.core.atomic import atomic_write
from dfd_lib.core.paths import PROJECT_ROOT, resolve
from dfd_lib.pipeline.steps import Step
from dfd_lib.sources.demo import SMOKE_SIZE, demo_dir_for
from dfd_lib.sources.run_dataset import DEMO_NAMES

LIBRARY = "dfd_lib"
LIBRARY_DIR = PROJECT_ROOT / LIBRARY
MISSING = "missing"
# files in run folders that are never an input: what a killed process leaves, tracker logs written as it goes
IGNORED_PARTS = (".tmp", ".partial.npy", ".old")


# --------------------------------------------------------------------------- run files


def _sha256(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(part in p.name for part in IGNORED_PARTS))


def file_digests(run_dir: Path, names: Iterable[str]) -> dict[str, str]:
    """``relative path -> sha256`` of every file of the run files (or folders) ``names``; a name that
    does not exist maps to ``"missing"``."""
    run_dir = Path(run_dir)
    cache_path = run_dir / runs.DIGEST_CACHE
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    digests: dict[str, str] = {}
    changed = False
    for name in names:
        path = run_dir / name
        if not path.exists():
            digests[name] = MISSING
            continue
        for file in _files_under(path):
            relative = file.relative_to(run_dir).as_posix()
            stat = file.stat()
            known = cache.get(relative)
            if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
                digests[relative] = known[2]
                continue
            digests[relative] = _sha256(file)
            cache[relative] = [stat.st_size, stat.st_mtime_ns, digests[relative]]
            changed = True
    if changed and run_dir.is_dir():
        atomic_write(cache_path, lambda tmp: tmp.write_text(json.dumps(cache, sort_keys=True)))
    return digests


# --------------------------------------------------------------------------- files outside the run


def tree_signature(path: Path) -> str:
    """A digest of the paths, sizes and modification times of ``path`` (a file or every file below a folder)."""
    if not path.exists():
        return MISSING
    digest = hashlib.sha256()
    for file in _files_under(path):
        stat = file.stat()
        digest.update(f"{file.relative_to(path.parent).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _external_items(step: Step, values: Mapping) -> Iterable[tuple[str, str, str]]:
    """``(label, parameter, value)`` of each non-empty path value of ``step``'s outside parameters."""
    for name in step.spec.external:
        value = values.get(name)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            if isinstance(item, str) and item:
                yield (name if len(items) == 1 else f"{name}[{i}]"), name, item


def _is_demo(name: str, item: str) -> bool:
    return name.endswith("dataset") and item in DEMO_NAMES


def external_paths(step: Step, values: Mapping) -> dict[str, Path]:
    """``parameter -> path`` of each file or folder outside the run that ``step``'s parameters name: the
    demo datasets by their folder, local paths as given (a Hugging Face hub id such as ``org/name``, which
    is no local path, is identified by its cached revision instead and left out here)."""
    found: dict[str, Path] = {}
    for label, name, item in _external_items(step, values):
        if _is_demo(name, item):
            found[label] = demo_dir_for(SMOKE_SIZE if item == "demo-smoke" else int(values.get("demo_size", 2000)))
        elif resolve(item).exists() or not _looks_like_hub_id(item):
            found[label] = resolve(item)
    return found


def built_inputs(step: Step, values: Mapping) -> dict[str, Path]:
    """The outside inputs of :func:`external_paths` that ``step`` builds itself: the demo datasets, which
    notebook 01 builds from their recipe when absent (or changed), so they are signed as it leaves them."""
    demo = {label for label, name, item in _external_items(step, values) if _is_demo(name, item)}
    return {label: path for label, path in external_paths(step, values).items() if label in demo}


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not os.path.splitext(text)[1]


def settled(fingerprint: dict, step: Step, values: Mapping) -> dict:
    """``fingerprint`` (taken before ``step`` ran) as it is recorded once the step succeeded: the inputs it
    built itself (:func:`built_inputs`) signed as they are now, so that a fresh clone's first run, which
    builds the demo, is up to date after it."""
    built = {label: tree_signature(path) for label, path in built_inputs(step, values).items()}
    return {**fingerprint, "external": {**fingerprint["external"], **built}}


# --------------------------------------------------------------------------- code


def _module_file(module: str) -> Path | None:
    relative = Path(*module.split("."))
    for candidate in (PROJECT_ROOT / relative.with_suffix(".py"), PROJECT_ROOT / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(source: str, package: str = "") -> set[str]:
    """The ``dfd_lib`` modules ``source`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith(LIBRARY)}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(LIBRARY) and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if _module_file(f"{node.module}.{alias.name}")}
    return {module for module in found if _module_file(module)}


@functools.lru_cache(maxsize=512)
def _module_imports(path: Path, size: int, mtime_ns: int) -> frozenset[str]:
    """The ``dfd_lib`` modules the file at ``path`` imports (cached while the file is unchanged)."""
    return frozenset(_imported_modules(path.read_text(encoding="utf-8")))


def library_closure(modules: Iterable[str]) -> set[str]:
    """``modules`` and every ``dfd_lib`` module they import, directly or not."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        stat = path.stat()
        todo.extend(_module_imports(path, stat.st_size, stat.st_mtime_ns) - seen)
    return seen


def _notebook_code(path: Path) -> str:
    notebook = nbformat.read(path, as_version=4)
    cells = [cell.source for cell in notebook.cells
             if cell.cell_type == "code" and "injected-parameters" not in cell.metadata.get("tags", [])]
    return "\n# --- cell\n".join(cells)


def code_fingerprint(notebook: Path) -> dict[str, str]:
    """``"notebook" -> digest of its code cells`` and ``module -> digest of its source`` for every
    ``dfd_lib`` module the notebook runs."""
    code = _notebook_code(notebook)
    modules = library_closure(_imported_modules(code))
    digests = {"notebook": hashlib.sha256(code.encode()).hexdigest()}
    digests.update({module: _sha256(_module_file(module)) for module in sorted(modules)})
    return digests


# --------------------------------------------------------------------------- a step's fingerprint


def plain(value):
    """``value`` as JSON would return it (tuples as lists), so recorded and resolved values compare equal."""
    return json.loads(json.dumps(value, default=str))


def take(step: Step, run_dir: Path, values: Mapping) -> dict:
    """What ``step`` is about to run on in ``run_dir`` with the parameter ``values``."""
    return {
        "params": plain({k: v for k, v in values.items() if k != "run_dir"}),
        "inputs": file_digests(run_dir, step.spec.reads),
        "external": {name: tree_signature(path) for name, path in external_paths(step, values).items()},
        "code": code_fingerprint(step.path),
    }


def read_fingerprints(run_dir: Path) -> dict[str, dict]:
    path = Path(run_dir) / runs.FINGERPRINTS
    return json.loads(path.read_text()) if path.is_file() else {}


def record_fingerprint(run_dir: Path, step_name: str, fingerprint: dict) -> None:
    """Store what ``step_name`` ran on, once it finished (atomic). Keys keep their order: a parameter's
    mapping (e.g. robustness levels) is replayed by ``dfd rerun`` in the order it ran with."""
    recorded = read_fingerprints(run_dir)
    recorded[step_name] = fingerprint
    atomic_write(Path(run_dir) / runs.FINGERPRINTS, lambda tmp: tmp.write_text(json.dumps(recorded, indent=1)))


def forget_fingerprint(run_dir: Path, step_name: str) -> None:
    """A step that starts again is not up to date until it finishes."""
    recorded = read_fingerprints(run_dir)
    if recorded.pop(step_name, None) is not None:
        atomic_write(Path(run_dir) / runs.FINGERPRINTS, lambda tmp: tmp.write_text(json.dumps(recorded, indent=1)))
