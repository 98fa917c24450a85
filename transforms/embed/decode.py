"""Reading an image once and decoding it for every backbone of a run (their sizes, resize modes
and filters), or turning the failure into the image's error row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from transforms import storage
from transforms.image_rows import ImageRef
from transforms.images import ImageError, Target, load_images
from transforms.table import error_row

#: Seconds one image's read may take (``--read-timeout``) before it becomes an error row.
DEFAULT_READ_TIMEOUT_S = 60.0


class Decoded(NamedTuple):
    """The key that travels with an image's pixels through inference."""

    ref: ImageRef
    width: int
    height: int


def read_and_decode(
    ref: ImageRef,
    targets: Sequence[Target],
    max_pixels: int,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> list[tuple[Decoded, np.ndarray]] | dict[str, Any]:
    """The file read once (within ``read_timeout_s``) and decoded for every target:
    ``(Decoded, uint8 pixels)`` per target, or the image's error row."""
    try:
        data = storage.read_bytes(ref.uri, timeout=read_timeout_s)
    except Exception as exc:  # missing, not a file, timed out, network: all become error rows
        return error_row(ref, "read", f"{type(exc).__name__}: {exc}")
    try:
        images = load_images(data, targets, max_pixels=max_pixels)
    except ImageError as exc:
        return error_row(ref, exc.stage, exc.reason)
    return [(Decoded(ref, image.width, image.height), image.pixels) for image in images]
