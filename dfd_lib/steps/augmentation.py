"""Step 03, enriching both classes: :class:`AugmentationConfig`, notebook 03's one config: what to
generate (:class:`~dfd_lib.synth.config.EnrichmentConfig`, also ``dfd augment``'s options) and where
the images and the grid figure go."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dfd_lib.core import runs
from dfd_lib.core.config import StepConfig, check_fields, is_int
from dfd_lib.core.paths import resolve
from dfd_lib.synth.config import EnrichmentConfig


@dataclass
class AugmentationOutputConfig(StepConfig):
    """Where notebook 03 writes its images, and how many of each family its grid figure shows."""

    out_dir: str = ""  # folder for the images (empty: the run folder's augmented/), never the source data
    grid_examples: int = 2  # examples per family in the grid figure

    def __post_init__(self) -> None:
        check_fields(self, [
            ("out_dir", isinstance(self.out_dir, str), "a folder path (empty: the run folder's augmented/)"),
            ("grid_examples", is_int(self.grid_examples) and self.grid_examples >= 1, "an int >= 1"),
        ])

    def images_dir(self, run: runs.RunDir) -> Path:
        """``out_dir`` (relative: under the project root), or the run folder's ``augmented/``."""
        return resolve(self.out_dir) if self.out_dir else run.path(runs.AUGMENTED_DIR)


@dataclass
class AugmentationConfig(StepConfig):
    """Notebook 03: what to generate, and where it goes."""

    enrichment: EnrichmentConfig = field(default_factory=EnrichmentConfig)
    output: AugmentationOutputConfig = field(default_factory=AugmentationOutputConfig)
