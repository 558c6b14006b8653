"""The one fake factory: every family of made images, used by notebook 03's enrichment
(:mod:`dfd_lib.synth.enrichment`) and by the demo dataset builder (:mod:`dfd_lib.sources.demo`).

A family is an edit of :mod:`dfd_lib.synth.edits` (``splice``, ``colour_background``,
``resample``, ``self_blend``), a Stable Diffusion regeneration of :mod:`dfd_lib.synth.diffusion`
(``sd_img2img``, ``sd_inpaint``) or ``degraded``: label-preserving degradations (JPEG, resizing,
blur, noise) that add real types. Every random choice comes from the caller's seeded
``np.random.Generator`` in a fixed order, so the same seed gives the same image whichever caller
asks; each made image comes with the JSON-able ``params`` that describe it.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dfd_lib.synth import diffusion, edits

SD_FAMILIES: dict[str, str] = {"sd_img2img": "img2img", "sd_inpaint": "inpaint"}  # family -> pipeline task
DEGRADED, DEGRADED_FAKE = "degraded", "degraded_fake"  # a degraded fake keeps its label under its own name
FAKE_FAMILIES: tuple[str, ...] = (*edits.EDIT_FAMILIES, *SD_FAMILIES)
ALL_FAMILIES: tuple[str, ...] = (*FAKE_FAMILIES, DEGRADED)
NEEDS_DONOR = edits.NEEDS_DONOR  # families whose edit takes a second image


def check_families(families: Sequence[str], known: Sequence[str] = ALL_FAMILIES) -> tuple[str, ...]:
    """``families`` as a tuple, or a ``ValueError`` naming the unknown or repeated ones."""
    families = tuple(families)
    unknown = [f for f in families if f not in known]
    if unknown:
        raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; expected some of {list(known)}")
    if len(set(families)) != len(families):
        raise ValueError(f"families are listed twice: {list(families)}")
    return families


def make_edit(family: str, image: Image.Image, rng: np.random.Generator,
              donor: Image.Image | None = None) -> tuple[Image.Image, dict]:
    """One edited fake of ``family`` (or, for ``degraded``, a degraded copy that keeps its label)."""
    if family in (DEGRADED, DEGRADED_FAKE):
        return edits.degrade(image, rng)
    return edits.apply_edit(family, image, rng, donor=donor)


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


def diffusion_request(family: str, image: Image.Image, rng: np.random.Generator, seed: int,
                      mask: Image.Image | None = None) -> DiffusionRequest:
    """The request for one ``family`` image, drawn from ``rng``: the prompt, then for inpainting
    without a given ``mask`` a random soft mask."""
    task = SD_FAMILIES[family]
    prompt = diffusion.make_prompt(rng)
    if task == "inpaint" and mask is None:
        mask = diffusion.random_inpaint_mask(image.size, rng)
    return DiffusionRequest(image, prompt, int(seed), mask if task == "inpaint" else None)


def generate_batch(pipe, requests: Sequence[DiffusionRequest], settings: DiffusionSettings) -> list[Image.Image]:
    """The regenerated images of ``requests``, in one pipeline call."""
    masks = [r.mask for r in requests] if requests and requests[0].mask is not None else None
    return diffusion.generate(
        pipe, [r.image for r in requests], [r.prompt for r in requests], [r.seed for r in requests],
        strength=settings.strength, steps=settings.steps, masks=masks, guidance_scale=settings.guidance_scale,
        size=settings.size, keep_unmasked=settings.keep_unmasked)


def generate_batches(pipe, requests: Sequence[DiffusionRequest], settings: DiffusionSettings,
                     batch_size: int) -> Iterator[tuple[int, Image.Image | Exception]]:
    """``(index, image)`` for every request, ``batch_size`` per pipeline call; a call that fails is
    retried one request at a time, so a failing request yields ``(index, exception)`` and the others
    their images."""
    for start in range(0, len(requests), batch_size):
        chunk = list(requests[start:start + batch_size])
        try:
            images = generate_batch(pipe, chunk, settings)
        except Exception as exc:  # noqa: BLE001 - isolated below
            if len(chunk) == 1:
                yield start, exc
                continue
            images = None
        if images is not None:
            yield from enumerate(images, start)
            continue
        for offset, request in enumerate(chunk):
            try:
                yield start + offset, generate_batch(pipe, [request], settings)[0]
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others
                yield start + offset, exc


def diffusion_params(family: str, request: DiffusionRequest, pipeline_name: str, settings: DiffusionSettings) -> dict:
    """What describes one regenerated image (stored in its manifest row)."""
    params = {"pipeline": pipeline_name, "task": SD_FAMILIES[family], "seed": request.seed, "prompt": request.prompt,
              "strength": settings.strength, "steps": settings.steps, "guidance_scale": settings.guidance_scale,
              "size": settings.size}
    if request.mask is not None:
        params["mask_box"] = list(request.mask.getbbox() or ())
        params["keep_unmasked"] = settings.keep_unmasked
    return params
