"""The 2-D map of the embeddings (notebook 01): UMAP, after a PCA that makes the neighbour search fast,
and :class:`UmapConfig`, the notebook's settings of it."""
from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from dfd_lib.core.config import StepConfig, check_fields, is_int, is_number

LARGE_MAP_ROWS = 50_000  # beyond this, fit_umap's defaults trade a little layout polish for speed
# packages whose numba functions fit_umap compiles: their machine code is kept in numba's on-disk cache
NUMBA_PACKAGES = ("umap", "pynndescent")


@dataclass
class UmapConfig(StepConfig):
    """How notebook 01 draws its map; the fields keep the notebook's names (``umap_`` says which step
    setting they are in its one namespace) and go to :func:`fit_umap` as ``n_neighbors``, ``min_dist``, ``seed``."""

    umap_neighbors: int = 15  # UMAP n_neighbors: local vs global structure
    umap_min_dist: float = 0.1  # UMAP min_dist: how tightly points pack
    seed: int = 0  # random seed for subsets, UMAP and the official split

    def __post_init__(self) -> None:
        check_fields(self, [
            ("umap_neighbors", is_int(self.umap_neighbors) and self.umap_neighbors >= 2, "an int >= 2"),
            # umap-learn refuses a min_dist above its spread (1.0)
            ("umap_min_dist", is_number(self.umap_min_dist) and 0.0 <= self.umap_min_dist <= 1.0, "a number in [0, 1]"),
            ("seed", is_int(self.seed) and self.seed >= 0, "an int >= 0"),
        ])


def fit_umap(emb: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int | None = 0,
             pca_dims: int | None = 50, n_epochs: int | None = None, low_memory: bool = True,
             metric: str = "euclidean", init: str | None = None) -> np.ndarray:
    """UMAP coordinates (N, 2) of ``emb``. Rows are first reduced to ``pca_dims`` with PCA (much
    faster neighbour search, same picture). A fixed ``seed`` makes the map reproducible but
    single-threaded (umap-learn's rule); ``seed=None`` uses every core. ``n_epochs`` and
    ``init`` left as None follow umap-learn (spectral start; 500 epochs up to 10k rows, 200
    above) up to ``LARGE_MAP_ROWS`` rows, and beyond it use 100 epochs and a PCA start, which
    keeps 100k rows under ~1.5 min on 2 cores (bench/RESULTS.md)."""
    import umap  # deferred: umap-learn compiles with numba on import (seconds)
    from sklearn.decomposition import PCA  # deferred: scikit-learn is slow to import

    cache_numba_functions(NUMBA_PACKAGES)
    x = np.asarray(emb, dtype=np.float32)
    if x.ndim != 2 or len(x) < 4:
        raise ValueError(f"fit_umap needs a 2-D array of at least 4 rows, got shape {x.shape}")
    if pca_dims is not None and x.shape[1] > pca_dims and len(x) > pca_dims:
        x = PCA(pca_dims, random_state=seed or 0).fit_transform(x).astype(np.float32)
    large = len(x) > LARGE_MAP_ROWS
    n_epochs = n_epochs if n_epochs is not None else (100 if large else None)
    init = init or ("pca" if large else "spectral")
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(x) - 1), min_dist=min_dist, random_state=seed,
                        n_epochs=n_epochs, low_memory=low_memory, metric=metric, init=init,
                        n_jobs=1 if seed is not None else -1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*")  # the seed/parallelism trade-off is documented above
        warnings.filterwarnings("ignore", message="Graph is not fully connected")  # separate domains are expected
        return reducer.fit_transform(x).astype(np.float32)


@functools.cache
def cache_numba_functions(packages: tuple[str, ...]) -> int:
    """Keep the machine code of every numba function of ``packages`` in numba's on-disk cache, as
    ``@njit(cache=True)`` would; how many functions were switched on.

    umap-learn compiles most of its functions (the fuzzy graph, the layout) at their first call and
    keeps them only in memory, which costs about 20 s in every new process (each papermill kernel of
    notebook 01, each test) even for 200 rows. Numba's cache is keyed, as for umap's own cached
    functions, by the source file's stamp and the CPU, so a changed umap-learn or another machine
    compiles again. It lives beside the package's source, or where ``NUMBA_CACHE_DIR`` says."""
    from numba.core.caching import NullCache  # deferred: numba comes with umap-learn, imported only here
    from numba.core.dispatcher import Dispatcher  # deferred: as above

    switched = 0
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in packages:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Dispatcher) and isinstance(value._cache, NullCache):
                value.enable_caching()
                switched += 1
    return switched
