"""The head and model folders, and saving/loading Keras models and JSON at local or ``gs://`` URIs.

A head folder (``train_head --model-dir``) holds ``head.keras`` and ``report.json``, whose
``feature_table_metadata`` is the recipe the head was trained on. A model folder
(``export_model`` / ``finetune --model-dir``) holds ``model.keras`` (raw pixels in), ``classes.json``
and ``recipe.json``: the same recipe, so every job that serves either rebuilds the exact recipe
(resize and precision included) that its vectors were made with.

``.keras`` files are read and written by ``transforms.models.saving`` (local or remote).
"""

from __future__ import annotations

import json
from typing import Any

from transforms import storage
from transforms.models.recipe import FeatureRecipe, first_difference
from transforms.models.saving import load_keras, save_keras

HEAD_FILE = "head.keras"
REPORT_FILE = "report.json"
#: The validation rows with the head's prediction (for the report page's misclassified images).
VALIDATION_FILE = "validation_predictions.parquet"
MODEL_FILE = "model.keras"
CLASSES_FILE = "classes.json"
RECIPE_FILE = "recipe.json"
FINETUNE_REPORT_FILE = "finetune_report.json"


def write_json(uri: str, value: Any) -> None:
    payload = json.dumps(value, indent=2).encode()
    storage.write_atomically(uri, lambda f: f.write(payload))


def read_json(uri: str) -> Any:
    return json.loads(storage.read_bytes(uri))


# --- head folders ---


def head_file(head_dir: str) -> str:
    return storage.join(head_dir, HEAD_FILE)


def read_head_report(head_dir: str) -> dict[str, Any]:
    """A head folder's report (classes, accuracy, the recipe it was trained on, ...).

    Raises:
        FileNotFoundError: not a head folder.
    """
    uri = storage.join(head_dir, REPORT_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{head_dir} is not a train_head --model-dir (no {REPORT_FILE})")
    return read_json(uri)


def head_recipe_mismatch(
    head_dir: str, report: dict[str, Any], metadata: dict[str, str], fingerprint: str
) -> str | None:
    """None when a head was trained on vectors of the table's recipe (``fingerprint``); else a
    sentence naming the first recipe setting that differs. The jobs that show a head beside a
    table (neighbours, report) warn with it rather than refuse: its figures remain the head's
    own, but they do not describe this table's vectors."""
    if report.get("feature_table_fingerprint") == fingerprint:
        return None
    trained = report.get("feature_table_metadata") or {}
    key = first_difference(trained, metadata) if trained else None
    detail = f" ({key} is {trained.get(key)!r} there but {metadata.get(key)!r} here)" if key else ""
    return (
        f"the head {head_dir} was trained on features of another recipe{detail}: its figures "
        "do not describe this table's vectors"
    )


def head_recipe(report: dict[str, Any]) -> FeatureRecipe:
    """The recipe of the features a head was trained on.

    Raises:
        ValueError: a late-fusion head (several recipes): serving it would need every backbone.
    """
    parts = report.get("feature_table_parts") or []
    if len(parts) > 1:
        names = ", ".join(
            f"{p.get('backbone')}/{p.get('pooling') or p.get('layer')}" for p in parts
        )
        raise ValueError(
            f"this head was trained on late-fused features of {len(parts)} recipes ({names}); "
            "classify, export_model and finetune serve single-recipe heads: train a head on one "
            "backbone's table to serve it"
        )
    return FeatureRecipe.from_metadata(report["feature_table_metadata"])


def save_head(head_dir: str, head, report: dict[str, Any]) -> None:
    storage.makedirs(head_dir)
    save_keras(head, head_file(head_dir))
    write_json(storage.join(head_dir, REPORT_FILE), report)


def write_validation_predictions(
    head_dir: str, *, uris, labels, predicted, probabilities, classes: list[str]
) -> None:
    """``VALIDATION_FILE``: one row per validation image: ``uri``, ``label``, ``predicted``,
    ``probability`` (of the prediction) and ``label_probability`` (of the true label)."""
    import numpy as np
    import pyarrow as pa

    from transforms import table

    probabilities = np.asarray(probabilities, dtype=np.float32)
    truth = np.array([classes.index(label) for label in labels])
    rows = np.arange(len(truth))
    table.write_parquet(
        storage.join(head_dir, VALIDATION_FILE),
        pa.table(
            {
                "uri": pa.array(list(uris), pa.string()),
                "label": pa.array(list(labels), pa.string()),
                "predicted": pa.array(list(predicted), pa.string()),
                "probability": pa.array(probabilities.max(axis=1), pa.float32()),
                "label_probability": pa.array(probabilities[rows, truth], pa.float32()),
            }
        ),
    )


def read_validation_predictions(head_dir: str):
    """The head's ``VALIDATION_FILE`` as an Arrow table, or None (heads trained before it)."""
    import pyarrow.parquet as pq

    uri = storage.join(head_dir, VALIDATION_FILE)
    if not storage.exists(uri):
        return None
    with storage.open_file(uri) as f:
        return pq.read_table(f)


# --- model folders ---


def save_model_dir(model_dir: str, model, classes: list[str], recipe_metadata: dict) -> None:
    """Writes an exported (or fine-tuned) model with its classes and recipe."""
    save_keras(model, storage.join(model_dir, MODEL_FILE))
    write_json(storage.join(model_dir, CLASSES_FILE), list(classes))
    write_json(storage.join(model_dir, RECIPE_FILE), dict(recipe_metadata))


def load_model_dir(model_dir: str) -> tuple[Any, list[str], FeatureRecipe]:
    """Loads an exported model, its class names and the recipe its inputs must be made with."""
    model = load_keras(storage.join(model_dir, MODEL_FILE))
    classes = read_json(storage.join(model_dir, CLASSES_FILE))
    # The model carries its own (possibly fine-tuned) weights: only the input side is needed.
    meta = read_json(storage.join(model_dir, RECIPE_FILE))
    recipe = FeatureRecipe.from_metadata(meta, verify_weights=False)
    return model, classes, recipe
