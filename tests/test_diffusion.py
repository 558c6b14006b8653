"""Stable Diffusion generation with the tiny random-weight pipeline, and loading a local folder."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data
from tiny_training import one_torch_thread

from dfd_lib.synth import diffusion as generation


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: many times faster for these tiny models on the shared 2-core machine."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def sources() -> list[Image.Image]:
    return [Image.fromarray(data.astronaut()).resize((120, 90)), Image.fromarray(data.coffee()).resize((64, 100))]


@pytest.fixture(scope="module")
def img2img():
    return generation.build_tiny_pipeline("img2img", seed=0)


@pytest.fixture(scope="module")
def inpaint():
    return generation.build_tiny_pipeline("inpaint", seed=0)


def _max_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def test_tiny_pipeline_is_deterministic_per_seed():
    a, b = generation.build_tiny_pipeline("img2img", seed=1), generation.build_tiny_pipeline("img2img", seed=1)
    c = generation.build_tiny_pipeline("img2img", seed=2)
    first = next(iter(a.unet.state_dict().values()))
    assert (first == next(iter(b.unet.state_dict().values()))).all()
    assert not (first == next(iter(c.unet.state_dict().values()))).all()
    assert a.unet.config.in_channels == 4 and a.vae_scale_factor == 8 and generation.native_size(a) == 128


def test_img2img_keeps_source_size_and_is_seeded(img2img, sources):
    prompts = ["a photo of a cat", "a cup of coffee"]
    out = generation.generate(img2img, sources, prompts, [1, 2], strength=0.6, steps=4)
    again = generation.generate(img2img, sources, prompts, [1, 2], strength=0.6, steps=4)
    other = generation.generate(img2img, sources, prompts, [3, 4], strength=0.6, steps=4)
    assert [o.size for o in out] == [s.size for s in sources] and all(o.mode == "RGB" for o in out)
    assert all(_max_diff(x, y) == 0 for x, y in zip(out, again))
    assert all(_max_diff(x, y) > 10 for x, y in zip(out, other))
    assert all(_max_diff(x, s) > 10 for x, s in zip(out, sources))  # really regenerated


def test_inpaint_keeps_source_size_and_is_seeded(inpaint, sources):
    assert inpaint.unet.config.in_channels == 9
    masks = [generation.random_inpaint_mask(s.size, np.random.default_rng(i)) for i, s in enumerate(sources)]
    assert all(m.mode == "L" and m.size == s.size and m.getbbox() for m, s in zip(masks, sources))
    out = generation.generate(inpaint, sources, ["x", "y"], [5, 6], masks=masks, size=64)
    again = generation.generate(inpaint, sources, ["x", "y"], [5, 6], masks=masks, size=64)
    assert [o.size for o in out] == [s.size for s in sources]
    assert all(_max_diff(x, y) == 0 for x, y in zip(out, again))


def test_inpaint_changes_only_masked_pixels(inpaint, sources):
    masks = [generation.random_inpaint_mask(s.size, np.random.default_rng(10 + i)) for i, s in enumerate(sources)]
    out = generation.generate(inpaint, sources, ["x", "y"], [5, 6], masks=masks)
    raw = generation.generate(inpaint, sources, ["x", "y"], [5, 6], masks=masks, keep_unmasked=False)
    for image, source, mask, whole in zip(out, sources, masks, raw):
        pixels, original = np.asarray(image, np.int16), np.asarray(source.convert("RGB"), np.int16)
        outside, inside = np.asarray(mask) == 0, np.asarray(mask) == 255
        assert outside.any() and inside.any()
        assert np.array_equal(pixels[outside], original[outside])  # untouched outside the mask
        assert np.abs(pixels[inside] - original[inside]).max() > 10  # repainted inside it
        assert np.array_equal(pixels[inside], np.asarray(whole, np.int16)[inside])
        # without the overlay the VAE round trip alters the whole image
        assert np.abs(np.asarray(whole, np.int16)[outside] - original[outside]).mean() > 5


def test_wrong_size_mask_is_a_clear_error(inpaint, sources):
    masks = [Image.new("L", (32, 32), 255), Image.new("L", sources[1].size, 255)]
    with pytest.raises(ValueError, match="mask 0 is 32x32 but its image is 120x90"):
        generation.generate(inpaint, sources, ["x", "y"], [0, 1], masks=masks)
    with pytest.raises(ValueError, match="needs masks"):
        generation.generate(inpaint, sources, ["x", "y"], [0, 1])


def test_bad_generation_arguments(img2img, sources):
    with pytest.raises(ValueError, match="same length"):
        generation.generate(img2img, sources, ["x"], [0, 1])
    with pytest.raises(ValueError, match="steps \\* strength"):
        generation.generate(img2img, sources, ["x", "y"], [0, 1], strength=0.2, steps=2)


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_saved_folder_loads_back_through_load_pipeline(task, tmp_path, sources):
    pipe = generation.build_tiny_pipeline(task, seed=4)
    folder = generation.save_pipeline(pipe, tmp_path / "my-checkpoint")
    assert (folder / "model_index.json").is_file()
    loaded = generation.load_pipeline(task, str(folder), device="cpu")
    masks = [generation.random_inpaint_mask(s.size, np.random.default_rng(0)) for s in sources] if task == "inpaint" else None
    expected = generation.generate(pipe, sources, ["a", "b"], [7, 8], masks=masks)
    got = generation.generate(loaded, sources, ["a", "b"], [7, 8], masks=masks)
    assert [g.size for g in got] == [s.size for s in sources]
    # same weights: the images agree up to float rounding of differently-built modules
    assert all(_max_diff(x, y) <= 2 for x, y in zip(expected, got))


def test_an_ordinary_checkpoint_also_inpaints(tmp_path, sources):
    """A plain (4-channel UNet) checkpoint loaded for inpainting: diffusers blends the source's
    latents outside the mask, so one SD 1.x folder serves both families."""
    folder = generation.save_pipeline(generation.build_tiny_pipeline("img2img", seed=5), tmp_path / "plain")
    pipe = generation.load_pipeline("inpaint", folder, device="cpu")
    assert pipe.unet.config.in_channels == 4
    masks = [generation.random_inpaint_mask(s.size, np.random.default_rng(i)) for i, s in enumerate(sources)]
    for out, source, mask in zip(generation.generate(pipe, sources, ["a", "b"], [1, 2], masks=masks), sources, masks):
        diff = np.abs(np.asarray(out, np.int16) - np.asarray(source, np.int16))
        assert diff[np.asarray(mask) == 0].max() == 0 and diff[np.asarray(mask) == 255].max() > 10


def test_missing_checkpoint_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        generation.load_pipeline("img2img", tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        generation.load_pipeline("img2img", tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown generation task"):
        generation.load_pipeline("txt2img")


def test_prompts_come_from_templates():
    rng = np.random.default_rng(0)
    prompts = {generation.make_prompt(rng) for _ in range(20)}
    assert len(prompts) > 5 and all(isinstance(p, str) and p for p in prompts)
    assert generation.make_prompt(np.random.default_rng(3)) == generation.make_prompt(np.random.default_rng(3))
