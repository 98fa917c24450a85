"""A fake backbone for fast graph tests: the vector is the image's per-channel mean / 255."""

from __future__ import annotations

import numpy as np

from transforms.embed import FeatureModelHandler


class MeanColorHandler(FeatureModelHandler):
    """3-d vectors computed without TensorFlow; optionally fails on images whose mean is dark."""

    def __init__(self, *, size: int = 8, batch_size: int = 4, fail_below: float | None = None):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._size = size
        self._fail_below = fail_below

    @property
    def input_size(self):
        return (self._size, self._size)

    @property
    def feature_dim(self) -> int:
        return 3

    def table_metadata(self):
        return {"backbone": "mean_color", "weights_fingerprint": "none", "feature_dim": "3"}

    def load_model(self):
        return lambda batch: np.asarray(batch, np.float32).mean(axis=(1, 2)) / 255.0

    def run_inference(self, batch, model, inference_args=None):
        vectors = model(np.stack(batch))
        if self._fail_below is not None and (vectors.mean(axis=1) < self._fail_below).any():
            raise RuntimeError("fake model rejects dark images")
        return list(vectors)


def mean_color(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32).mean(axis=(0, 1)) / 255.0
