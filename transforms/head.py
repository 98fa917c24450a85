"""Training a new classifier head on a feature table: reading, checks, split, model, report.

No Beam here: a head trains on vectors that fit in memory. Tables are read with pyarrow, only the
columns needed, and refused when their metadata says they came from different backbones, weights,
sizes, poolings, preprocessing, resize or precision (``transforms.recipe``: vectors made by two
recipes are not comparable).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from transforms import table
from transforms.recipe import COMPATIBILITY_KEYS, first_difference

HEADS = ("logistic", "mlp")


@dataclass(frozen=True)
class FeatureSet:
    """Vectors with their labels, read from one or more tables."""

    x: np.ndarray  # (n, D) float32
    labels: np.ndarray  # (n,) str
    uris: np.ndarray
    metadata: dict[str, str]

    @property
    def fingerprint(self) -> str:
        """Identifies what produced the vectors (not which images)."""
        key = json.dumps({k: self.metadata.get(k, "") for k in COMPATIBILITY_KEYS}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def check_compatible(first: dict[str, str], other: dict[str, str], where: str) -> None:
    """Raises ValueError naming the first metadata key on which two tables differ."""
    key = first_difference(first, other)
    if key is not None:
        raise ValueError(
            f"{where}: incompatible feature tables: {key} is {other.get(key)!r} here but "
            f"{first.get(key)!r} in the first table; re-extract with the same backbone settings"
        )


def read_features(
    table_dirs: Sequence[str], *, metadata: dict[str, str] | None = None
) -> FeatureSet:
    """Reads labelled vectors from tables, checking they are mutually compatible.

    Args:
        table_dirs: one or more table folders (local or ``gs://``).
        metadata: when given, the tables must also be compatible with it (e.g. train vs val).

    Raises:
        ValueError: incompatible tables, no labels, or fewer than two classes.
    """
    xs, labels, uris = [], [], []
    reference = metadata
    for table_dir in table_dirs:
        files = table.shard_files(table_dir)
        if not files:
            raise ValueError(f"{table_dir}: no features-*.parquet shards")
        for path in files:
            fs, inner = table.storage.filesystem(path)
            shard = pq.read_table(inner, filesystem=fs, columns=["uri", "label", "feature"])
            meta = table.table_metadata(shard.schema)
            if reference is None:
                reference = meta
            check_compatible(reference, meta, path)
            xs.append(table.features_matrix(shard))
            labels.extend(shard.column("label").to_pylist())
            uris.extend(shard.column("uri").to_pylist())
    labelled = np.array([label is not None for label in labels], dtype=bool)
    if not labelled.any():
        raise ValueError(
            f"{', '.join(table_dirs)}: no row has a label; put images in class folders "
            "(train/ants/x.jpg) or give a manifest with a label column"
        )
    x = np.concatenate(xs)[labelled]
    y = np.array([label for label in labels if label is not None])
    return FeatureSet(x, y, np.array(uris)[labelled], dict(reference or {}))


def stratified_split(
    labels: np.ndarray, fraction: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified (train, validation) split; each class keeps at least one of each
    when it has two or more examples."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(idx) * fraction))
        n_val = min(max(n_val, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=int)), np.sort(np.array(val, dtype=int))


def build_head(
    x_train: np.ndarray, n_classes: int, *, kind: str, hidden: int = 256, dropout: float = 0.3
):
    """A Keras head: feature normalisation (adapted to ``x_train``) then softmax Dense,
    optionally after one hidden ReLU layer with dropout."""
    import keras

    if kind not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {kind!r}")
    norm = keras.layers.Normalization(name="feature_norm")
    norm.adapt(x_train)
    layers = [keras.Input((x_train.shape[1],), name="feature"), norm]
    if kind == "mlp":
        layers += [keras.layers.Dense(hidden, activation="relu"), keras.layers.Dropout(dropout)]
    layers.append(keras.layers.Dense(n_classes, activation="softmax", name="probabilities"))
    return keras.Sequential(layers, name=f"{kind}_head")


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/support and the confusion matrix (rows = truth)."""
    n = len(classes)
    confusion = np.zeros((n, n), dtype=int)
    for t, p in zip(y_true, y_pred, strict=True):
        confusion[t, p] += 1
    per_class = {}
    for i, name in enumerate(classes):
        predicted, actual = confusion[:, i].sum(), confusion[i, :].sum()
        per_class[name] = {
            "precision": float(confusion[i, i] / predicted) if predicted else 0.0,
            "recall": float(confusion[i, i] / actual) if actual else 0.0,
            "support": int(actual),
        }
    return {
        "accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components of ``x`` (via SVD of the centred data)."""
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T
