"""Pure image functions: encoded bytes in, ``numpy`` pixels out.

Nothing here imports Beam or TensorFlow, so every path is tested alone. The one public entry point is
:func:`load_image`; it decodes with Pillow, applies the EXIF orientation, keeps the first frame of
animated files, converts every mode to 8-bit RGB and resizes to the backbone's input size. The
backbone's own ``preprocess_input`` is applied later, per batch (see ``transforms.backbones``).

Failures raise :class:`ImageError` with a ``stage`` and a one-line ``reason``: the pipeline turns
them into error rows instead of crashing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Default guard against decompression bombs: 100 megapixels (a 10,000 x 10,000 photo).
DEFAULT_MAX_PIXELS = 100_000_000

#: How images are fitted to the backbone's square input.
RESIZE_MODES = ("squash", "crop")
DEFAULT_RESIZE = "squash"

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

# JPEG draft mode (DCT scaling) is only asked to shrink to twice the target size; the final
# antialiased resize does the rest, so the result stays within a grey level or two of a full decode
# while decoding large photos several times faster.
_DRAFT_MARGIN = 2

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

    Returns:
        A :class:`LoadedImage`; ``width``/``height`` are the original size as displayed (after the
        EXIF orientation).

    Raises:
        ImageError: empty input, not an image, truncated or corrupt data, or too many pixels.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {interpolation!r}"
        )
    if not data:
        raise ImageError("decode", "empty file (0 bytes)")
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

    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                "limits", f"{width}x{height} = {width * height} pixels exceeds limit {max_pixels}"
            )
        try:
            rgb = _decode_rgb(image, size)
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError("decode", f"corrupt image data: {type(exc).__name__}: {exc}") from None
        if _swaps_axes(image):
            width, height = height, width
    pixels = _fit(rgb, size, resize, INTERPOLATIONS[interpolation])
    return LoadedImage(pixels=pixels, width=width, height=height)


def _swaps_axes(image: Image.Image) -> bool:
    """True when the EXIF orientation rotates the picture by 90 or 270 degrees."""
    return image.getexif().get(ImageOps.ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)


def _decode_rgb(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """First frame, JPEG draft scaling, full decode, EXIF orientation, then RGB."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    if image.format == "JPEG":
        target_h, target_w = size
        box = (target_w * _DRAFT_MARGIN, target_h * _DRAFT_MARGIN)
        if _swaps_axes(image):
            box = box[::-1]
        image.draft("RGB", box)
    image.load()
    oriented = ImageOps.exif_transpose(image) or image
    return _to_rgb(oriented)


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
    if resize == "crop":
        w, h = image.size
        scale = min(w / target_w, h / target_h)
        crop_w, crop_h = target_w * scale, target_h * scale
        left, top = (w - crop_w) / 2, (h - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
    if image.size != (target_w, target_h) or box is not None:
        image = image.resize((target_w, target_h), resample, box=box)
    return np.asarray(image, dtype=np.uint8).copy()
