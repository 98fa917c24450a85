"""Training a new classifier head on a feature table: reading, checks, split, model, report.

No Beam here: a head trains on vectors that fit in memory. Tables are read with pyarrow, only the
columns needed. Tables made with one recipe are stacked (more rows); tables made with different
recipes of the *same images* (e.g. the per-backbone tables of one multi-backbone run) are joined
on ``image_id`` and their vectors concatenated: late fusion. A validation set must hold the same
recipes in the same order (``transforms.models.recipe``: vectors made by two recipes are not comparable).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from transforms import table
from transforms.models.recipe import COMPATIBILITY_KEYS, first_difference, table_fingerprint
from transforms.splits import stratified_split  # noqa: F401  (re-exported: the one split rule)

HEADS = ("logistic", "mlp")

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSet:
    """Vectors with their labels, read from one or more tables.

    Attributes:
        x: ``(n, D)`` float32; with several recipes, their vectors side by side, in order.
        parts: each recipe's table metadata, in column order (one entry without fusion).
        widths: each part's vector width.
    """

    x: np.ndarray  # (n, D) float32
    labels: np.ndarray  # (n,) str
    uris: np.ndarray
    splits: np.ndarray  # (n,) the split column (None where absent)
    parts: tuple[dict[str, str], ...]
    widths: tuple[int, ...]

    @property
    def metadata(self) -> dict[str, str]:
        """The first part's metadata (the only one without fusion)."""
        return self.parts[0]

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1

    @property
    def fingerprint(self) -> str:
        """Identifies what produced the vectors (not which images)."""
        if len(self.parts) == 1:
            return table_fingerprint(self.parts[0])
        keys = [{k: meta.get(k, "") for k in COMPATIBILITY_KEYS} for meta in self.parts]
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def part_names(parts: Sequence[dict[str, str]]) -> list[str]:
    """Short, distinct names for recipes (``dinov2_small/cls``; ``resnet50/avg[resize=crop]``
    where two share backbone and pooling)."""
    names = []
    for i, meta in enumerate(parts):
        output = meta.get("pooling") or meta.get("layer")
        name = f"{meta.get('backbone')}/{output}" if output else str(meta.get("backbone"))
        twin = next((j for j in range(i) if names[j].split("[")[0] == name), None)
        if twin is not None:
            key = first_difference(parts[twin], meta)
            name += f"[{key}={meta.get(key)}]"
        names.append(name)
    return names


def check_compatible(first: dict[str, str], other: dict[str, str], where: str) -> None:
    """Raises ValueError naming the first metadata key on which two tables differ."""
    key = first_difference(first, other)
    if key is not None:
        raise ValueError(
            f"{where}: incompatible feature tables: {key} is {other.get(key)!r} here but "
            f"{first.get(key)!r} in the first table; re-extract with the same backbone settings"
        )


@dataclass
class _Part:
    """The rows of one recipe, from one or more tables."""

    metadata: dict[str, str]
    ids: list[str]
    uris: list[str]
    labels: list[str | None]
    splits: list[str | None]
    xs: list[np.ndarray]
    dirs: list[str]


def read_features(table_dirs: Sequence[str], *, like: FeatureSet | None = None) -> FeatureSet:
    """Reads labelled vectors from tables: tables of one recipe are stacked; tables of several
    recipes are joined on ``image_id`` (images missing from any of them are left out, and
    counted in the log) and their vectors concatenated in the order the recipes first appear.

    Args:
        table_dirs: one or more table folders (local or ``gs://``).
        like: when given (e.g. reading validation tables for a training set), the tables must
            hold the same recipes in the same order.

    Raises:
        ValueError: a folder without shards, tables whose labels disagree, no labels, or
            recipes that differ from ``like``'s.
    """
    parts: list[_Part] = []
    for table_dir in table_dirs:
        files = table.shard_files(table_dir)
        if not files:
            raise ValueError(f"{table_dir}: no features-*.parquet shards")
        rows_here = 0
        for path in files:
            fs, inner = table.storage.filesystem(path)
            with table.reading(path):
                names = pq.read_schema(inner, filesystem=fs).names
                columns = ["image_id", "uri", "label", "feature"]
                columns += ["split"] if "split" in names else []
                shard = pq.read_table(inner, filesystem=fs, columns=columns)
            meta = table.table_metadata(shard.schema)
            part = next((p for p in parts if first_difference(p.metadata, meta) is None), None)
            if part is None:
                part = _Part(meta, [], [], [], [], [], [])
                parts.append(part)
            if table_dir not in part.dirs:
                part.dirs.append(table_dir)
            part.ids.extend(shard.column("image_id").to_pylist())
            part.uris.extend(shard.column("uri").to_pylist())
            part.labels.extend(shard.column("label").to_pylist())
            part.splits.extend(
                shard.column("split").to_pylist() if "split" in columns else [None] * len(shard)
            )
            part.xs.append(table.features_matrix(shard))
            rows_here += shard.num_rows
        if not rows_here:
            raise ValueError(
                f"{table_dir}: the feature table has no rows (every image failed or the input "
                "was empty; see its _errors/ and _SUMMARY.json); extract labelled images first"
            )
    if like is not None:
        if len(parts) != len(like.parts):
            raise ValueError(
                f"{', '.join(table_dirs)}: {len(parts)} recipe(s) here but {len(like.parts)} in "
                "the training tables; give the validation tables of the same backbones, in order"
            )
        for part, reference in zip(parts, like.parts, strict=True):
            check_compatible(reference, part.metadata, part.dirs[0])
    ids, uris, labels, splits, x = _join(parts) if len(parts) > 1 else _stack(parts[0])
    labelled = np.array([label is not None for label in labels], dtype=bool)
    if not labelled.any():
        raise ValueError(
            f"{', '.join(table_dirs)}: no row has a label; put images in class folders "
            "(train/ants/x.jpg) or give a manifest with a label column"
        )
    return FeatureSet(
        x[labelled],
        np.array([label for label in labels if label is not None]),
        np.array(uris)[labelled],
        np.array(splits, dtype=object)[labelled],
        tuple(p.metadata for p in parts),
        tuple(int(p.xs[0].shape[1]) for p in parts),
    )


def _stack(part: _Part):
    return part.ids, part.uris, part.labels, part.splits, np.concatenate(part.xs)


def _join(parts: list[_Part]):
    """Inner join of several recipes' rows on image_id; vectors side by side."""
    first = parts[0]
    common = set(first.ids)
    for part in parts[1:]:
        common &= set(part.ids)
    if not common:
        names = ", ".join(part_names([p.metadata for p in parts]))
        raise ValueError(
            f"the tables of {names} share no image_id: late fusion needs the same images"
        )
    order = [i for i, image_id in enumerate(first.ids) if image_id in common]
    ids = [first.ids[i] for i in order]
    blocks = []
    for part in parts:
        position = {image_id: i for i, image_id in enumerate(part.ids)}
        rows = np.array([position[image_id] for image_id in ids])
        blocks.append(np.concatenate(part.xs)[rows])
        labels = [part.labels[i] for i in rows]
        if labels != [first.labels[i] for i in order]:
            raise ValueError(
                f"{part.dirs[0]}: labels differ from {first.dirs[0]} for the same images"
            )
    left_out = max(len(set(p.ids)) for p in parts) - len(ids)
    if left_out:
        _LOG.warning("late fusion: %d image(s) are missing from some tables and left out", left_out)
    return (
        ids,
        [first.uris[i] for i in order],
        [first.labels[i] for i in order],
        [first.splits[i] for i in order],
        np.concatenate(blocks, axis=1),
    )


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
