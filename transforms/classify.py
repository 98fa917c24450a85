"""Classification output: top-k classes and probabilities per image, as table rows
(``predictions-*.parquet`` shards, ``transforms.table.PREDICTIONS``), and a preview of them."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from transforms import table
from transforms.table import IMAGE_FIELDS, SOURCE_FIELDS

_LOG = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema(
    [
        *IMAGE_FIELDS,
        *SOURCE_FIELDS,
        pa.field("prediction", pa.string(), nullable=False),
        pa.field("probability", pa.float32(), nullable=False),
        pa.field("top_classes", pa.list_(pa.string()), nullable=False),
        pa.field("top_probabilities", pa.list_(pa.float32()), nullable=False),
    ]
)


class TopK:
    """Maps a row whose ``feature`` holds class probabilities to a prediction row."""

    def __init__(self, k: int, class_names: list[str]):
        if k < 1:
            raise ValueError(f"top-k must be >= 1, got {k}")
        self._k = min(k, len(class_names))
        self._names = list(class_names)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        probabilities = np.asarray(row["feature"], dtype=np.float32)
        if probabilities.shape != (len(self._names),):
            raise ValueError(
                f"expected {len(self._names)} probabilities, got {probabilities.shape}"
            )
        order = np.argsort(-probabilities, kind="stable")[: self._k]
        out = {k: v for k, v in row.items() if k != "feature"}
        out["prediction"] = self._names[order[0]]
        out["probability"] = float(probabilities[order[0]])
        out["top_classes"] = [self._names[i] for i in order]
        out["top_probabilities"] = [float(probabilities[i]) for i in order]
        return out


#: Predictions a preview shows.
PREVIEW_ROWS = 8


def preview(table_dir: str, *, rows: int = PREVIEW_ROWS) -> dict[str, Any]:
    """What a person sees first of a prediction table: its first ``rows`` predictions by URI
    (``uri``, ``prediction``, ``probability``) and the count per predicted label, most first."""
    import pyarrow.compute as pc

    try:
        predictions = table.read_table(table_dir, columns=["uri", "prediction", "probability"])
    except FileNotFoundError:
        return {"first": [], "counts": {}}
    first = predictions.take(pc.sort_indices(predictions, [("uri", "ascending")])[:rows])
    counts: dict[str, int] = {}
    for label in predictions.column("prediction").to_pylist():
        counts[label] = counts.get(label, 0) + 1
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return {"first": first.to_pylist(), "counts": ordered}


def imagenet_class_names() -> list[str]:
    """Keras' own ImageNet class index (downloaded once into Keras' cache).

    Offline and not cached, the names fall back to ``imagenet:<index>`` with a warning: the
    probabilities are still right, only the names are missing.
    """
    try:
        import keras
        from keras.src.applications import imagenet_utils

        path = keras.utils.get_file(
            "imagenet_class_index.json",
            imagenet_utils.CLASS_INDEX_PATH,
            cache_subdir="models",
            file_hash="c2c37ea517e94d9795004a39431a14cb",
        )
        with open(path) as f:
            index = json.load(f)
        return [index[str(i)][1] for i in range(1000)]
    except Exception as exc:  # no internet: Keras cannot fetch the class index
        _LOG.warning("ImageNet class names unavailable (%s); using imagenet:<index>", exc)
        return [f"imagenet:{i}" for i in range(1000)]
