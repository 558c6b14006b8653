"""Stable Diffusion img2img and inpainting of real images, through diffusers.

A pipeline comes from a checkpoint — a local diffusers folder, a single ``.safetensors`` file, or a
Hugging Face hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` read the standard way
(diffusers' ``from_pretrained`` and the Hugging Face cache; ``HF_HUB_OFFLINE=1`` reads the cache
only) — or, by default and in tests, from :func:`build_tiny_pipeline`: the same Stable Diffusion
architecture at toy size with random weights, built in-process and offline. Its images are not
photographs, but they pass through the very code a real checkpoint uses.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from huggingface_hub import snapshot_download
from PIL import Image, ImageDraw, ImageFilter
from tokenizers.pre_tokenizers import ByteLevel

from dfd_lib.core.paths import resolve

Task = Literal["img2img", "inpaint"]
TASKS: tuple[str, ...] = ("img2img", "inpaint")

TINY_IMAGE_SIZE = 128  # the tiny pipeline's native resolution (UNet sample 16 x VAE factor 8)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
TINY_PREFIX = "tiny:"  # "tiny:<folder>": the tiny pipeline, written there with save_pretrained on first use
# what every table and report says of images made by the tiny pipeline (no checkpoint, or tiny:<folder>)
RANDOM_WEIGHT_NOTE = "random-weight pipeline: not Stable Diffusion images"


class DiffusionUnavailableError(FileNotFoundError):
    """A Stable Diffusion checkpoint that is neither a local folder or file nor a hub id that can be had."""

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of {subject}, {style}",
    "a close-up photograph of {subject}, {style}",
    "{subject} in {place}, {style}",
    "a portrait of {subject}, {style}",
)
PROMPT_SUBJECTS: tuple[str, ...] = (
    "a person", "a smiling woman", "an old man", "a cat", "a cup of coffee", "a motorbike",
    "a rocket on a launch pad", "a flower", "a city street", "an astronaut",
)
PROMPT_PLACES: tuple[str, ...] = ("a park", "an office", "a studio", "the street", "a kitchen")
PROMPT_STYLES: tuple[str, ...] = (
    "high detail", "natural light", "DSLR, 50mm", "soft focus", "film grain", "studio lighting",
)


def make_prompt(rng: np.random.Generator) -> str:
    """A prompt drawn from :data:`PROMPT_TEMPLATES` and the word lists beside it."""
    template = PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))]
    return template.format(
        subject=PROMPT_SUBJECTS[rng.integers(len(PROMPT_SUBJECTS))],
        place=PROMPT_PLACES[rng.integers(len(PROMPT_PLACES))],
        style=PROMPT_STYLES[rng.integers(len(PROMPT_STYLES))],
    )


def random_inpaint_mask(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A soft-edged mask (mode L, white = repaint) of one rectangle or ellipse covering
    roughly 10-40 % of an image of ``size`` = (width, height)."""
    width, height = size
    mask = Image.new("L", (width, height), 0)
    mask_w = int(width * rng.uniform(0.3, 0.65))
    mask_h = int(height * rng.uniform(0.3, 0.65))
    left = int(rng.integers(0, max(width - mask_w, 0) + 1))
    top = int(rng.integers(0, max(height - mask_h, 0) + 1))
    box = (left, top, left + mask_w, top + mask_h)
    draw = ImageDraw.Draw(mask)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=255)
    return mask.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(width, height) / 64)))


# --------------------------------------------------------------------------- tiny pipeline
def _write_byte_level_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt of a CLIP BPE with no merges: every byte is a token (alone or
    word-final with ``</w>``), plus the start/end tokens CLIP expects."""
    chars = sorted(ByteLevel.alphabet())  # the 256 characters byte-level BPE maps bytes to
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def build_tiny_pipeline(task: Task = "img2img", seed: int = 0):
    """A Stable Diffusion img2img or inpainting pipeline at toy size with random weights,
    built offline and deterministically from ``seed`` (128 px native, about 0.15 s per
    image for 4 steps on a 2-core CPU). The global torch RNG is left untouched."""
    from diffusers import (  # deferred: diffusers takes seconds to import
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # deferred: transformers and diffusers are slow to import

    _check_task(task)
    with tempfile.TemporaryDirectory(prefix="dfd_tokenizer_") as folder:
        _write_byte_level_tokenizer(Path(folder))
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_IMAGE_SIZE // 8,
            in_channels=9 if task == "inpaint" else 4,  # inpainting UNets also see mask + masked latents
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,  # four blocks: three 2x downsamples = 8x
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=TINY_IMAGE_SIZE,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipeline_class = StableDiffusionInpaintPipeline if task == "inpaint" else StableDiffusionImg2ImgPipeline
    pipe = pipeline_class(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- loading
def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown generation task {task!r}; expected one of {TASKS}")


def load_pipeline(task: Task = "img2img", path: str | os.PathLike | None = None,
                  device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  seed: int = 0, single_file_config: str | os.PathLike | None = None):
    """The generation pipeline for ``task``, ready on ``device``.

    ``path`` None gives :func:`build_tiny_pipeline` (``seed`` seeds its weights); a folder is
    a diffusers pipeline (``save_pretrained`` layout); a ``.safetensors``/``.ckpt`` file is a
    single-file checkpoint (offline this needs ``single_file_config``: a local diffusers
    folder holding the matching configs); a hub id (:func:`is_hub_id`) loads with diffusers'
    ``from_pretrained``, through the Hugging Face cache. A missing path raises
    :class:`FileNotFoundError` before anything is built or written. On CUDA the default
    dtype is fp16 with attention slicing; on CPU fp32.
    """
    _check_task(task)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if path is None:
        pipe = build_tiny_pipeline(task, seed=seed)  # built in fp32
        pipe = pipe.to(dtype=dtype) if dtype != torch.float32 else pipe
    elif str(path).startswith(TINY_PREFIX):
        pipe = _load_local_pipeline(task, tiny_folder(path), dtype, single_file_config)
    elif is_hub_id(path):
        pipe = _load_hub_pipeline(task, str(path), dtype)
    else:  # loaded in its dtype already: a later cast would skip modules kept in fp32
        pipe = _load_local_pipeline(task, Path(path).expanduser(), dtype, single_file_config)
    pipe = pipe.to(device)
    if device.type == "cuda":
        pipe.enable_attention_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_folder(checkpoint: str | os.PathLike | None) -> Path | None:
    """The folder of a ``tiny:<folder>`` checkpoint (the tiny random-weight pipeline as a real diffusers
    folder, for runs that exercise folder loading on a CPU), written on first use; None for any other value."""
    text = str(checkpoint or "")
    if not text.startswith(TINY_PREFIX):
        return None
    folder = resolve(text[len(TINY_PREFIX):] or "tiny-stable-diffusion")
    if not (folder / "model_index.json").is_file():
        staging = folder.with_name(f".{folder.name}.writing")
        save_pipeline(build_tiny_pipeline("img2img"), staging)  # serves inpainting too, as any SD 1.x folder
        os.replace(staging, folder)
    return folder


def is_random_weight(checkpoint: str | os.PathLike | None) -> bool:
    """Whether ``checkpoint`` gives the tiny random-weight pipeline: none at all, or ``tiny:<folder>``."""
    return not checkpoint or str(checkpoint).startswith(TINY_PREFIX)


def is_hub_id(checkpoint: str | os.PathLike | None) -> bool:
    """Whether ``checkpoint`` names a Hugging Face hub repo (``org/name``) rather than a local path:
    it has that shape and no such file or folder exists (relative paths count from the project root)."""
    text = str(checkpoint or "")
    return bool(_HUB_ID.fullmatch(text)) and not resolve(text).exists() and not Path(text).expanduser().exists()


def locate_checkpoint(checkpoint: str, fetch: bool = False) -> str:
    """Where ``checkpoint`` comes from here: ``file:<path>`` for a local folder or file, or
    ``hub:<repo>@<revision>`` for a hub id found in the Hugging Face cache (with ``fetch``: downloaded
    into it first, the files a pipeline needs, as diffusers' ``DiffusionPipeline.download`` picks them)."""
    folder = tiny_folder(checkpoint)
    if folder is not None:
        return f"file:{folder} (the tiny random-weight pipeline, written with save_pretrained)"
    if not is_hub_id(checkpoint):
        path = resolve(checkpoint)
        if path.is_dir() and (path / "model_index.json").is_file() or path.is_file():
            return f"file:{path}"
        raise DiffusionUnavailableError(f"Stable Diffusion checkpoint not found: {path} (a diffusers folder, "
                                        "a .safetensors file, or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5)")
    try:
        if fetch:
            from diffusers import DiffusionPipeline  # deferred: transformers and diffusers are slow to import

            folder = Path(DiffusionPipeline.download(checkpoint))
        else:
            folder = Path(snapshot_download(checkpoint, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - not cached, no network, no such repo: all mean "cannot be had"
        raise DiffusionUnavailableError(
            f"Stable Diffusion checkpoint {checkpoint} is not in the Hugging Face cache and could not be fetched "
            f"({type(exc).__name__}); run `dfd fetch-weights` on a machine online, or give a local folder") from exc
    if not (folder / "model_index.json").is_file():
        raise DiffusionUnavailableError(f"{checkpoint}: the cached snapshot {folder} holds no model_index.json")
    return f"hub:{checkpoint}@{folder.name}"


def _load_hub_pipeline(task: str, repo: str, dtype: torch.dtype) -> object:
    from diffusers import (  # deferred: diffusers takes seconds to import
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
    )

    auto_class = AutoPipelineForInpainting if task == "inpaint" else AutoPipelineForImage2Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return auto_class.from_pretrained(repo, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    except OSError as exc:  # diffusers' answer to "not in the cache" (offline) or "no such repo"
        raise DiffusionUnavailableError(f"Stable Diffusion checkpoint {repo} could not be loaded: {str(exc).splitlines()[0]}; "
                                        "run `dfd fetch-weights` on a machine online, or give a local folder") from exc


def _load_local_pipeline(task: str, path: Path, dtype: torch.dtype, single_file_config) -> object:
    from diffusers import (  # deferred: diffusers takes seconds to import
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
    )

    if not path.exists():
        raise FileNotFoundError(f"Stable Diffusion checkpoint not found: {path} "
                                "(give a diffusers folder, a .safetensors file, or None for the tiny pipeline)")
    common = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
                  local_files_only=True)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        auto_class = AutoPipelineForInpainting if task == "inpaint" else AutoPipelineForImage2Image
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype; older ones need it
            warnings.simplefilter("ignore", FutureWarning)
            return auto_class.from_pretrained(str(path), **common)
    if path.suffix.lower() not in (".safetensors", ".ckpt"):
        raise ValueError(f"{path}: a single-file checkpoint must be .safetensors or .ckpt")
    pipeline_class = StableDiffusionInpaintPipeline if task == "inpaint" else StableDiffusionImg2ImgPipeline
    if single_file_config is not None:
        common["config"] = str(single_file_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return pipeline_class.from_single_file(str(path), **common)


def save_pipeline(pipe, folder: str | os.PathLike) -> Path:
    """Write ``pipe`` as a diffusers folder that :func:`load_pipeline` reads back."""
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


# --------------------------------------------------------------------------- generation
def native_size(pipe) -> int:
    """The square resolution the pipeline's UNet was trained at (128 tiny, 512 SD 1.x)."""
    sample = pipe.unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * int(pipe.vae_scale_factor)


@torch.inference_mode()
def generate(pipe, images: list[Image.Image], prompts: list[str], seeds: list[int],
             strength: float = 0.6, steps: int = 4, masks: list[Image.Image] | None = None,
             guidance_scale: float = 1.0, size: int | None = None,
             keep_unmasked: bool = True) -> list[Image.Image]:
    """Regenerate ``images`` (img2img) or repaint their ``masks`` (inpainting pipelines) in one
    batch, with one ``torch.Generator`` seeded from ``seeds[i]`` per image.

    Images are resized to ``size`` x ``size`` (default: the pipeline's native size, rounded to
    a multiple of 8) for the diffusion and the outputs resized back to each source's size.
    Masks (mode L, white = repaint) must have their image's size. With ``keep_unmasked``
    (default) an inpainted output is the generated pixels composited over the source through
    its mask (grey levels blend), as diffusers' ``VaeImageProcessor.apply_overlay`` does: the
    fake differs from its source only where the mask is nonzero, instead of carrying the VAE
    round trip (and the resizes) over the whole image. Give soft masks (as
    :func:`random_inpaint_mask` does) for a seamless edge. ``guidance_scale`` <= 1 skips
    classifier-free guidance (half the compute; random-weight pipelines gain nothing from
    it); real checkpoints usually use 5-8. Only ``steps * strength`` steps run.
    """
    n = len(images)
    if not (len(prompts) == len(seeds) == n):
        raise ValueError(f"images, prompts and seeds must have the same length; got {n}, {len(prompts)}, {len(seeds)}")
    if n == 0:
        return []
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1]; got {strength}")
    if int(steps * strength) < 1:
        raise ValueError(f"steps * strength must be at least 1 (got {steps} * {strength}); raise steps")
    inpainting = "mask_image" in _call_parameters(pipe)
    if inpainting and masks is None:
        raise ValueError("an inpainting pipeline needs masks (see random_inpaint_mask)")
    if masks is not None:
        if not inpainting:
            raise ValueError("masks were given but the pipeline does not inpaint; load it with task='inpaint'")
        if len(masks) != n:
            raise ValueError(f"got {len(masks)} masks for {n} images")
        for i, (image, mask) in enumerate(zip(images, masks)):
            if mask.size != image.size:
                raise ValueError(f"mask {i} is {mask.size[0]}x{mask.size[1]} but its image is "
                                 f"{image.size[0]}x{image.size[1]}; masks must match their image's size")
    work = int(size or native_size(pipe)) // 8 * 8
    if work < 8:
        raise ValueError(f"size must be at least 8; got {size}")
    batch = [im.convert("RGB").resize((work, work), Image.Resampling.BICUBIC) for im in images]
    kwargs: dict = dict(prompt=list(prompts), image=batch, strength=float(strength),
                        num_inference_steps=int(steps), guidance_scale=float(guidance_scale),
                        generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
                        output_type="pil")
    if inpainting:
        kwargs.update(mask_image=[m.convert("L").resize((work, work), Image.Resampling.NEAREST) for m in masks],
                      height=work, width=work)
    outputs = pipe(**kwargs).images
    outputs = [out.convert("RGB").resize(src.size, Image.Resampling.BICUBIC) for out, src in zip(outputs, images)]
    if inpainting and keep_unmasked:
        outputs = [Image.composite(out, src.convert("RGB"), mask.convert("L"))
                   for out, src, mask in zip(outputs, images, masks)]
    return outputs


def _call_parameters(pipe) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)
