"""Statistics of scores: AUC, AP, EER and TPR at a low FPR, bootstrap intervals, per-group tables and
the ROC figure. Low enough for scoring, training and evaluation to use."""
