"""Step 04, the experts, their mixture and the comparison: :class:`TrainMoeConfig`, notebook 04's one
config: every training's settings (:class:`~dfd_lib.training.train_config.TrainConfig`, loss
included), which experts to train (:class:`ExpertsConfig`), what is measured after training
(:class:`~dfd_lib.evaluation.evaluation_config.EvaluationConfig`), the linear-probe baseline
(:class:`~dfd_lib.evaluation.linear_probe.LinearProbeConfig`) and the test-split intervals
(:class:`~dfd_lib.stats.bootstrap.BootstrapConfig`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from dfd_lib.core.config import StepConfig, check_fields, is_int
from dfd_lib.evaluation.evaluation_config import EvaluationConfig
from dfd_lib.evaluation.linear_probe import LinearProbeConfig
from dfd_lib.stats.bootstrap import BootstrapConfig
from dfd_lib.training.train_config import TUNINGS, TrainConfig


def _default_backbones() -> list[str]:
    return ["tf_efficientnet_lite0"]


def _names(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value)


@dataclass
class ExpertsConfig(StepConfig):
    """Which experts notebook 04 trains (one per re-split, their backbones cycled), on which data, and
    whether trainings already in the run folder are reused. Each expert's TrainConfig takes its
    ``backbone``, ``weights_path`` and ``tuning`` from here (:func:`dfd_lib.training.training_data.expert_configs`)."""

    # timm backbone per expert, cycled over the re-splits; the first also serves model (a)
    backbones: list[str] = field(default_factory=_default_backbones)
    # local weights file per backbone (cycled like backbones), empty for package or random weights
    backbone_weights: list[str] = field(default_factory=list)
    # what of each backbone trains (cycled like backbones): full, frozen (head only), lora or effort; empty: all full
    tunings: list[str] = field(default_factory=list)
    max_experts: int = 0  # experts to train (the first re-splits), 0 for one per re-split
    use_augmented: bool = True  # add notebook 03's augmented images to the training and validation sets
    resume: bool = True  # continue (or reuse) trainings found in the run folder with the same settings
    # trainings run at once, each in its own process (1: one after another); same weights either way
    training_processes: int = 1

    def __post_init__(self) -> None:
        check_fields(self, [
            ("backbones", _names(self.backbones) and len(self.backbones) >= 1, "a non-empty list of timm names"),
            ("backbone_weights", _names(self.backbone_weights), "a list of weights files (empty: package or random weights)"),
            ("tunings", _names(self.tunings) and set(self.tunings) <= set(TUNINGS), f"a list of {', '.join(TUNINGS)} (empty: all full)"),
            ("max_experts", is_int(self.max_experts) and self.max_experts >= 0, "an int >= 0 (0 = one per re-split)"),
            ("use_augmented", isinstance(self.use_augmented, bool), "true or false"),
            ("resume", isinstance(self.resume, bool), "true or false"),
            ("training_processes", is_int(self.training_processes) and self.training_processes >= 1,
             "an int >= 1 (1 = one training after another in the notebook's process)"),
        ])


@dataclass
class TrainMoeConfig(StepConfig):
    """Notebook 04: the trainings, the experts, the evaluation, the linear probe and the intervals
    (``seed`` feeds the training, the evaluation and the intervals)."""

    training: TrainConfig = field(default_factory=TrainConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
