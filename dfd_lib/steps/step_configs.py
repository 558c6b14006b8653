"""Each notebook's one config, by step name: notebook ``NN_name`` builds ``STEP_CONFIGS["NN_name"]``
from its parameters cell in one call, and declares every parameter that config reads
(``tests/test_step_configs.py``)."""
from __future__ import annotations

from dfd_lib.core import runs
from dfd_lib.core.config import StepConfig
from dfd_lib.steps.augmentation import AugmentationConfig
from dfd_lib.steps.clustering import ClusterSplitConfig
from dfd_lib.steps.features import FeaturesConfig
from dfd_lib.steps.inference import InferenceConfig
from dfd_lib.steps.train_moe import TrainMoeConfig

STEP_CONFIGS: dict[str, type[StepConfig]] = {
    runs.FEATURES.name: FeaturesConfig,
    runs.CLUSTERS.name: ClusterSplitConfig,
    runs.AUGMENT.name: AugmentationConfig,
    runs.TRAIN.name: TrainMoeConfig,
    runs.INFERENCE.name: InferenceConfig,
}
