"""Stable Diffusion as a model-backed kind: ``sd_img2img`` and ``sd_inpaint`` regenerate sources with a
diffusers pipeline (:mod:`dfd_lib.synth.diffusion`) loaded from the config's checkpoint settings, one
pipeline per task, several images per call."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dfd_lib.data.images import ImageLoadError, load_rgb
from dfd_lib.synth import diffusion, masks
from dfd_lib.synth.kinds import Family, LoadedModel, ModelKind, text_or_none

MASK_COLUMN = "inpaint_mask"  # optional source-table column: a mask image per source (white = repaint)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiffusionSettings:
    """How a pipeline regenerates (see :func:`dfd_lib.synth.diffusion.generate`)."""

    strength: float = 0.6  # share of the denoising steps that run
    steps: int = 4
    guidance_scale: float = 1.0  # <= 1: no classifier-free guidance
    size: int | None = None  # working size; None = the pipeline's native size
    keep_unmasked: bool = True  # inpainting: the source's pixels outside the mask


@dataclass
class DiffusionRequest:
    """The inputs of one regeneration."""

    image: Image.Image
    prompt: str
    seed: int  # seeds the torch.Generator of the pipeline call
    mask: Image.Image | None = None  # inpainting only (white = repaint)
    mask_path: str | None = None  # the source row's own mask file, recorded in the image's params


def task_checkpoint(task: str, settings: Mapping[str, Any]) -> str | None:
    """The checkpoint that serves ``task``: ``sd_inpaint_checkpoint`` for inpainting when set, else
    ``sd_checkpoint``; None = the tiny random-weight pipeline."""
    return (settings.get("sd_inpaint_checkpoint") if task == "inpaint" else "") or settings.get("sd_checkpoint") or None


def pipeline_label(checkpoint: str | None) -> str:
    """How a run's records name the pipeline of ``checkpoint``: the checkpoint itself, or for the tiny
    random-weight pipeline a name that says what its images are."""
    if diffusion.is_random_weight(checkpoint):
        return f"{checkpoint or 'tiny-random'} ({diffusion.RANDOM_WEIGHT_NOTE})"
    return str(checkpoint)


def given_mask(source: Mapping | None, image: Image.Image) -> Image.Image | None:
    """The source row's own inpainting mask (column :data:`MASK_COLUMN`), checked against its image."""
    value = text_or_none((source or {}).get(MASK_COLUMN))
    if value is None:
        return None
    try:
        mask = load_rgb(value).convert("L")
    except ImageLoadError as exc:
        raise ImageLoadError(f"mask {value}: {exc.reason}") from exc
    if mask.size != image.size:
        raise ValueError(f"mask {value} is {mask.width}x{mask.height} but its source is {image.width}x{image.height}")
    return mask


class StableDiffusionKind(ModelKind):
    """img2img and inpainting through diffusers; ``config`` is an EnrichmentConfig."""

    name = "stable_diffusion"
    tasks = diffusion.TASKS

    def check_config(self, families: Sequence[Family], config: Any) -> None:
        inpainting = any(family.task == "inpaint" for family in families)
        for what, value in (("checkpoint", config.sd_checkpoint), ("single-file config", config.sd_single_file_config),
                            ("inpainting checkpoint", config.sd_inpaint_checkpoint if inpainting else "")):
            if value and not diffusion.is_hub_id(value) and not value.startswith(diffusion.TINY_PREFIX) \
                    and not Path(value).exists():
                raise FileNotFoundError(f"Stable Diffusion {what} not found: {value}")

    def checkpoint(self, family: Family, settings: Mapping[str, Any]) -> str | None:
        return task_checkpoint(family.task, settings)

    def locate(self, checkpoint: str, fetch: bool = False) -> str:
        return diffusion.locate_checkpoint(checkpoint, fetch=fetch)

    def weights_note(self, family: Family, settings: Mapping[str, Any]) -> str:
        return diffusion.RANDOM_WEIGHT_NOTE if diffusion.is_random_weight(self.checkpoint(family, settings)) else ""

    def load(self, family: Family, config: Any, device: Any) -> LoadedModel:
        checkpoint = config.checkpoint_for(family.task)
        if diffusion.is_random_weight(checkpoint):
            # meant for tests and the demo; on real data its "Stable Diffusion" fakes are noise-like
            log.warning("%s: %s (the tiny pipeline: %s); give sd_checkpoint, a real Stable Diffusion checkpoint, "
                        "for real ones", family.name, diffusion.RANDOM_WEIGHT_NOTE, checkpoint or "no sd_checkpoint given")
        pipe = diffusion.load_pipeline(family.task, checkpoint, seed=config.seed, device=device,
                                       single_file_config=config.sd_single_file_config or None)
        if not checkpoint:
            name = f"tiny-random-{family.task}"
        else:
            name = checkpoint if diffusion.is_hub_id(checkpoint) else Path(checkpoint).name
        return LoadedModel(pipe, name)

    def request(self, family: Family, image: Image.Image, rng: np.random.Generator, seed: int,
                source: Mapping | None) -> DiffusionRequest:
        """The prompt, then for inpainting without a mask of the source's own a random soft mask."""
        inpainting = family.task == "inpaint"
        mask = given_mask(source, image) if inpainting else None
        prompt = diffusion.make_prompt(rng)
        if inpainting and mask is None:
            mask = diffusion.random_inpaint_mask(image.size, rng)
        return DiffusionRequest(image, prompt, int(seed), mask, text_or_none((source or {}).get(MASK_COLUMN)))

    def run_batch(self, model: Any, requests: Sequence[DiffusionRequest], config: Any) -> list[Image.Image]:
        settings: DiffusionSettings = config.diffusion
        masks = [r.mask for r in requests] if requests and requests[0].mask is not None else None
        return diffusion.generate(
            model, [r.image for r in requests], [r.prompt for r in requests], [r.seed for r in requests],
            strength=settings.strength, steps=settings.steps, masks=masks, guidance_scale=settings.guidance_scale,
            size=settings.size, keep_unmasked=settings.keep_unmasked)

    def params(self, family: Family, request: DiffusionRequest, model_name: str, config: Any) -> dict:
        settings: DiffusionSettings = config.diffusion
        params = {"pipeline": model_name, "task": family.task, "seed": request.seed, "prompt": request.prompt,
                  "strength": settings.strength, "steps": settings.steps, "guidance_scale": settings.guidance_scale,
                  "size": settings.size}
        if request.mask is not None:
            params["mask_box"] = list(request.mask.getbbox() or ())
            params["keep_unmasked"] = settings.keep_unmasked
        if request.mask_path:
            params["mask"] = request.mask_path
        return params

    def mask(self, family: Family, request: DiffusionRequest, made: Image.Image, config: Any) -> Image.Image | None:
        """img2img: the whole image. Inpainting with ``keep_unmasked`` (the default): exactly the pixels that
        differ from the source, all inside the inpainting mask. Without it the VAE's decoding (and the
        resizes) change every pixel slightly: the mask is then the region the pipeline repainted (the
        inpainting mask's nonzero pixels), not every changed pixel."""
        if request.mask is None:
            return masks.whole_image(made.size)
        if config.diffusion.keep_unmasked:
            return masks.changed_pixels(request.image, made)
        return masks.region(request.mask)

    def cache_key(self, family: Family, config: Any, source: Mapping) -> dict:
        settings: DiffusionSettings = config.diffusion
        return dict(checkpoint=config.checkpoint_for(family.task), strength=settings.strength, steps=settings.steps,
                    guidance_scale=settings.guidance_scale, image_size=settings.size,
                    keep_unmasked=settings.keep_unmasked, mask=text_or_none(source.get(MASK_COLUMN)))
