"""Image edits that make fake families, and label-preserving degradations for real images.

Every edit takes PIL RGB image(s) and an ``np.random.Generator`` and returns
``(image of the same size, params)``: ``params`` holds JSON-able values that, with the
source, describe the edit (the manifest stores them). The same seed gives the same image.
The families that run them are declared in :mod:`dfd_lib.synth.factory`.
The degradations (:func:`jpeg`, :func:`resize`, :func:`blur`, :func:`noise`) are plain
parametric functions, so the robustness evaluation reuses them at fixed strengths.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFilter

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


# --------------------------------------------------------------------------- helpers
def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _random_box(size: tuple[int, int], rng: np.random.Generator, lo: float, hi: float) -> Box:
    """A box whose sides are ``lo``-``hi`` of the image's, placed uniformly inside it."""
    width, height = size
    box_w = max(2, int(round(width * rng.uniform(lo, hi))))
    box_h = max(2, int(round(height * rng.uniform(lo, hi))))
    left = int(rng.integers(0, width - box_w + 1))
    top = int(rng.integers(0, height - box_h + 1))
    return (left, top, left + box_w, top + box_h)


def _shape_mask(size: tuple[int, int], shape: str, feather: float) -> Image.Image:
    """A mode-L mask of ``size`` filled by a rectangle or an ellipse, feathered by a Gaussian
    of ``feather`` px; the shape is inset so that the feathering stays inside ``size``."""
    width, height = size
    inset = int(np.ceil(2 * feather))
    mask = Image.new("L", size, 0)
    box = (inset, inset, max(inset + 1, width - 1 - inset), max(inset + 1, height - 1 - inset))
    draw = ImageDraw.Draw(mask)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=255)
    return mask.filter(ImageFilter.GaussianBlur(feather)) if feather > 0 else mask


# --------------------------------------------------------------------------- fake families
def splice(target: Image.Image, donor: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Paste a region of ``donor`` (rescaled to the pasted size, possibly rotated) into
    ``target`` through a rectangular or soft elliptical mask. Pixels change only inside
    ``params["box"]``; ``donor`` may be ``target`` itself (copy-move)."""
    target, donor = _rgb(target), _rgb(donor)
    box = _random_box(target.size, rng, 0.2, 0.5)
    paste_w, paste_h = box[2] - box[0], box[3] - box[1]
    # the donor region: its own size (rescale factor 0.6-1.5 of the pasted size), clipped to the donor
    scale = float(rng.uniform(0.6, 1.5))
    crop_w = int(min(donor.width, max(2, round(paste_w * scale))))
    crop_h = int(min(donor.height, max(2, round(paste_h * scale))))
    crop_left = int(rng.integers(0, donor.width - crop_w + 1))
    crop_top = int(rng.integers(0, donor.height - crop_h + 1))
    donor_box = (crop_left, crop_top, crop_left + crop_w, crop_top + crop_h)
    interpolation = _choice(rng, ("bilinear", "bicubic", "lanczos"))
    patch = donor.crop(donor_box).resize((paste_w, paste_h), _RESAMPLING[interpolation])
    shape = _choice(rng, ("rect", "ellipse"))
    feather = float(rng.uniform(0.0, 3.0)) if shape == "rect" else float(rng.uniform(1.0, 4.0))
    mask = _shape_mask((paste_w, paste_h), shape, feather)
    angle = float(rng.uniform(-25, 25)) if rng.random() < 0.4 else 0.0
    if angle:
        # rotate patch and mask together; corners leaving the box are clipped by expand=False
        patch = patch.rotate(angle, resample=Image.Resampling.BICUBIC)
        mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR)
    out = target.copy()
    out.paste(patch, box[:2], mask)
    params = dict(box=list(box), donor_box=list(donor_box), donor_size=list(donor.size), shape=shape,
                  feather=round(feather, 3), angle=round(angle, 3), interpolation=interpolation)
    return out, params


def colour_background(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Keep a central elliptical foreground (the usual place of a subject) and replace the
    rest with a solid colour or a linear two-colour gradient, along a feathered edge."""
    image = _rgb(image)
    width, height = image.size
    axes = (float(rng.uniform(0.3, 0.45)) * width, float(rng.uniform(0.32, 0.47)) * height)
    centre = (width / 2 + float(rng.uniform(-0.05, 0.05)) * width,
              height / 2 + float(rng.uniform(-0.05, 0.05)) * height)
    feather = float(rng.uniform(0.5, 0.03 * min(width, height) + 0.5))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse((centre[0] - axes[0], centre[1] - axes[1],
                                  centre[0] + axes[0], centre[1] + axes[1]), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(feather))
    colour_a = [int(v) for v in rng.integers(0, 256, 3)]
    if rng.random() < 0.5:
        kind, colour_b, angle = "solid", colour_a, 0.0
        background = Image.new("RGB", image.size, tuple(colour_a))
    else:
        kind, colour_b = "gradient", [int(v) for v in rng.integers(0, 256, 3)]
        angle = float(rng.uniform(0, 360))
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * np.cos(np.radians(angle)) + ys * np.sin(np.radians(angle))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        ramp = (1 - t)[..., None] * np.array(colour_a, np.float32) + t[..., None] * np.array(colour_b, np.float32)
        background = Image.fromarray(np.clip(ramp + 0.5, 0, 255).astype(np.uint8))
    out = Image.composite(image, background, mask)
    params = dict(foreground="centre_ellipse", centre=[round(c, 2) for c in centre],
                  axes=[round(a, 2) for a in axes], feather=round(feather, 3), background=kind,
                  colours=[colour_a, colour_b], gradient_angle=round(angle, 2))
    return out, params


def _transposed_conv_upsample(small: Image.Image, size: tuple[int, int], weight_seed: int, jitter: float) -> Image.Image:
    """2x upsampling by a stride-2 transposed convolution whose kernel is bilinear plus fixed
    random jitter: the uneven kernel overlap leaves the checkerboard of GAN upsamplers."""
    generator = torch.Generator().manual_seed(weight_seed)
    bilinear = torch.tensor([0.5, 1.0, 0.5])
    base = torch.zeros(3, 3, 3, 3)
    for c in range(3):
        base[c, c] = bilinear[:, None] * bilinear[None, :]
    # mostly per-channel jitter (uneven phases -> checkerboard); a little channel mixing
    spread = torch.full((3, 3, 1, 1), 0.04) + torch.eye(3).view(3, 3, 1, 1) * 0.16
    weight = base + jitter * torch.randn(3, 3, 3, 3, generator=generator) * spread
    x = TF.pil_to_tensor(small).float().unsqueeze(0) / 255.0
    y = torch.nn.functional.conv_transpose2d(x, weight, stride=2, padding=1, output_padding=1)
    up = TF.to_pil_image(y.squeeze(0).clamp(0, 1))
    return up if up.size == size else up.resize(size, Image.Resampling.NEAREST)


def resample_artifacts(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Local or whole-image resampling traces: down-up sampling (random factor and
    interpolations) or 2x downsampling followed by a random-jittered transposed convolution
    (checkerboard artefacts). ``params["region"]`` is the edited box."""
    image = _rgb(image)
    region = _random_box(image.size, rng, 0.35, 0.7) if rng.random() < 0.5 else (0, 0, *image.size)
    part = image.crop(region)
    method = _choice(rng, ("down_up", "transposed_conv"))
    params: dict = dict(method=method, region=list(region), local=region != (0, 0, *image.size))
    if method == "down_up":
        factor = float(rng.uniform(0.25, 0.6))
        down, up = _choice(rng, ("nearest", "bilinear", "bicubic", "box")), _choice(rng, ("nearest", "bilinear", "bicubic", "lanczos"))
        small = part.resize((max(1, round(part.width * factor)), max(1, round(part.height * factor))), _RESAMPLING[down])
        edited = small.resize(part.size, _RESAMPLING[up])
        params.update(factor=round(factor, 4), down=down, up=up)
    else:
        weight_seed, jitter = int(rng.integers(2**31)), float(rng.uniform(0.3, 1.0))
        small = part.resize((max(1, (part.width + 1) // 2), max(1, (part.height + 1) // 2)), Image.Resampling.BOX)
        edited = _transposed_conv_upsample(small, part.size, weight_seed, jitter)
        edited = edited.crop((0, 0, *part.size)) if edited.size != part.size else edited
        params.update(weight_seed=weight_seed, jitter=round(jitter, 4))
    out = image.copy()
    out.paste(edited, region[:2])
    return out, params


_MTCNN = None


def detect_face_box(image: Image.Image) -> Box | None:
    """The most confident face box from facenet-pytorch's MTCNN, or None when no face is found
    or facenet-pytorch is not installed (it is optional)."""
    global _MTCNN
    try:
        if _MTCNN is None:
            from facenet_pytorch import MTCNN  # deferred: optional package, used when installed

            _MTCNN = MTCNN(keep_all=True, device="cpu")
        boxes, probs = _MTCNN.detect(_rgb(image))
    except ImportError:
        return None
    if boxes is None or len(boxes) == 0:
        return None
    boxes = np.asarray(boxes).astype(float)  # object arrays under numpy 2
    best = boxes[int(np.nanargmax(np.asarray(probs).astype(float)))]
    left, top = max(0, int(best[0])), max(0, int(best[1]))
    right, bottom = min(image.width, int(np.ceil(best[2]))), min(image.height, int(np.ceil(best[3])))
    return (left, top, right, bottom) if right - left > 1 and bottom - top > 1 else None


def self_blend(image: Image.Image, rng: np.random.Generator,
               mask: Image.Image | np.ndarray | None = None) -> tuple[Image.Image, dict]:
    """Self-blended image (Shiohara & Yamasaki, CVPR 2022): blend the image with a colour-
    and geometry-jittered copy of itself along a soft mask. ``mask`` (HxW, nonzero = region)
    defaults to an ellipse in the face box from :func:`detect_face_box`, else a central one."""
    image = _rgb(image)
    width, height = image.size
    if mask is not None:
        region_mask = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
        if region_mask.shape[:2] != (height, width):
            raise ValueError(f"self_blend mask is {region_mask.shape[1]}x{region_mask.shape[0]} "
                             f"but the image is {width}x{height}")
        region, box = "given", None
        region_mask = (region_mask > 0).astype(np.uint8) * 255
    else:
        face = detect_face_box(image)
        region = "face" if face else "centre_ellipse"
        box = face or (int(width * 0.25), int(height * 0.2), int(width * 0.75), int(height * 0.8))
        canvas = Image.new("L", image.size, 0)
        ImageDraw.Draw(canvas).ellipse(box, fill=255)
        region_mask = np.asarray(canvas)
    # soft mask: random erosion then Gaussian blur, scaled by a blend ratio (as in SBI)
    short = min(width, height)
    erode = int(rng.integers(0, max(2, short // 24)))
    if erode:
        region_mask = cv2.erode(region_mask, np.ones((2 * erode + 1,) * 2, np.uint8))
    blur_sigma = float(rng.uniform(0.02, 0.06)) * short
    soft = cv2.GaussianBlur(region_mask.astype(np.float32) / 255.0, (0, 0), blur_sigma)
    blend_ratio = float(_choice(rng, (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)))
    soft = np.clip(soft * blend_ratio, 0, 1)[..., None]
    # the jittered copy: colour first, then a small scale/shift
    jitter = dict(brightness=float(rng.uniform(0.9, 1.1)), contrast=float(rng.uniform(0.9, 1.1)),
                  saturation=float(rng.uniform(0.85, 1.15)), hue=float(rng.uniform(-0.03, 0.03)),
                  scale=float(rng.uniform(0.95, 1.05)),
                  translate=[int(rng.integers(-max(1, width // 33), max(1, width // 33) + 1)),
                             int(rng.integers(-max(1, height // 33), max(1, height // 33) + 1))])
    copy = TF.adjust_brightness(image, jitter["brightness"])
    copy = TF.adjust_contrast(copy, jitter["contrast"])
    copy = TF.adjust_saturation(copy, jitter["saturation"])
    copy = TF.adjust_hue(copy, jitter["hue"])
    copy = TF.affine(copy, angle=0.0, translate=jitter["translate"], scale=jitter["scale"], shear=[0.0],
                     interpolation=TF.InterpolationMode.BILINEAR, fill=None)
    blended = soft * np.asarray(copy, np.float32) + (1 - soft) * np.asarray(image, np.float32)
    out = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    params = dict(region=region, box=list(box) if box else None, erode=erode, blur_sigma=round(blur_sigma, 3),
                  blend_ratio=blend_ratio, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in jitter.items()})
    return out, params


# --------------------------------------------------------------------------- real-class degradations
def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG at ``quality`` (1-95) and decode again."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100; got {quality}")
    buffer = io.BytesIO()
    _rgb(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def resize(image: Image.Image, scale: float, restore_size: bool = True, interpolation: str = "bilinear") -> Image.Image:
    """Scale by ``scale``; with ``restore_size`` (default) scale back to the original size, so
    the image keeps its size but loses (scale < 1) detail, as a re-posted photo does."""
    if scale <= 0:
        raise ValueError(f"resize scale must be positive; got {scale}")
    image = _rgb(image)
    resample = _RESAMPLING[interpolation]
    scaled = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    return scaled.resize(image.size, resample) if restore_size else scaled


def blur(image: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation ``sigma`` pixels (0 = unchanged)."""
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0; got {sigma}")
    image = _rgb(image)
    return image.filter(ImageFilter.GaussianBlur(sigma)) if sigma > 0 else image.copy()


def noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Add Gaussian noise of standard deviation ``sigma`` (in 0-255 units)."""
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0; got {sigma}")
    arr = np.asarray(_rgb(image), np.float32)
    arr = arr + rng.normal(0.0, sigma, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def degrade(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """A random chain of one to three degradations in random order; the label is unchanged."""
    ops = list(rng.permutation(["jpeg", "resize", "blur", "noise"])[: int(rng.integers(1, 4))])
    out, chain = _rgb(image), []
    for op in ops:
        if op == "jpeg":
            step = dict(op="jpeg", quality=int(rng.integers(30, 96)))
            out = jpeg(out, step["quality"])
        elif op == "resize":
            step = dict(op="resize", scale=round(float(rng.uniform(0.4, 0.9)), 4),
                        interpolation=_choice(rng, ("bilinear", "bicubic", "lanczos")))
            out = resize(out, step["scale"], interpolation=step["interpolation"])
        elif op == "blur":
            step = dict(op="blur", sigma=round(float(rng.uniform(0.3, 1.5)), 4))
            out = blur(out, step["sigma"])
        else:
            step = dict(op="noise", sigma=round(float(rng.uniform(1.0, 8.0)), 4))
            out = noise(out, step["sigma"], rng)
        chain.append(step)
    return out, dict(chain=chain)
