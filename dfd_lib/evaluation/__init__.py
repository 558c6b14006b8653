"""Evaluating trainings on a run's test split (notebook 04): the linear-probe baseline on notebook 01's
frozen embeddings, the headline comparison (probe, official split, experts, mixture), the loss ablation,
the component ladder and its verdicts, and robustness to degradations. Above scoring and training,
which it uses."""
