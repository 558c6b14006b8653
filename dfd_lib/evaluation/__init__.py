"""Evaluating trainings on a run's test split (notebook 04): the headline comparison (official split,
experts, mixture), the loss ablation, the component ladder and its verdicts, and robustness to
degradations. Above scoring and training, which it uses."""
