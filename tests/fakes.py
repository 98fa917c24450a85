"""A fake backbone for fast graph tests (the vector is the image's per-channel mean / 255), a
helper that runs a table job on it exactly as the jobs do (lease, plan, pipeline), a folder of
one bad file per failure, and a real job stopped or killed mid-run."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from conftest import encode
from PIL import Image

from transforms.embed.decode import DEFAULT_READ_TIMEOUT_S
from transforms.embed.handler import FeatureModelHandler
from transforms.images import DEFAULT_MAX_PIXELS


class MeanColorHandler(FeatureModelHandler):
    """3-d vectors computed without TensorFlow; optionally fails on images whose mean is dark."""

    def __init__(
        self,
        *,
        size: int = 8,
        batch_size: int = 4,
        fail_below: float | None = None,
        resize: str = "squash",
    ):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._size = size
        self._fail_below = fail_below
        self._resize = resize

    @property
    def input_size(self):
        return (self._size, self._size)

    @property
    def resize(self) -> str:
        return self._resize

    @property
    def feature_dim(self) -> int:
        return 3

    def table_metadata(self):
        return {
            "backbone": "mean_color",
            "weights_fingerprint": "none",
            "feature_dim": "3",
            "resize": self._resize,
        }

    def load_model(self):
        return lambda batch: np.asarray(batch, np.float32).mean(axis=(1, 2)) / 255.0

    def run_inference(self, batch, model, inference_args=None):
        vectors = model(np.stack(batch))
        if self._fail_below is not None and (vectors.mean(axis=1) < self._fail_below).any():
            raise RuntimeError("fake model rejects dark images")
        return list(vectors)


def mean_color(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32).mean(axis=(0, 1)) / 255.0


def run_table(
    sources,
    output,
    *,
    handler: FeatureModelHandler | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    run_id: str | None = None,
    beam_args=(),
    **table_run,
) -> dict:
    """Runs ``ExtractFeatures`` through ``pipeline.launch`` (lease, plan, pipeline) on the fake
    backbone; ``table_run`` takes ``TableRun``'s fields (mode, chunk_size, prune, ...)."""
    from conftest import local_pipeline

    from pipeline.launch import TableRun, launch
    from transforms.extract import ExtractFeatures
    from transforms.table_job import run_metadata

    handler = handler or MeanColorHandler()
    metadata = run_metadata(handler)
    sources = (sources,) if isinstance(sources, (str, os.PathLike)) else tuple(sources)

    def build(pipeline, planned, lease):
        return pipeline | ExtractFeatures(
            planned,
            model_handler=handler,
            metadata=metadata,
            max_pixels=max_pixels,
            read_timeout_s=read_timeout_s,
            lease=lease,
        )

    return launch(
        TableRun(inputs=tuple(str(s) for s in sources), output=str(output), **table_run),
        metadata=metadata,
        build=build,
        beam_args=list(beam_args),
        test_pipeline=None if beam_args else local_pipeline(),
        run_id=run_id,
    )


def add_bad_files(root):
    """One of each failure: not an image, empty, truncated, too large, and a dangling manifest."""
    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.jpg").write_bytes(b"plain text, wrongly named")
    (bad / "empty.png").write_bytes(b"")
    rng = np.random.default_rng(1)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (bad / "truncated.jpg").write_bytes(encode(noisy, "JPEG")[:1500])
    (bad / "huge.png").write_bytes(encode(Image.new("L", (3000, 3000)), "PNG"))
    return {
        "notes.jpg": "decode",
        "empty.png": "decode",
        "truncated.jpg": "decode",
        "huge.png": "limits",
    }


def run_extract(sources, output, **kwargs):
    return run_table(sources, output, **kwargs)


#: A real backbone, small and fast enough to run 120 images in a few seconds.
SMALL_REAL = ["--backbone", "resnet50", "--weights", "none", "--image-size", "128"]


def interrupt_real_job(tmp_path, *, signum: int, shards: int = 1) -> tuple[list[str], Any, str]:
    """Starts a real ``python -m pipeline.extract`` over 120 images in chunks of 8 into
    ``tmp_path / "t"``, sends it ``signum`` once ``shards`` shards are committed (mid-run), and
    waits for it to end; returns its flags, the process and its stderr."""
    import signal as signals
    import subprocess
    import sys
    import time

    from conftest import write_image_tree

    from transforms import table

    images = tmp_path / "images"
    write_image_tree(images, per_class=30, size=(64, 48))  # 120 images
    out = tmp_path / "t"
    argv = ["--input", str(images), "--output", str(out), *SMALL_REAL, "--chunk-size", "8"]
    job = subprocess.Popen(
        [sys.executable, "-m", "pipeline.extract", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while len(table.shard_files(str(out))) < shards:  # planned, and chunks committed
            assert job.poll() is None, "the job ended before it could be stopped"
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.02)
        job.send_signal(signum)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.send_signal(signals.SIGKILL)
        job.wait()
    assert not (out / table.SUMMARY_FILE).exists(), "the job finished before it was stopped"
    return argv, job, err
