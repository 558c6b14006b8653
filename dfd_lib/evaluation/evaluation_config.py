"""What notebook 04 measures after training: :class:`EvaluationConfig`, the settings of the loss
ablation, the component ladder, the robustness table, the verdict threshold's calibration and the
batch size of every scoring pass (the test-split intervals are :class:`~dfd_lib.stats.bootstrap.BootstrapConfig`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dfd_lib.core.config import StepConfig, check_fields, is_int, is_number
from dfd_lib.evaluation.robustness import DEFAULT_PERTURBATIONS


def _notebook_levels() -> dict[str, list[float]]:
    return {"jpeg": [80, 50], "resize": [0.5, 0.25], "blur": [1.0, 2.0]}


@dataclass
class EvaluationConfig(StepConfig):
    """How notebook 04 evaluates its trainings; the words after each field are its notebook's."""

    run_ablation: bool = True  # train the loss ablation for one expert
    ablation_resplit: int = 0  # the re-split whose expert the ablation repeats
    ablation_steps: int = 0  # cap on steps per epoch for the ablation runs, 0 for the experts' schedule
    # trainings of every ladder rung (seeds seed, seed + 1, ...): > 1 adds the spread across seeds, 0 skips the ladder
    ladder_seeds: int = 1
    robustness: bool = True  # score the mixture under JPEG, resize and blur
    robustness_images: int = 100  # test images for the robustness table (a label-stratified sample), 0 for all
    robustness_levels: dict[str, list[float]] = field(default_factory=_notebook_levels)  # JPEG quality, scale factor, blur sigma
    eval_batch_size: int = 64  # images per forward pass when scoring
    calibration_fpr: float = 0.01  # target FPR of the mixture's verdict threshold, chosen on the selection data (never the test split)
    seed: int = 0  # seed of the robustness table's label-stratified sample (notebook 04's one seed)

    def __post_init__(self) -> None:
        check_fields(self, [
            ("run_ablation", isinstance(self.run_ablation, bool), "true or false"),
            ("ablation_resplit", is_int(self.ablation_resplit) and self.ablation_resplit >= 0, "an int >= 0 (a re-split index)"),
            ("ablation_steps", is_int(self.ablation_steps) and self.ablation_steps >= 0, "an int >= 0 (0 = the experts' schedule)"),
            ("ladder_seeds", is_int(self.ladder_seeds) and self.ladder_seeds >= 0, "an int >= 0 (0 skips the ladder)"),
            ("robustness", isinstance(self.robustness, bool), "true or false"),
            ("robustness_images", is_int(self.robustness_images) and self.robustness_images >= 0, "an int >= 0 (0 = every test image)"),
            ("robustness_levels", _valid_levels(self.robustness_levels),
             f"a mapping of {sorted(DEFAULT_PERTURBATIONS)} to lists of numbers"),
            ("eval_batch_size", is_int(self.eval_batch_size) and self.eval_batch_size >= 1, "an int >= 1"),
            ("calibration_fpr", is_number(self.calibration_fpr) and 0.0 <= self.calibration_fpr < 1.0, "a number in [0, 1)"),
            ("seed", is_int(self.seed) and self.seed >= 0, "an int >= 0"),
        ])


def _valid_levels(levels: object) -> bool:
    # the names the robustness table knows; its levels are JPEG qualities, scale factors and sigmas
    return (isinstance(levels, Mapping) and set(levels) <= set(DEFAULT_PERTURBATIONS)
            and all(isinstance(values, Sequence) and not isinstance(values, str) and all(is_number(v) for v in values)
                    for values in levels.values()))
