"""What notebook 05 scores and shows: :class:`InferenceConfig`, which mixture (and how it runs), which
images, the verdict threshold, and how many rows, heatmaps and faces the notebook displays."""
from __future__ import annotations

from dataclasses import dataclass

from dfd_lib.core.config import StepConfig, check_fields, is_int, is_number
from dfd_lib.data.manifest import SPLITS
from dfd_lib.models.checkpoints import PREPROCESS_MODES
from dfd_lib.scoring.backends import BACKENDS


@dataclass
class InferenceConfig(StepConfig):
    """How notebook 05 scores a folder; the words after each field are its notebook's."""

    weights_dir: str = ""  # a mixture folder (ours, or the released weight.pth + ema.state), empty for the one notebook 04 wrote
    released_backbones: str = ""  # comma-separated timm names of the experts of a released checkpoint, empty for the original 7
    preprocess: str = "default"  # default (Pillow) or compat (OpenCV decoding exactly like the original release)
    backend: str = "torch"  # forward pass: torch, openvino or onnxruntime (converted once, cached; scores within 1e-5)
    folder: str = ""  # a folder of images to score (real/ fake/ subfolders give labels), empty for a split of the run manifest
    split: str = "test"  # the manifest split scored when folder is empty; empty for every row
    max_images: int = 0  # 0 for every image, else a random subset of this many
    threshold: float = -1.0  # fake if the mixture's probability is at least this; negative: its calibrated one (else 0.5)
    batch_size: int = 8  # images per forward pass
    heatmaps: int = 4  # Grad-CAM overlays shown, the highest-scoring images first
    table_rows: int = 25  # rows of the sortable table shown at once
    seed: int = 0  # random seed for the max_images subset
    faces: bool = False  # the upload widget starts with "score faces" on: each face found cropped (1.3x its box) and scored

    def __post_init__(self) -> None:
        check_fields(self, [
            ("weights_dir", isinstance(self.weights_dir, str), "a folder path (empty: the run's mixture)"),
            ("released_backbones", isinstance(self.released_backbones, str), "comma-separated timm names"),
            ("preprocess", self.preprocess in PREPROCESS_MODES, f"one of {PREPROCESS_MODES}"),
            ("backend", self.backend in BACKENDS, f"one of {BACKENDS}"),
            ("folder", isinstance(self.folder, str), "a folder path (empty: a split of the run manifest)"),
            ("split", self.split in ("", *SPLITS), f"one of {SPLITS} or empty (every row)"),
            ("max_images", is_int(self.max_images) and self.max_images >= 0, "an int >= 0 (0 = every image)"),
            ("threshold", is_number(self.threshold) and self.threshold <= 1.0, "at most 1 (negative: the calibrated one)"),
            ("batch_size", is_int(self.batch_size) and self.batch_size >= 1, "an int >= 1"),
            ("heatmaps", is_int(self.heatmaps) and self.heatmaps >= 0, "an int >= 0"),
            ("table_rows", is_int(self.table_rows) and self.table_rows >= 1, "an int >= 1"),
            ("seed", is_int(self.seed) and self.seed >= 0, "an int >= 0"),
            ("faces", isinstance(self.faces, bool), "true or false"),
        ])

    @property
    def backbone_names(self) -> list[str] | None:
        """The experts' timm names of a released checkpoint, or None for the checkpoint's own list."""
        return [name.strip() for name in self.released_backbones.split(",") if name.strip()] or None

    @property
    def given_threshold(self) -> float | None:
        """The threshold asked for, or None for the mixture's calibrated one."""
        return self.threshold if self.threshold >= 0 else None
