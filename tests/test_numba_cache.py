"""fit_umap keeps umap-learn's compiled functions in numba's on-disk cache, so a new process (each
notebook kernel, each test) does not compile them again (dfd_lib.embed.projection)."""
from __future__ import annotations

import importlib
import sys

import numba
import numpy as np
import pytest
from numba.core.caching import FunctionCache, NullCache

from dfd_lib.embed import projection

SOURCE = '''
import numba


@numba.njit
def add_one(values):
    return values + 1
'''


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package of one numba function compiled without ``cache=True``, as umap-learn's are."""
    root = tmp_path / "src"
    (root / "dfdnumbacase").mkdir(parents=True)
    (root / "dfdnumbacase" / "__init__.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "numba-cache"))
    module = importlib.import_module("dfdnumbacase")
    yield module
    sys.modules.pop("dfdnumbacase", None)


def test_a_package_s_numba_functions_are_cached_on_disk(package, tmp_path):
    assert isinstance(package.add_one._cache, NullCache)
    assert projection.cache_numba_functions.__wrapped__(("dfdnumbacase",)) == 1
    assert isinstance(package.add_one._cache, FunctionCache)
    assert package.add_one(np.arange(3)).tolist() == [1, 2, 3]
    written = sorted(path.suffix for path in (tmp_path / "numba-cache").rglob("*add_one*"))
    assert ".nbi" in written and ".nbc" in written  # the index and the machine code
    # a second switch finds nothing left to switch
    assert projection.cache_numba_functions.__wrapped__(("dfdnumbacase",)) == 0


def test_fit_umap_switches_umap_learns_functions_on():
    coords = projection.fit_umap(np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32), n_neighbors=5)
    assert coords.shape == (40, 2)
    from umap import umap_

    assert isinstance(umap_.smooth_knn_dist._cache, FunctionCache)  # compiled at the first call, otherwise
