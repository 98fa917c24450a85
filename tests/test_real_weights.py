"""The proof: real pretrained weights, real photos, a linear head that separates ants from bees.

Extracts ``train`` and ``val`` of ../shared/data/hymenoptera through the whole pipeline with the
offline real MobileNetV2 (``--weights sample``), fits a logistic regression on train and scores
val. The same pipeline with random weights must score clearly lower, proving the weights are used.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.extract import run
from transforms import table

pytestmark = pytest.mark.slow


def extract(split_dir, out, weights) -> tuple[np.ndarray, np.ndarray, dict]:
    summary = run(
        ["--input", str(split_dir), "--output", str(out), "--backbone", "mobilenet_v2"]
        + ["--weights", weights, "--image-size", "160", "--batch-size", "32"]
    )
    features = table.read_table(str(out))
    return table.features_matrix(features), np.array(features.column("label").to_pylist()), summary


def val_accuracy(root, tmp_path, weights) -> tuple[float, dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train, train = extract(root / "train", tmp_path / f"train-{weights}", weights)
    x_val, y_val, val = extract(root / "val", tmp_path / f"val-{weights}", weights)
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    head.fit(x_train, y_train)
    return float((head.predict(x_val) == y_val).mean()), {"train": train, "val": val}


def test_real_weights_separate_ants_from_bees(hymenoptera, sample_weights, tmp_path):
    real, summaries = val_accuracy(hymenoptera, tmp_path, "sample")
    train, val = summaries["train"], summaries["val"]
    # The set is slightly dirty: one placeholder GIF is still an image and becomes a row.
    assert train["inputs"] == 245 and val["inputs"] == 153
    assert train["inputs"] == train["rows"] + train["errors"]
    assert val["rows"] + val["errors"] == val["inputs"]
    random, _ = val_accuracy(hymenoptera, tmp_path, "none")
    print(f"\nval accuracy: real weights {real:.3f}, random weights {random:.3f}")
    assert real >= 0.90
    assert random <= real - 0.15
