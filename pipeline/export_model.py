"""Export one Keras model: raw pixels -> preprocessing -> frozen backbone -> trained head.

    python -m pipeline.export_model --head HEAD_DIR --model-dir MODEL_DIR

Saves ``MODEL_DIR/model.keras`` (load it after ``import transforms.keras_layers``, which registers
the preprocessing layer) and ``MODEL_DIR/classes.json``, then checks on a few images of the feature
table that the exported model's probabilities equal backbone -> features -> head.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline import runners
from pipeline.config import model_spec_from_metadata
from pipeline.train_head import HEAD_FILE, REPORT_FILE
from transforms import model_io, storage, table
from transforms.images import load_image

MODEL_FILE = "model.keras"
CLASSES_FILE = "classes.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.export_model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--head", required=True, help="a train_head --model-dir")
    parser.add_argument(
        "--model-dir", required=True, help="where model.keras goes (local or gs://)"
    )
    parser.add_argument(
        "--check-images", type=int, default=8, help="images used for the equality check"
    )
    return parser


def load_exported(model_dir: str):
    """Loads an exported model and its class names."""
    model = model_io.load_keras(storage.join(model_dir, MODEL_FILE))
    return model, model_io.read_json(storage.join(model_dir, CLASSES_FILE))


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:

    from transforms.backbones import build_classifier
    from transforms.embed import Embedder

    args = build_parser().parse_args(argv)
    report = model_io.read_json(storage.join(args.head, REPORT_FILE))
    meta = report["feature_table_metadata"]
    spec = model_spec_from_metadata(meta)
    weights = (
        None
        if spec.weights in ("imagenet", "none")
        else storage.local_copy(spec.weights, tempfile.gettempdir())
    )
    head = model_io.load_keras(storage.join(args.head, HEAD_FILE))
    model = build_classifier(spec, head, weights_path=weights)
    model_io.save_keras(model, storage.join(args.model_dir, MODEL_FILE))
    model_io.write_json(storage.join(args.model_dir, CLASSES_FILE), report["classes"])

    # The check: the saved-and-reloaded model against the two-step path on real images.
    uris = table.read_table(report["feature_tables"][0], columns=["uri"]).column("uri").to_pylist()
    uris = uris[: args.check_images]
    pixels = np.stack(
        [
            load_image(storage.read_bytes(u), spec.size, resize=meta.get("resize", "squash")).pixels
            for u in uris
        ]
    )
    exported, _ = load_exported(args.model_dir)
    one_step = exported.predict(pixels.astype(np.float32), verbose=0)
    two_step = head.predict(Embedder(spec, weights)(pixels), verbose=0)
    max_diff = float(np.abs(one_step - two_step).max())
    agree = float((one_step.argmax(1) == two_step.argmax(1)).mean())
    if max_diff > 1e-4:
        raise RuntimeError(f"exported model disagrees with backbone -> head: max |diff| {max_diff}")
    return {
        "model": storage.join(args.model_dir, MODEL_FILE),
        "checked_images": len(uris),
        "max_abs_difference": max_diff,
        "argmax_agreement": agree,
    }


def main(argv: Sequence[str] | None = None) -> None:
    runners.configure_logging()
    result = run(argv)
    print(
        f"exported {result['model']}; on {result['checked_images']} images its probabilities equal "
        f"backbone -> head (max |diff| {result['max_abs_difference']:.2e}, "
        f"argmax agreement {result['argmax_agreement']:.0%})"
    )


if __name__ == "__main__":
    main()
