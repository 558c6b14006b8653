"""Step 05, scoring images: every setting of notebook 05 belongs to scoring, so its one config is
:class:`~dfd_lib.scoring.inference_config.InferenceConfig`, named here beside the other steps' configs."""
from __future__ import annotations

from dfd_lib.scoring.inference_config import InferenceConfig

__all__ = ["InferenceConfig"]
