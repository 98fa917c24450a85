"""transforms/head.py: the stratified split, the classification report, compatible tables."""

from __future__ import annotations

import numpy as np
import pytest

from transforms.head import check_compatible, classification_report, stratified_split


def test_stratified_split_keeps_class_proportions():
    labels = np.array(["a"] * 10 + ["b"] * 5)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([train, val])) == list(range(15))
    assert sorted(labels[val]) == ["a", "a", "b"]
    assert np.array_equal(stratified_split(labels, 0.2, seed=0)[1], val)


def test_classification_report_values():
    report = classification_report(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["x", "y"])
    assert report["accuracy"] == 0.75
    assert report["confusion_matrix"] == [[1, 1], [0, 2]]
    assert report["per_class"]["y"] == {"precision": 2 / 3, "recall": 1.0, "support": 2}


def test_incompatible_tables_are_refused():
    with pytest.raises(ValueError, match="weights_fingerprint is 'b'"):
        check_compatible({"weights_fingerprint": "a"}, {"weights_fingerprint": "b"}, "t")
