"""The library is a stack (CONTRIBUTING.md): import-linter's contracts in pyproject.toml hold on the real
package, and fail, naming the import, on a copy of it given an upward import or a cycle; imports inside
functions only defer slow or optional packages, never a module of dfd_lib, and say so."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dfd_lib.core.paths import PROJECT_ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def library_copy(tmp_path):
    shutil.copytree(PROJECT_ROOT / "dfd_lib", tmp_path / "dfd_lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_library_keeps_its_contracts():
    result = _lint_imports(PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_stack(library_copy):
    (library_copy / "dfd_lib" / "core" / "shortcut.py").write_text("from dfd_lib.pipeline import chain  # noqa: F401\n")
    result = _lint_imports(library_copy)
    assert result.returncode != 0
    assert "dfd_lib is a stack" in result.stdout and "BROKEN" in result.stdout
    assert "dfd_lib.core.shortcut -> dfd_lib.pipeline.chain" in result.stdout


def test_a_cycle_between_two_files_of_a_package_is_refused(library_copy):
    # metrics is imported by bootstrap; metrics importing bootstrap back closes a cycle (the one this stack removed)
    metrics = library_copy / "dfd_lib" / "stats" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nfrom dfd_lib.stats import bootstrap  # noqa: E402,F401\n")
    result = _lint_imports(library_copy)
    assert result.returncode != 0
    assert "no import cycle between the files of any package BROKEN" in result.stdout
    assert "No cycles are allowed in dfd_lib.stats" in result.stdout and "- .metrics -> .bootstrap" in result.stdout


def _imports_inside_functions() -> list[tuple[str, int, str, str]]:
    found = []
    for path in sorted((PROJECT_ROOT / "dfd_lib").rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                text = " ".join(lines[node.lineno - 1:node.end_lineno])
                found.append((str(path.relative_to(PROJECT_ROOT)), node.lineno, module, text))
    return found


def test_imports_inside_functions_only_defer_slow_or_optional_packages():
    found = _imports_inside_functions()
    assert found, "the scan found no import inside a function at all: it is not reading the library"
    own = [f"{path}:{line}" for path, line, module, _ in found if module.startswith("dfd_lib")]
    unexplained = [f"{path}:{line}: {text.strip()}" for path, line, module, text in found if "# deferred:" not in text]
    assert not own, f"dfd_lib modules imported inside functions (import them at the top; a cycle means a layer is wrong): {own}"
    assert not unexplained, "imports inside functions need a '# deferred: <why>' comment:\n" + "\n".join(unexplained)
