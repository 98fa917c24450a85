"""transforms/classify.py: a probability vector becomes a top-k prediction row."""

from __future__ import annotations

import numpy as np
import pytest

from transforms.classify import TopK


def test_top_k_rows():
    row = {"image_id": "i", "uri": "u", "label": None, "split": None, "width": 1, "height": 1}
    out = TopK(2, ["a", "b", "c"])({**row, "feature": np.array([0.2, 0.7, 0.1], np.float32)})
    assert (out["prediction"], out["top_classes"]) == ("b", ["b", "a"])
    assert out["top_probabilities"] == pytest.approx([0.7, 0.2])
    assert "feature" not in out
