"""Pure image functions: encoded bytes in, ``numpy`` pixels out.

Nothing here imports Beam or TensorFlow, so every path is tested alone. The one public entry point is
:func:`load_image`; it decodes with Pillow, applies the EXIF orientation, keeps the first frame of
animated files, converts every mode to 8-bit RGB and resizes to the backbone's input size. The
backbone's own ``preprocess_input`` is applied later, per batch (see ``transforms.models.preprocessing``).

Failures raise :class:`ImageError` with a ``stage`` and a one-line ``reason``: the pipeline turns
them into error rows instead of crashing.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Default guard against decompression bombs: 100 megapixels (a 10,000 x 10,000 photo).
DEFAULT_MAX_PIXELS = 100_000_000

#: How images are fitted to the backbone's square input.
SQUASH, CROP = "squash", "crop"
RESIZE_MODES = (SQUASH, CROP)
DEFAULT_RESIZE = SQUASH

#: Resize filters by the names KerasHub's image converters use. Pillow antialiases whenever it
#: shrinks, as the reference (PIL-based) processors of these models do.
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "lanczos3": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}
DEFAULT_INTERPOLATION = "bilinear"

#: JPEG draft mode (DCT scaling) decodes at 1/2, 1/4 or 1/8 scale, never below this many times
#: the target size; the antialiased resize does the rest. Decoding 12 MP photos for a 160 px
#: model this way ran at 47.7 images/s per core against 7.6 for a full decode. Drafting down to
#: the target size itself (1) decoded the ants/bees photos 1.4x faster, but failed the quality
#: guard (vector cosine to a full decode 0.994 mean, 0.978 1st percentile, against >= 0.999;
#: ``benchmarks``), so 2 stays.
DRAFT_MARGIN = 2

_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
    """An input that cannot become pixels.

    Attributes:
        stage: ``"decode"`` (not an image, truncated, ...) or ``"limits"`` (too large).
        reason: a short human-readable explanation.
    """

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """What one backbone needs from an image: its input ``(height, width)``, how the image is
    fitted to it (:data:`RESIZE_MODES`) and the resize filter (:data:`INTERPOLATIONS`)."""

    size: tuple[int, int]
    resize: str = DEFAULT_RESIZE
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {self.interpolation!r}"
            )


@dataclass(frozen=True)
class LoadedImage:
    """Decoded, RGB, resized pixels plus the original (display-oriented) size."""

    pixels: np.ndarray  # uint8, shape (height, width, 3)
    width: int
    height: int


def load_image(
    data: bytes,
    size: tuple[int, int],
    *,
    resize: str = DEFAULT_RESIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    interpolation: str = DEFAULT_INTERPOLATION,
    draft_margin: float = DRAFT_MARGIN,
) -> LoadedImage:
    """Decodes encoded image bytes into a resized uint8 RGB array.

    Args:
        data: the file's bytes (JPEG, PNG, GIF, WebP, BMP, TIFF, ... anything Pillow reads).
        size: target ``(height, width)``.
        resize: ``"squash"`` stretches the whole image to ``size`` (Keras'
            ``image_dataset_from_directory`` default); ``"crop"`` takes the largest centred crop
            with the target's aspect ratio first.
        max_pixels: images with more pixels than this are refused before decoding.
        interpolation: the resize filter (:data:`INTERPOLATIONS`), the backbone's own.
        draft_margin: JPEGs are decoded at the smallest DCT scale that keeps at least this many
            times the target size (:data:`DRAFT_MARGIN`); ``0`` decodes every pixel.

    Returns:
        A :class:`LoadedImage`; ``width``/``height`` are the original size as displayed (after the
        EXIF orientation).

    Raises:
        ImageError: empty input, not an image, truncated or corrupt data, or too many pixels.
    """
    target = Target(tuple(size), resize, interpolation)
    return load_images(data, [target], max_pixels=max_pixels, draft_margin=draft_margin)[0]


def load_images(
    data: bytes,
    targets: Sequence[Target],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_margin: float = DRAFT_MARGIN,
) -> list[LoadedImage]:
    """:func:`load_image` for several targets at once (a multi-backbone run): the image is
    decoded once per distinct JPEG draft scale the targets ask for (once, for other formats)
    and fitted to each target, so every result equals :func:`load_image`'s for that target.

    Raises:
        ImageError: as :func:`load_image`.
    """
    if not data:
        raise ImageError("decode", "empty file (0 bytes)")
    results: dict[Target, LoadedImage] = {}
    decoded: dict[tuple, tuple[Image.Image, int, int]] = {}
    for target in targets:
        if target in results:
            continue
        image = _open(data, max_pixels)
        with image:
            width, height = image.size
            try:
                scale = _draft(
                    image, target.size, draft_margin
                )  # header only: nothing is decoded yet
                if scale not in decoded:
                    rgb = _decode_rgb(image)
                    if _swaps_axes(image):
                        width, height = height, width
                    decoded[scale] = (rgb, width, height)
                rgb, width, height = decoded[scale]
                pixels = _fit(rgb, target.size, target.resize, INTERPOLATIONS[target.interpolation])
            except ImageError:
                raise
            except Exception as exc:
                raise ImageError(
                    "decode", f"corrupt image data: {type(exc).__name__}: {exc}"
                ) from None
        results[target] = LoadedImage(pixels=pixels, width=width, height=height)
    return [results[target] for target in targets]


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Opens (reads the header of) an image as :func:`load_image` does, refusing decompression
    bombs and images over ``max_pixels``; nothing is decoded yet.

    Raises:
        ImageError: not an image, an unreadable header, or too many pixels.
    """
    return _open(data, max_pixels)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Opens (reads the header of) an image, refusing decompression bombs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("decode", "not an image Pillow can identify") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("limits", f"too many pixels ({exc})") from None
    except Exception as exc:  # Pillow raises many types on corrupt headers
        raise ImageError("decode", f"unreadable header: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            "limits", f"{width}x{height} = {width * height} pixels exceeds limit {max_pixels}"
        )
    return image


def _swaps_axes(image: Image.Image) -> bool:
    """True when the EXIF orientation rotates the picture by 90 or 270 degrees."""
    return image.getexif().get(ImageOps.ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)


def _draft(image: Image.Image, size: tuple[int, int], margin: float) -> tuple:
    """Asks a JPEG for DCT scaling to ``margin`` times the target size; returns the decoded size
    it will have (the key of what a decode produces), or ``()`` for formats without draft mode."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    if image.format != "JPEG" or margin <= 0:
        return ()
    target_h, target_w = size
    box = (round(target_w * margin), round(target_h * margin))
    if _swaps_axes(image):
        box = box[::-1]
    image.draft("RGB", box)
    return image.size


def _decode_rgb(image: Image.Image) -> Image.Image:
    """Full decode (after any draft request), EXIF orientation, then RGB."""
    image.load()
    if image.getexif().get(ImageOps.ExifTags.Base.Orientation, 1) != 1:
        # (exif_transpose copies the image even when there is nothing to turn.)
        image = ImageOps.exif_transpose(image) or image
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB; transparency is composited over white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's own convert() clips 16-bit values to 255 instead of scaling them.
        values = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        grey = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def _fit(image: Image.Image, size: tuple[int, int], resize: str, resample) -> np.ndarray:
    target_h, target_w = size
    box = None
    if resize == CROP:
        w, h = image.size
        scale = min(w / target_w, h / target_h)
        # min() keeps the crop inside the image when w / target_w * target_w rounds above w.
        crop_w, crop_h = min(target_w * scale, w), min(target_h * scale, h)
        left, top = (w - crop_w) / 2, (h - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
    if image.size != (target_w, target_h) or box is not None:
        image = image.resize((target_w, target_h), resample, box=box)
    return np.asarray(image, dtype=np.uint8).copy()
