"""dfd-kit: the library behind the notebooks, a stack of packages; each imports only those below it
(``pyproject.toml``, ``[tool.importlinter]``; CONTRIBUTING.md).

- :mod:`dfd_lib.cli` — the ``dfd`` command
- :mod:`dfd_lib.pipeline` — steps, profiles, the papermill chain, preflight, report, rerun and compare
- :mod:`dfd_lib.serving` — ``dfd serve``: the HTTP API and its web page
- :mod:`dfd_lib.evaluation` — the linear probe, the headline comparison, loss ablation, component ladder, robustness (04)
- :mod:`dfd_lib.scoring` — the Predictor, CPU runtimes, calibration, folders, explanations, ``dfd predict`` (05)
- :mod:`dfd_lib.training` — losses, the training loop, the mixture's training, ``dfd train`` (04)
- :mod:`dfd_lib.sources` — packaged photos, the demo dataset, the dataset of a run (01)
- :mod:`dfd_lib.embed` — embeddings, the UMAP map, clusters and re-splits (01-02)
- :mod:`dfd_lib.synth` — edits, Stable Diffusion, the fake factory and the enrichment (03)
- :mod:`dfd_lib.models` — backbones, experts, checkpoints (ours and the release)
- :mod:`dfd_lib.stats` — metrics, bootstrap intervals, per-group tables, ROC figures
- :mod:`dfd_lib.data` — images, manifests and readers, the re-split table, model inputs
- :mod:`dfd_lib.core` — paths, atomic writes, configs, logs, figures, faults, the run folder

Nothing is imported here, so ``dfd --help`` stays fast. The method is described in ``docs/method.md``.
"""

__version__ = "0.1.0"
