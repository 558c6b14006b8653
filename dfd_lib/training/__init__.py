"""Training (notebook 04): the loss terms, the training config, the training loop on accelerate's
state with EMA weights, curves, the mixture of one expert per re-split, the run's training data and
``dfd train``."""
