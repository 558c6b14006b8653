"""Scoring images (notebook 05): the Predictor, inputs from paths, folder scoring, Grad-CAM
explanations, the upload widget and ``dfd predict``."""
