"""Editing operations and degradations: deterministic per seed, size-preserving, local where promised."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from dfd_lib.synth import edits, factory

EDIT_FAMILIES = [name for name in factory.family_names() if factory.get_family(name).kind == factory.EDIT.name]


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((96, 80))  # non-square on purpose


@pytest.fixture(scope="module")
def donor() -> Image.Image:
    return Image.fromarray(data.chelsea()).resize((70, 50))


def _diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).sum(axis=-1)


def _make(name: str, photo: Image.Image, seed: int, donor: Image.Image | None = None):
    family = factory.get_family(name)
    return factory.kind_of(family).make(family, photo, np.random.default_rng(seed), donor=donor)


def test_the_edit_families_are_registered():
    assert EDIT_FAMILIES == ["splice", "colour_background", "resample", "self_blend"]


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_edit_is_deterministic_keeps_size_and_changes_pixels(family, photo, donor):
    for seed in range(6):
        out, params = _make(family, photo, seed, donor=donor)
        again, params_again = _make(family, photo, seed, donor=donor)
        assert out.size == photo.size and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), np.asarray(again)) and params == params_again
        assert json.loads(json.dumps(params)) == params  # JSON-able as stored in the manifest
        assert _diff(out, photo).max() > 0
    other, _ = _make(family, photo, 99, donor=donor)
    assert not np.array_equal(np.asarray(other), np.asarray(out))


def test_splice_changes_only_inside_its_box(photo, donor):
    for seed in range(10):
        out, params = edits.splice(photo, donor, np.random.default_rng(seed))
        left, top, right, bottom = params["box"]
        outside = np.ones(photo.size[::-1], bool)
        outside[top:bottom, left:right] = False
        changed = _diff(out, photo)
        assert changed[outside].max() == 0
        assert changed[~outside].mean() > 1


def test_colour_background_keeps_the_centre_and_replaces_the_corners(photo):
    for seed in range(10):
        out, params = edits.colour_background(photo, np.random.default_rng(seed))
        changed = _diff(out, photo)
        h, w = changed.shape
        assert changed[h // 2 - 2:h // 2 + 3, w // 2 - 2:w // 2 + 3].max() == 0
        corners = np.asarray(out)[[0, 0, -1, -1], [0, -1, 0, -1]]
        if params["background"] == "solid":
            assert (corners == params["colours"][0]).all()


def test_resample_covers_both_methods_and_stays_in_its_region(photo):
    methods = set()
    for seed in range(16):
        out, params = edits.resample_artifacts(photo, np.random.default_rng(seed))
        methods.add(params["method"])
        left, top, right, bottom = params["region"]
        outside = np.ones(photo.size[::-1], bool)
        outside[top:bottom, left:right] = False
        if params["local"]:
            assert outside.any() and _diff(out, photo)[outside].max() == 0
        else:
            assert params["region"] == [0, 0, *photo.size]
    assert methods == {"down_up", "transposed_conv"}


def test_transposed_conv_leaves_a_periodic_checkerboard():
    flat = Image.new("RGB", (64, 64), (128, 128, 128))
    out = None
    for seed in range(30):
        out, params = edits.resample_artifacts(flat, np.random.default_rng(seed))
        if params["method"] == "transposed_conv" and not params["local"]:
            break
    arr = np.asarray(out, np.float32)[4:-4, 4:-4, 0]
    # a flat input comes back with a period-2 pattern: even and odd pixels differ
    assert abs(arr[::2, ::2].mean() - arr[1::2, 1::2].mean()) > 1.0


def test_self_blend_uses_a_given_mask_and_rejects_a_wrong_size(photo):
    mask = np.zeros(photo.size[::-1], np.uint8)
    mask[30:50, 40:60] = 255
    out, params = edits.self_blend(photo, np.random.default_rng(0), mask=mask)
    assert params["region"] == "given"
    changed = _diff(out, photo)
    assert changed[:5, :5].max() == 0 and changed[35:45, 45:55].mean() > 0
    with pytest.raises(ValueError, match="mask is 10x10 but the image is 96x80"):
        edits.self_blend(photo, np.random.default_rng(0), mask=np.ones((10, 10)))


def test_detect_face_box_is_none_or_a_box_inside_the_image(photo):
    box = edits.detect_face_box(photo)
    assert box is None or (0 <= box[0] < box[2] <= photo.width and 0 <= box[1] < box[3] <= photo.height)


def test_degradations_are_parametric(photo):
    assert edits.jpeg(photo, 95).size == photo.size
    assert _diff(edits.jpeg(photo, 10), photo).mean() > _diff(edits.jpeg(photo, 90), photo).mean()
    assert edits.resize(photo, 0.5).size == photo.size
    assert edits.resize(photo, 0.5, restore_size=False).size == (48, 40)
    assert np.array_equal(np.asarray(edits.blur(photo, 0)), np.asarray(photo))
    assert _diff(edits.blur(photo, 2.0), photo).mean() > _diff(edits.blur(photo, 0.5), photo).mean() > 0
    noisy = edits.noise(photo, 5.0, np.random.default_rng(0))
    residual = np.asarray(noisy, np.float32) - np.asarray(photo, np.float32)
    assert 3.5 < residual.std() < 6.0
    for bad in (lambda: edits.jpeg(photo, 0), lambda: edits.resize(photo, 0), lambda: edits.blur(photo, -1)):
        with pytest.raises(ValueError):
            bad()


def test_degrade_chain_is_deterministic_and_recorded(photo):
    for seed in range(5):
        out, params = edits.degrade(photo, np.random.default_rng(seed))
        again, _ = edits.degrade(photo, np.random.default_rng(seed))
        assert out.size == photo.size and np.array_equal(np.asarray(out), np.asarray(again))
        assert 1 <= len(params["chain"]) <= 3
        assert {step["op"] for step in params["chain"]} <= {"jpeg", "resize", "blur", "noise"}


def test_unknown_family_is_a_clear_error(photo):
    with pytest.raises(ValueError, match="unknown family 'warp'"):
        _make("warp", photo, 0)
