"""Decoder fuzzing: valid and mutated JPEG, PNG, WebP, BMP, GIF and TIFF files through the one image
loader every part of the kit uses (:func:`dfd_lib.data.images.load_rgb`: manifests, training,
``dfd predict``, the server). Each case is decoded to RGB or refused with an ``ImageLoadError`` and a
reason; nothing else may escape, and nothing may hang (each test stops after ``HANG_GUARD_S``, far
above the seconds it takes; timing is not asserted, busy machines vary). Property-based (hypothesis), derandomised: the same cases
every run. ``pytest -s`` prints how many cases of each format were decoded and refused."""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dfd_lib.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_rgb

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
HANG_GUARD_S = 600  # per test (pytest-timeout): a hang fails the test instead of stalling the suite
CASES = 600  # per kind of damage, spread over the six formats
FUZZ = settings(max_examples=CASES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OUTCOMES: Counter = Counter()
pytestmark = pytest.mark.timeout(HANG_GUARD_S)


def _encode(fmt: str, width: int, height: int, mode: str, seed: int, frames: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    if fmt == "JPEG" and mode == "RGBA":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    extra = {}
    if frames > 1:
        extra = {"save_all": True, "append_images": [image.rotate(10 * i) for i in range(1, frames)]}
    image.save(buffer, format=fmt, **extra)
    return buffer.getvalue()


valid_files = st.builds(_encode, st.sampled_from(FORMATS), st.integers(1, 48), st.integers(1, 48),
                        st.sampled_from(["RGB", "L", "RGBA"]), st.integers(0, 2**16))


def _check(data: bytes, fmt: str, kind: str) -> None:
    """The property: decoded to RGB with pixels, or refused with a reason."""
    try:
        image = load_rgb(data)
    except ImageLoadError as exc:
        assert exc.reason, "a refusal must say why"
        OUTCOMES[(fmt, kind, "refused")] += 1
    else:
        assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
        assert image.width * image.height <= DEFAULT_MAX_PIXELS
        OUTCOMES[(fmt, kind, "decoded")] += 1


def _format_of(data: bytes) -> str:
    return Image.open(io.BytesIO(data)).format


@FUZZ
@given(valid_files)
def test_valid_files_decode(data):
    fmt = _format_of(data)
    image = load_rgb(data)
    assert image.mode == "RGB"
    OUTCOMES[(fmt, "valid", "decoded")] += 1


@FUZZ
@given(valid_files, st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), min_size=1, max_size=16))
def test_bit_flips_decode_or_are_refused(data, flips):
    fmt = _format_of(data)
    damaged = bytearray(data)
    for offset, bit in flips:
        damaged[offset % len(damaged)] ^= 1 << bit
    _check(bytes(damaged), fmt, "bit flips")


@FUZZ
@given(valid_files, st.floats(0.0, 0.999))
def test_truncated_files_decode_or_are_refused(data, share):
    fmt = _format_of(data)
    _check(data[: int(len(data) * share)], fmt, "truncated")


@FUZZ
@given(valid_files, st.sampled_from(FORMATS))
def test_wrong_headers_are_refused_or_decoded(data, other):
    """The first bytes of another format's file on this one's body."""
    fmt = _format_of(data)
    header = _encode(other, 4, 4, "RGB", 0)[:16]
    _check(header + data[len(header):], fmt, "wrong header")


SIZE_FIELD_LIMITS = {"GIF": 65535, "JPEG": 65535, "WEBP": 16383}  # the largest side each header can state


def _declare_size(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """The file with its header claiming ``width`` x ``height`` pixels (each side capped at what the
    format's header can state; the body unchanged). Fails when the header does not then declare that
    size: a rewrite that missed its field would test nothing."""
    limit = SIZE_FIELD_LIMITS.get(fmt, 2**31 - 1)
    width, height = min(width, limit), min(height, limit)
    out = bytearray(data)
    if fmt == "PNG":  # IHDR: 8-byte signature, 4 length, 4 type, then width and height; its CRC made right
        out[16:24] = struct.pack(">II", width, height)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    elif fmt == "BMP":
        out[18:26] = struct.pack("<ii", width, height)
    elif fmt == "GIF":  # logical screen descriptor
        out[6:10] = struct.pack("<HH", width, height)
    elif fmt == "JPEG":  # the SOF0 segment's height and width
        at = out.find(b"\xff\xc0")
        if at >= 0:
            out[at + 5:at + 9] = struct.pack(">HH", height, width)
    elif fmt == "WEBP":  # VP8 key frame: 14-bit width and height after the start code
        at = out.find(b"\x9d\x01\x2a")
        if at >= 0:
            out[at + 3:at + 7] = struct.pack("<HH", width, height)
        if out[12:16] == b"VP8X":  # the extended header (alpha) states the canvas too: width - 1, height - 1
            out[24:30] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    elif fmt == "TIFF":  # ImageWidth (256) and ImageLength (257) entries of the first directory
        for tag, value in ((256, width), (257, height)):
            for entry in range(len(out) - 12):
                if struct.unpack_from("<H", out, entry)[0] == tag and struct.unpack_from("<H", out, entry + 2)[0] in (3, 4):
                    struct.pack_into("<HHII", out, entry, tag, 4, 1, value)
                    break
    expected = (width, height)
    if fmt == "GIF":  # Pillow widens the logical screen to hold the first frame, whose own size is unchanged
        frame = _declared_size(data)
        expected = (max(width, frame[0]), max(height, frame[1]))
    declared = _declared_size(bytes(out))
    assert declared == expected, f"{fmt}: the header declares {declared}, not {expected}: the rewrite missed its field"
    return bytes(out)


def _declared_size(data: bytes) -> tuple[int, int] | str:
    """The size the header states, as Pillow reads it without decoding (its own bomb check off)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data)).size
    except Exception as exc:  # noqa: BLE001 - an unreadable header declares nothing
        return f"unreadable ({type(exc).__name__}: {exc})"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


# sides past which any declared size is huge: 8001 x 8001 > DEFAULT_MAX_PIXELS, whatever a format's cap
HUGE_SIDES = st.integers(int(DEFAULT_MAX_PIXELS ** 0.5) + 1, 2**31 - 1)


@pytest.mark.slow
@FUZZ
@given(valid_files, HUGE_SIDES, HUGE_SIDES)
def test_huge_declared_sizes_are_refused_from_the_header(data, width, height):
    """A header declaring more pixels than the loader accepts is refused from the header, before decoding
    (the size check's or Pillow's bomb message, both raised before any pixel is decoded)."""
    fmt = _format_of(data)
    lying = _declare_size(data, fmt, width, height)
    with pytest.raises(ImageLoadError, match="too large|bomb"):
        load_rgb(lying)
    OUTCOMES[(fmt, "huge declared size", "refused")] += 1


@FUZZ
@given(valid_files, st.integers(1, 2048), st.integers(1, 2048))
def test_wrong_declared_sizes_decode_or_are_refused(data, width, height):
    """A header declaring another size the loader would accept (up to 2048 a side, which keeps each case's
    buffers small): decoded or refused, never a crash or a hang."""
    fmt = _format_of(data)
    _check(_declare_size(data, fmt, width, height), fmt, "wrong declared size")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP", "PNG"])
def test_many_frames_decode_the_first_frame_only(fmt):
    data = _encode(fmt, 32, 24, "RGB", 1, frames=300)
    image = load_rgb(data)
    assert image.size == (32, 24)
    OUTCOMES[(fmt, "many frames", "decoded")] += 1


def test_a_decompression_bomb_is_refused_before_decoding():
    # a 20000 x 20000 PNG of one colour compresses to a few hundred kB: refused by its declared size
    data = _declare_size(_encode("PNG", 8, 8, "L", 0), "PNG", 20000, 20000)
    with pytest.raises(ImageLoadError, match="too large|bomb"):
        load_rgb(data)


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes():
    yield
    for fmt in FORMATS:
        counts = {kind: (OUTCOMES[(fmt, kind, "decoded")], OUTCOMES[(fmt, kind, "refused")])
                  for kind in ("valid", "bit flips", "truncated", "wrong header", "huge declared size", "wrong declared size",
                             "many frames")}
        print(f"{fmt}: " + ", ".join(f"{kind} {d} decoded / {r} refused" for kind, (d, r) in counts.items()))
