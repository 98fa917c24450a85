"""Pure decode/resize: every colour mode, EXIF rotation, animation, bad inputs, no mutation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import encode, gradient
from PIL import Image

from transforms.images import ImageError, load_image

SIZE = (8, 8)


def noise(size=64) -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def solid(mode: str, value, size=(6, 4)) -> Image.Image:
    return Image.new(mode, size, value)


@pytest.mark.parametrize(
    "mode, value, fmt, expected",
    [
        ("RGB", (10, 20, 30), "PNG", (10, 20, 30)),
        ("L", 77, "PNG", (77, 77, 77)),
        ("1", 1, "PNG", (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), "JPEG", (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), "TIFF", (255, 0, 0)),
        ("RGBA", (200, 0, 0, 255), "PNG", (200, 0, 0)),
        ("RGBA", (0, 0, 0, 0), "PNG", (255, 255, 255)),  # transparent -> white, not black
        ("LA", (0, 0), "PNG", (255, 255, 255)),
        ("LA", (90, 255), "PNG", (90, 90, 90)),
        ("I;16", 65535, "PNG", (255, 255, 255)),
        ("I;16", 257 * 128, "PNG", (128, 128, 128)),  # scaled, not clipped
        ("I", 257 * 64, "TIFF", (64, 64, 64)),
        ("F", 0.5, "TIFF", (128, 128, 128)),
    ],
)
def test_every_mode_becomes_rgb(mode, value, fmt, expected):
    out = load_image(encode(solid(mode, value), fmt), SIZE)
    assert out.pixels.dtype == np.uint8
    assert out.pixels.shape == (8, 8, 3)
    tolerance = 2 if fmt == "JPEG" else 0
    assert np.abs(out.pixels.astype(int) - expected).max() <= tolerance
    assert (out.width, out.height) == (6, 4)


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    data = encode(image, "PNG", transparency=0)
    out = load_image(data, (4, 4))
    assert tuple(out.pixels[0, 0]) == (255, 0, 0)
    assert tuple(out.pixels[3, 3]) == (255, 255, 255)


def test_palette_without_transparency():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    assert tuple(load_image(encode(image, "GIF"), (4, 4)).pixels[2, 2]) == (0, 128, 0)


def test_exif_orientation_is_applied():
    # A 6x4 image: left half red, right half blue. Orientation 6 = rotate 90 degrees clockwise.
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[:, :3] = (255, 0, 0)
    pixels[:, 3:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes())
    out = load_image(data, (6, 4))
    assert (out.width, out.height) == (4, 6)  # displayed size
    assert tuple(out.pixels[0, 3]) == (255, 0, 0)  # red is now on top
    assert tuple(out.pixels[5, 3]) == (0, 0, 255)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (5, 5), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = load_image(data, (5, 5))
    assert tuple(out.pixels[2, 2]) == (255, 0, 0)


def test_resize_squash_and_crop():
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, :10] = 255  # white left third
    data = encode(Image.fromarray(pixels), "PNG")
    squash = load_image(data, (10, 10))
    crop = load_image(data, (10, 10), resize="crop")
    assert squash.pixels[:, :3].mean() > 250  # the white third survives squashing
    assert crop.pixels.max() == 0  # the centred square crop is all black


def test_jpeg_draft_decoding_is_close_to_full_decoding():
    big = gradient(1600, 1200, seed=3)
    data = encode(big, "JPEG", quality=95)
    out = load_image(data, (100, 100))
    full = np.asarray(big.resize((100, 100), Image.Resampling.BILINEAR), dtype=float)
    assert np.abs(out.pixels.astype(float) - full).mean() < 3.0
    assert (out.width, out.height) == (1600, 1200)


@pytest.mark.parametrize(
    "data, stage, reason",
    [
        (b"", "decode", "empty file"),
        (b"this is not an image at all", "decode", "not an image"),
        (encode(noise(), "PNG")[:2000], "decode", "corrupt"),
        (encode(noise(), "JPEG")[:2000], "decode", "corrupt"),
    ],
)
def test_bad_inputs_raise_clear_errors(data, stage, reason):
    with pytest.raises(ImageError) as info:
        load_image(data, SIZE)
    assert info.value.stage == stage
    assert reason in info.value.reason


def test_decompression_bomb_is_refused_before_decoding():
    data = encode(Image.new("L", (3000, 3000), 0), "PNG")  # tiny file, 9 Mpx
    with pytest.raises(ImageError) as info:
        load_image(data, SIZE, max_pixels=1_000_000)
    assert info.value.stage == "limits"
    assert "3000x3000" in info.value.reason


def test_pillow_bomb_error_is_reported_as_limits(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.new("L", (100, 100), 0), "PNG")
    with pytest.raises(ImageError) as info:
        load_image(data, SIZE)
    assert info.value.stage == "limits"


def test_input_bytes_and_returned_pixels_are_independent():
    data = encode(gradient(20, 20), "PNG")
    before = bytes(data)
    first = load_image(data, SIZE)
    first.pixels[:] = 0  # writable, and owned by the caller
    assert data == before
    assert load_image(data, SIZE).pixels.max() > 0


def test_unknown_resize_mode():
    with pytest.raises(ValueError, match="resize must be one of"):
        load_image(encode(gradient(), "PNG"), SIZE, resize="stretch")


def test_load_images_equals_load_image_for_every_target():
    """One decode for several targets gives each target exactly what load_image gives it,
    including a JPEG whose targets ask for different draft scales."""
    from transforms.images import Target, load_images

    photo = encode(gradient(900, 640, seed=3), "JPEG", quality=90)
    targets = [
        Target((224, 224), "crop", "bicubic"),
        Target((32, 32), "squash", "bilinear"),
        Target((160, 160), "squash", "bilinear"),
        Target((224, 224), "crop", "bicubic"),
    ]
    together = load_images(photo, targets)
    for target, image in zip(targets, together, strict=True):
        alone = load_image(
            photo, target.size, resize=target.resize, interpolation=target.interpolation
        )
        np.testing.assert_array_equal(image.pixels, alone.pixels)
        assert (image.width, image.height) == (alone.width, alone.height) == (900, 640)


@pytest.mark.parametrize("width,height", [(500, 239), (464, 500), (500, 450), (499, 500)])
def test_crop_of_sizes_whose_scale_rounds_up(width, height):
    """Sizes of real ants/bees photos where ``min(w / 224, h / 224) * 224`` rounds past the
    short side in floating point: the crop box must still lie inside the image (Pillow refuses
    a negative offset)."""
    image = load_image(encode(gradient(width, height), "JPEG"), (224, 224), resize="crop")
    assert image.pixels.shape == (224, 224, 3)


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A generated photo-like image: smooth shapes and shading plus fine texture and edges
    (what JPEG DCT scaling approximates: the fine detail is what a draft decode drops)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 6)]
        smooth = 0.5 + 0.35 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        channels.append(smooth)
    pixels = np.stack(channels, axis=-1)
    for _ in range(6):  # hard-edged discs
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 0.75), rng.uniform(0.03, 0.15)
        pixels[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    pixels += rng.normal(0, 0.04, pixels.shape)  # texture, sensor noise
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8), "RGB")


def _with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=90, exif=exif.tobytes())


@pytest.mark.parametrize("size, resize", [((160, 160), "squash"), ((224, 224), "crop")])
def test_fast_jpeg_draft_stays_within_tolerance_of_a_full_decode(size, resize):
    """The faster decode (JPEG DCT scaling to ``DRAFT_MARGIN`` times the target size) against
    decoding every pixel, on generated photos of several sizes, some EXIF-rotated: the pixels
    stay within the tolerance at which the bench's quality guard (vector cosine >= 0.999 to a
    full decode) holds."""
    from transforms.images import DRAFT_MARGIN

    diffs, worst = [], 0.0
    for seed, (w, h, orientation) in enumerate(
        [(1200, 900, 1), (900, 1200, 6), (2000, 1500, 1), (1500, 1000, 8), (640, 480, 3)]
    ):
        data = _with_orientation(photo(w, h, seed), orientation)
        fast = load_image(data, size, resize=resize, draft_margin=DRAFT_MARGIN)
        full = load_image(data, size, resize=resize, draft_margin=0)
        assert (fast.width, fast.height) == (full.width, full.height)
        diff = np.abs(fast.pixels.astype(int) - full.pixels.astype(int))
        diffs.append(diff.mean())
        worst = max(worst, float(np.percentile(diff, 99)))
    # Measured at DRAFT_MARGIN 2: means 0.0-0.35 and 99th percentiles <= 2 grey levels. Drafting
    # down to the target size (margin 1: means up to 1.1, 99th percentiles up to 6), which failed
    # the bench's vector guard on real photos, fails here too.
    assert np.mean(diffs) < 0.6, diffs
    assert worst <= 3, worst
