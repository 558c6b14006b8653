"""What notebook 03 makes: :class:`EnrichmentConfig`, one dataclass for the notebook, the
``dfd augment`` command (every field is an option) and the enrichment driver."""
from __future__ import annotations

from dataclasses import dataclass

from dfd_lib.core.config import StepConfig
from dfd_lib.core.paths import resolve
from dfd_lib.data.manifest import TRAIN, VAL
from dfd_lib.synth import factory
from dfd_lib.synth.diffusion import TINY_PREFIX, is_hub_id
from dfd_lib.synth.failure_budget import DEFAULT_MAX_FAILED_SHARE
from dfd_lib.synth.stable_diffusion import DiffusionSettings, task_checkpoint


@dataclass
class EnrichmentConfig(StepConfig):
    """What to generate; the same config and source table give the same images."""

    families: tuple[str, ...] = factory.BUILTIN_FAMILIES  # registered families (dfd_lib.synth.factory) to make
    images_per_family: int = 16  # new images written per family
    seed: int = 0  # fixes every source choice, edit and generation
    sd_checkpoint: str = ""  # diffusers folder, .safetensors file or hub id; empty = the tiny random-weight pipeline
    # (tiny:<folder> = that pipeline written as a diffusers folder on first use and loaded from it)
    sd_inpaint_checkpoint: str = ""  # a dedicated inpainting checkpoint for sd_inpaint; empty = sd_checkpoint
    sd_single_file_config: str = ""  # for a single-file checkpoint offline: a diffusers folder with its configs
    strength: float = 0.6  # img2img / inpainting strength (share of the steps that run)
    steps: int = 4  # denoising steps before strength is applied
    guidance_scale: float = 1.0  # <= 1 disables classifier-free guidance; 5-8 suits real checkpoints
    sd_batch_size: int = 8  # images per Stable Diffusion call (and per call of any model-backed family)
    # inpainting: paste the source back outside the mask (a fake differs only inside it; its mask is exactly the changed
    # pixels); off: the VAE changes every pixel slightly and the mask is the repainted region
    keep_unmasked: bool = True
    sd_image_size: int = 0  # Stable Diffusion working size; 0 = the pipeline's native size
    device: str = ""  # cpu, cuda, cuda:1; empty = this process's accelerate device (CUDA if present)
    degrade_fake_fraction: float = 0.0  # share of "degraded" (label-keeping families') images made from fakes (they stay fakes)
    source_splits: tuple[str, ...] = (TRAIN, VAL)  # draw sources only from these splits; empty = every split
    torch_threads: int = 1  # torch CPU threads during the run (1 is fastest for small CPU models); 0 = leave torch's
    max_failed_share: float = DEFAULT_MAX_FAILED_SHARE  # a family losing more of its planned images stops the step (1 = never)

    def __post_init__(self) -> None:
        self.families = factory.check_families(self.families)
        self.source_splits = tuple(self.source_splits or ())
        checks = [
            ("images_per_family", self.images_per_family >= 0, ">= 0"),
            ("strength", 0.0 < self.strength <= 1.0, "in (0, 1]"),
            ("steps", self.steps >= 1 and int(self.steps * self.strength) >= 1, "such that steps * strength >= 1"),
            ("sd_batch_size", self.sd_batch_size >= 1, ">= 1"),
            ("sd_image_size", self.sd_image_size == 0 or self.sd_image_size >= 64, "0 or at least 64"),
            ("degrade_fake_fraction", 0.0 <= self.degrade_fake_fraction <= 1.0, "in [0, 1]"),
            ("torch_threads", self.torch_threads >= 0, ">= 0"),
            ("max_failed_share", 0.0 <= self.max_failed_share <= 1.0, "in [0, 1]"),
        ]
        for name, ok, requirement in checks:
            if not ok:
                raise ValueError(f"EnrichmentConfig.{name} must be {requirement}, got {getattr(self, name)!r}")
        # relative paths are under the project root; a hub id (org/name, no such local path) stays as it is
        for name in ("sd_checkpoint", "sd_inpaint_checkpoint", "sd_single_file_config"):
            value = getattr(self, name)
            kept = is_hub_id(value) or value.startswith(TINY_PREFIX)
            setattr(self, name, value if kept else str(resolve(value)) if value else "")
        # a missing local checkpoint must stop the run before anything is written
        by_kind: dict[str, list] = {}
        for family in factory.model_families(self.families):
            by_kind.setdefault(family.kind, []).append(family)
        for kind, families in by_kind.items():
            factory.get_kind(kind).check_config(families, self)

    def checkpoint_for(self, task: str) -> str | None:
        """The Stable Diffusion checkpoint that serves ``task`` ("img2img" or "inpaint"); None = the tiny pipeline."""
        return task_checkpoint(task, vars(self))

    @property
    def diffusion(self) -> DiffusionSettings:
        return DiffusionSettings(strength=self.strength, steps=self.steps, guidance_scale=self.guidance_scale,
                                 size=self.sd_image_size or None, keep_unmasked=self.keep_unmasked)
