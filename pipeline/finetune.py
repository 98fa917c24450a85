"""Fine-tune an exported model: its weights as the starting point, the top layers unfrozen.

    python -m pipeline.finetune --images TRAIN_DIR [--val-images VAL_DIR] --from MODEL_DIR \\
        --model-dir OUT_DIR --unfreeze-top 20 --learning-rate 1e-5 [--epochs 1] [--steps N]

Reads the same image listing as extraction (folders, globs, manifests; labels from class folders)
through ``tf.data``, unfreezes the top N layers of the backbone, keeps every BatchNormalization
layer frozen and in inference mode (as Keras recommends for fine-tuning), trains with a low learning
rate, and reports validation accuracy before and after. Images are decoded with the recipe the model
was exported with (its ``recipe.json``: size and resize), exactly as its head was trained. Images
that cannot be decoded are left out of training and counted in the report.

Without ``--val-images`` the images' splits decide (``transforms.splits``, as for ``train_head``):
``train/`` images train and ``val/`` images validate; only images without split folders are split
at random (``--val-split``, stratified). The report's ``validation`` says which was used. A
``--model-dir`` that holds results is refused unless ``--overwrite``, which replaces it only once
the new model and report are complete.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline import cli
from transforms import model_io, splits, storage
from transforms.images import ImageError, load_image
from transforms.listing import list_sources


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("pipeline.finetune", description=cli.plain(__doc__))
    parser.add_argument(
        "--images", action="append", required=True, help="labelled images; repeatable"
    )
    parser.add_argument(
        "--val-images", action="append", default=[], help="validation images (default: none)"
    )
    parser.add_argument(
        "--val-split",
        type=float,
        default=splits.DEFAULT_FRACTION,
        help="stratified fraction that validates when no --val-images is given and the images "
        "have no val split",
    )
    parser.add_argument(
        "--from", dest="source", required=True, help="a featurebeam export-model --model-dir"
    )
    parser.add_argument("--model-dir", required=True, help="where the fine-tuned model goes")
    parser.add_argument("--unfreeze-top", type=int, default=20, help="backbone layers to train")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="Adam's step size")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per training step")
    parser.add_argument("--seed", type=int, default=0, help="for the split and the shuffling")
    cli.add_overwrite_flag(parser)
    return parser


def _labelled(sources, classes) -> tuple[list[str], np.ndarray, list[str | None]]:
    """The labelled images' URIs, class indices and splits."""
    refs = [r for r in list_sources(sources) if r.label is not None]
    unknown = sorted({r.label for r in refs} - set(classes))
    if unknown:
        raise ValueError(f"labels the model does not know: {unknown}; it knows {classes}")
    targets = np.array([classes.index(r.label) for r in refs], dtype=np.int64)
    return [r.uri for r in refs], targets, [r.split for r in refs]


def _dataset(uris, targets, recipe, *, batch_size, shuffle_seed=None):
    """tf.data over URIs: our Pillow decoder (the recipe's size and resize) in a numpy_function;
    undecodable images dropped."""
    import tensorflow as tf

    size = recipe.size

    def load(uri):
        try:
            data = storage.read_bytes(uri.decode())
            image = load_image(data, size, resize=recipe.resize, interpolation=recipe.interpolation)
            return image.pixels, True
        except (ImageError, OSError):
            return np.zeros((*size, 3), np.uint8), False

    ds = tf.data.Dataset.from_tensor_slices((uris, targets))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(uris), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(
        lambda u, t: (*tf.numpy_function(load, [u], (tf.uint8, tf.bool)), t),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.filter(lambda x, ok, t: ok).map(
        lambda x, ok, t: (tf.ensure_shape(tf.cast(x, tf.float32), (*size, 3)), t)
    )
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def unfreeze_top(model, n: int) -> int:
    """Makes the top ``n`` layers of the nested backbone trainable (BatchNorm stays frozen);
    returns how many layers now train."""
    import keras

    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    backbone.trainable = True
    count = 0
    for i, layer in enumerate(backbone.layers):
        train = i >= len(backbone.layers) - n and not isinstance(
            layer, keras.layers.BatchNormalization
        )
        layer.trainable = train
        count += bool(train and layer.weights)
    return count


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import keras

    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.monotonic()
    storage.check_output(args.model_dir, overwrite=args.overwrite, flag="--model-dir")
    model, classes, recipe = model_io.load_model_dir(args.source)
    try:
        uris, targets, image_splits = _labelled(args.images, classes)
        if args.val_images:
            val_uris, val_targets, _ = _labelled(args.val_images, classes)
            chosen = splits.training_rows(image_splits, source="--val-images")
        else:
            chosen = splits.split_rows(
                image_splits,
                targets,
                fraction=args.val_split,
                seed=args.seed,
                where=", ".join(args.images),
            )
            val_uris, val_targets = [uris[i] for i in chosen.val], targets[chosen.val]
        uris, targets = [uris[i] for i in chosen.train], targets[chosen.train]
    except ValueError as exc:
        parser.error(str(exc))
    keras.utils.set_random_seed(args.seed)
    train_ds = _dataset(uris, targets, recipe, batch_size=args.batch_size, shuffle_seed=args.seed)
    if args.steps:
        train_ds = train_ds.repeat()  # a fixed number of steps may span more than one pass
    val_ds = _dataset(val_uris, val_targets, recipe, batch_size=64)

    trainable = unfreeze_top(model, args.unfreeze_top)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    before = float(model.evaluate(val_ds, verbose=0)[1])
    history = model.fit(train_ds, epochs=args.epochs, steps_per_epoch=args.steps, verbose=0).history
    after = float(model.evaluate(val_ds, verbose=0)[1])

    validation = chosen.describe()
    validation["validation_rows"] = len(val_uris)
    report = {
        "val_accuracy_before": before,
        "val_accuracy_after": after,
        "train_images": len(uris),
        "val_images": len(val_uris),
        "validation": validation,
        "unfrozen_layers_with_weights": trainable,
        "learning_rate": args.learning_rate,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "train_loss": history.get("loss", []),
        "resize": recipe.resize,
        "seconds": round(time.monotonic() - started, 1),
    }
    with storage.staged_output(args.model_dir, overwrite=args.overwrite, flag="--model-dir") as out:
        model_io.save_model_dir(out, model, classes, recipe.to_metadata())
        model_io.write_json(storage.join(out, model_io.FINETUNE_REPORT_FILE), report)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    r = cli.run_main(run, argv)
    print(
        f"validation accuracy {r['val_accuracy_before']:.3f} -> {r['val_accuracy_after']:.3f} "
        f"({r['unfrozen_layers_with_weights']} layers trained, {r['train_images']} images, {r['seconds']} s)"
    )
    print(f"  validation: {r['validation']['source']} ({r['val_images']} images)")


if __name__ == "__main__":
    main()
