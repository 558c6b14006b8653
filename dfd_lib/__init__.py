"""dfd-kit: the library behind the notebooks, grouped by the stage of the method it serves.

- :mod:`dfd_lib.data` — images, manifests, run datasets, model inputs, the demo dataset (notebook 01)
- :mod:`dfd_lib.embed` — embeddings, the UMAP map, clusters and re-splits (notebooks 01-02)
- :mod:`dfd_lib.synth` — edits, Stable Diffusion, the enrichment of notebook 03 and the one fake factory
- :mod:`dfd_lib.modeling` — backbones, experts, losses, checkpoints, training, metrics, the comparison (04)
- :mod:`dfd_lib.scoring` — the Predictor, folders, explanations, widgets, ``dfd predict`` (05)
- :mod:`dfd_lib.serving` — ``dfd serve``: the HTTP API and its web page
- :mod:`dfd_lib.pipeline` — run folders, the papermill chain, the run report

On top: :mod:`~dfd_lib.paths`, :mod:`~dfd_lib.atomic`, :mod:`~dfd_lib.config`, :mod:`~dfd_lib.logs`,
:mod:`~dfd_lib.figures` and :mod:`~dfd_lib.cli`. Nothing is imported here, so ``dfd --help`` stays fast.
The method itself is described in ``docs/method.md``.
"""

__version__ = "0.1.0"
