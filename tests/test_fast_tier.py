"""The fast tier (``make test-fast``: every test not marked ``slow``) reaches every package of dfd_lib,
so the inner loop exercises the whole library, not only its quick corners. Read from the test files
themselves: the imports of each module and of each test or fixture not marked slow."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent
LIBRARY = TESTS.parent / "dfd_lib"


def _packages() -> set[str]:
    """dfd_lib's packages, and its top-level modules (``cli``)."""
    found = {path.name for path in LIBRARY.iterdir() if (path / "__init__.py").is_file()}
    return found | {path.stem for path in LIBRARY.glob("*.py") if path.stem != "__init__"}


def _marked_slow(node: ast.AST) -> bool:
    return "mark.slow" in ast.unparse(node)


def _module_is_slow(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
               and _marked_slow(node.value) for node in tree.body)


def _imported_packages(node: ast.AST) -> set[str]:
    """The dfd_lib packages ``node`` imports (``from dfd_lib.scoring import x``, ``from dfd_lib import cli``)."""
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "dfd_lib":
            parts = child.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in child.names}
        elif isinstance(child, ast.Import):
            found |= {alias.name.split(".")[1] for alias in child.names if alias.name.startswith("dfd_lib.")}
    return found


def fast_tier_packages(test_file: Path) -> set[str]:
    """What ``test_file`` contributes to the fast tier: the packages its module level and its tests
    and fixtures not marked slow import."""
    tree = ast.parse(test_file.read_text())
    if _module_is_slow(tree):
        return set()
    found = set()
    for node in tree.body:
        functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        if isinstance(node, functions) and any(_marked_slow(d) for d in node.decorator_list):
            continue
        found |= _imported_packages(node)
    return found


def test_the_fast_tier_reaches_every_package():
    reached = set().union(*(fast_tier_packages(path) for path in sorted(TESTS.glob("test_*.py"))))
    missing = sorted(_packages() - reached)
    assert not missing, f"no fast test imports dfd_lib.{', dfd_lib.'.join(missing)}: add one, or unmark a test"


def test_the_reading_skips_slow_modules_and_slow_tests(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text("import pytest\nfrom dfd_lib.core import runs\n\n@pytest.mark.slow\ndef test_a():\n"
                      "    from dfd_lib.training import trainer\n\ndef test_b():\n    import dfd_lib.stats.metrics\n")
    assert fast_tier_packages(sample) == {"core", "stats"}
    sample.write_text("import pytest\nfrom dfd_lib import cli\npytestmark = [pytest.mark.slow]\n")
    assert fast_tier_packages(sample) == set()
