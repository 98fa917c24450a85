"""Export one Keras model: raw pixels -> preprocessing -> frozen backbone -> trained head.

    python -m pipeline.export_model --head HEAD_DIR --model-dir MODEL_DIR

Rebuilds the exact recipe the head was trained on (from its report), saves
``MODEL_DIR/model.keras`` (load it after ``import transforms.models.preprocessing``, which registers the
preprocessing layer), ``classes.json`` and ``recipe.json`` (how its input pixels must be made:
size and resize), then checks on a few images of the feature table that the exported model's
probabilities equal backbone -> features -> head. A ``MODEL_DIR`` that holds results is refused
unless ``--overwrite``, which replaces it only once the new model is saved and has passed the check.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline import cli
from transforms import model_io, storage, table
from transforms.images import load_image


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("pipeline.export_model", description=cli.plain(__doc__))
    parser.add_argument("--head", required=True, help="a featurebeam train-head --model-dir")
    parser.add_argument(
        "--model-dir", required=True, help="where model.keras goes (local or gs://)"
    )
    parser.add_argument(
        "--check-images", type=int, default=8, help="images used for the equality check"
    )
    cli.add_overwrite_flag(parser)
    return parser


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from transforms.models.build import build_classifier

    args = build_parser().parse_args(argv)
    storage.check_output(args.model_dir, overwrite=args.overwrite, flag="--model-dir")
    report = model_io.read_head_report(args.head)
    recipe = model_io.head_recipe(report)
    weights = None
    if recipe.weights_file is not None:
        weights = storage.local_copy(recipe.weights_file, tempfile.gettempdir())
    head = model_io.load_keras(model_io.head_file(args.head))
    model = build_classifier(recipe, head, weights_path=weights)
    with storage.staged_output(args.model_dir, overwrite=args.overwrite, flag="--model-dir") as out:
        model_io.save_model_dir(out, model, report["classes"], recipe.to_metadata())
        uris, max_diff, agree = _check(out, report, recipe, head, weights, args.check_images)
    return {
        "model": storage.join(args.model_dir, model_io.MODEL_FILE),
        "recipe": recipe.to_metadata(),
        "checked_images": len(uris),
        "max_abs_difference": max_diff,
        "argmax_agreement": agree,
    }


def _check(model_dir: str, report, recipe, head, weights, count: int):
    """The saved-and-reloaded model against the two-step path on real images of the table;
    raises RuntimeError when they disagree (the staged model is then dropped)."""
    from transforms.embed.embedder import Embedder

    uris = table.read_table(report["feature_tables"][0], columns=["uri"]).column("uri").to_pylist()
    uris = uris[:count]
    pixels = np.stack(
        [
            load_image(
                storage.read_bytes(u),
                recipe.size,
                resize=recipe.resize,
                interpolation=recipe.interpolation,
            ).pixels
            for u in uris
        ]
    )
    exported, _, _ = model_io.load_model_dir(model_dir)
    one_step = exported.predict(pixels.astype(np.float32), verbose=0)
    two_step = head.predict(Embedder(recipe, weights)(pixels), verbose=0)
    max_diff = float(np.abs(one_step - two_step).max())
    agree = float((one_step.argmax(1) == two_step.argmax(1)).mean())
    if max_diff > 1e-4:
        raise RuntimeError(f"exported model disagrees with backbone -> head: max |diff| {max_diff}")
    return uris, max_diff, agree


def main(argv: Sequence[str] | None = None) -> None:
    result = cli.run_main(run, argv)
    print(
        f"exported {result['model']}; on {result['checked_images']} images its probabilities equal "
        f"backbone -> head (max |diff| {result['max_abs_difference']:.2e}, "
        f"argmax agreement {result['argmax_agreement']:.0%})"
    )


if __name__ == "__main__":
    main()
