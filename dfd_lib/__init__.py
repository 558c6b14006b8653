"""dfd-kit: the library behind the notebooks (data, features, splits, augmentation,
experts, training, evaluation, inference and serving)."""

__version__ = "0.1.0"
