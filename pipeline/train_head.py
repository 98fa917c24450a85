"""Train a new classifier head on a feature table.

    python -m pipeline.train_head --features OUT_DIR [--val-features VAL_DIR | --val-split 0.2] \\
        --model-dir HEAD_DIR [--head logistic|mlp] [--epochs N] [--learning-rate X] [--overwrite]

Which rows train and which validate follows ``transforms.splits``: a table whose rows carry
splits (``train/ants/x.jpg``) trains on its train rows and validates on its val rows (test rows are
scored separately); only a table without split information is split at random (``--val-split``,
stratified). ``report.json``'s ``validation`` says which was used. A ``--model-dir`` that holds
results is refused unless ``--overwrite``, which replaces it only once the new head is complete.

Writes to HEAD_DIR: ``head.keras`` (the Keras head: normalisation + softmax), ``report.json``
(classes, counts, accuracy, per-class precision/recall, confusion matrix, the feature table's
fingerprint and metadata), and three pictures: ``confusion_matrix.png``, ``learning_curves.png``
and ``features_pca.png``.

Late fusion: ``--features`` tables made with *different* recipes of the same images (e.g. the
``OUT/<backbone>/`` tables of one multi-backbone extraction) are joined on ``image_id`` and their
vectors concatenated; the saved head uses them all, and the report's ``fusion`` section gives the
validation accuracy of a head on each backbone alone and on each combination, and names the best.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline import cli
from transforms import model_io, splits, storage
from transforms.head import (
    HEADS,
    FeatureSet,
    build_head,
    classification_report,
    part_names,
    pca_2d,
    read_features,
)

_LOG = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("pipeline.train_head", description=cli.plain(__doc__))
    parser.add_argument(
        "--features", action="append", required=True, help="table folder; repeatable"
    )
    parser.add_argument(
        "--val-features", action="append", default=[], help="validation table(s) (default: none)"
    )
    parser.add_argument(
        "--val-split",
        type=float,
        default=splits.DEFAULT_FRACTION,
        help="stratified fraction that validates when the table has no val rows and no "
        "--val-features is given",
    )
    parser.add_argument(
        "--model-dir", required=True, help="where the head and report go (local or gs://)"
    )
    parser.add_argument("--head", default="logistic", choices=HEADS, help="the head's kind")
    parser.add_argument("--hidden-units", type=int, default=256, help="mlp only: hidden units")
    parser.add_argument("--dropout", type=float, default=0.3, help="mlp only: dropout rate")
    parser.add_argument("--epochs", type=int, default=200, help="most training epochs")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's step size")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per training step")
    parser.add_argument("--patience", type=int, default=15, help="early-stopping patience (epochs)")
    parser.add_argument("--seed", type=int, default=0, help="for the split and the training")
    cli.add_overwrite_flag(parser)
    return parser


def _split(args, train: FeatureSet, val: FeatureSet | None) -> splits.Split:
    """Which rows of ``train`` train (and validate, without ``--val-features``): the one rule."""
    if val is not None:
        return splits.training_rows(train.splits, source="--val-features tables")
    return splits.split_rows(
        train.splits,
        train.labels,
        fraction=args.val_split,
        seed=args.seed,
        where=", ".join(args.features),
    )


def _save_plots(model_dir: str, history: dict, report: dict, classes, x, labels) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def save(fig, name):
        path = storage.join(model_dir, name)
        with tempfile.NamedTemporaryFile(suffix=".png") as tmp:
            fig.savefig(tmp.name, dpi=110, bbox_inches="tight")
            data = open(tmp.name, "rb").read()  # noqa: SIM115
        plt.close(fig)
        storage.write_atomically(path, lambda f: f.write(data))
        files.append(name)

    confusion = np.array(report["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(classes), 1 + 0.6 * len(classes)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            color="black" if v < confusion.max() / 2 else "white",
        )
    ax.set_title(f"validation accuracy {report['accuracy']:.3f}")
    save(fig, "confusion_matrix.png")

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, ax in (("loss", loss_ax), ("accuracy", acc_ax)):
        ax.plot(history[key], label="train")
        if f"val_{key}" in history:
            ax.plot(history[f"val_{key}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    save(fig, "learning_curves.png")

    points = pca_2d(x)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name in classes:
        mask = labels == name
        ax.scatter(points[mask, 0], points[mask, 1], s=8, alpha=0.7, label=name)
    ax.set_title("features, first two principal components")
    ax.legend(markerscale=2, fontsize="small")
    save(fig, "features_pca.png")
    return files


def _fit(args, x_train, t_train, x_val, t_val, n_classes):
    """Trains one head (seeded); returns it, its history and its validation predictions."""
    import keras

    keras.utils.set_random_seed(args.seed)
    head = build_head(
        x_train, n_classes, kind=args.head, hidden=args.hidden_units, dropout=args.dropout
    )
    head.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=args.patience, restore_best_weights=True
    )
    history = head.fit(
        x_train,
        t_train,
        validation_data=(x_val, t_val),
        epochs=args.epochs,
        batch_size=args.batch_size,
        callbacks=[stop],
        verbose=0,
    ).history
    probabilities = head.predict(x_val, batch_size=256, verbose=0)
    return head, history, probabilities


#: Up to this many fused recipes, every combination is scored; past it, each alone and all.
_ALL_COMBINATIONS_UP_TO = 3


def _compare_parts(args, train: FeatureSet, x_train, t_train, x_val, t_val, n_classes) -> dict:
    """Validation accuracy of a head on each fused recipe alone and on each smaller combination
    (the full combination is the saved head)."""
    names = part_names(train.parts)
    n = len(names)
    if n <= _ALL_COMBINATIONS_UP_TO:
        subsets = [c for size in range(1, n) for c in itertools.combinations(range(n), size)]
    else:
        subsets = [(i,) for i in range(n)]
    bounds = np.cumsum((0, *train.widths))

    def columns(x, subset):
        return np.concatenate([x[:, bounds[i] : bounds[i + 1]] for i in subset], axis=1)

    scores = {}
    for subset in subsets:
        _, _, probabilities = _fit(
            args, columns(x_train, subset), t_train, columns(x_val, subset), t_val, n_classes
        )
        predicted = probabilities.argmax(axis=1)
        scores["+".join(names[i] for i in subset)] = float((predicted == t_val).mean())
    return {"parts": names, "widths": list(train.widths), "val_accuracy": scores}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains the head; returns the report (also written to ``report.json``)."""

    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.monotonic()
    storage.check_output(args.model_dir, overwrite=args.overwrite, flag="--model-dir")
    try:
        train = read_features(args.features)
        val = read_features(args.val_features, like=train) if args.val_features else None
        chosen = _split(args, train, val)
    except ValueError as exc:
        parser.error(str(exc))
    x_train, y_train = train.x[chosen.train], train.labels[chosen.train]
    if val is not None:
        x_val, y_val, val_uris = val.x, val.labels, val.uris
    else:
        x_val, y_val, val_uris = (
            train.x[chosen.val],
            train.labels[chosen.val],
            train.uris[chosen.val],
        )
    classes = sorted(set(y_train.tolist()))
    if len(classes) < 2:
        parser.error(f"need at least two classes to train a classifier, found {classes}")
    if not len(y_val):
        parser.error(f"no rows to validate on ({chosen.source}); give --val-features")
    unknown = sorted(set(y_val.tolist()) - set(classes))
    if unknown:
        parser.error(f"validation labels not seen in training: {unknown}")
    index = {name: i for i, name in enumerate(classes)}
    t_train = np.array([index[v] for v in y_train])
    t_val = np.array([index[v] for v in y_val])

    head, history, probabilities = _fit(args, x_train, t_train, x_val, t_val, len(classes))
    predicted = probabilities.argmax(axis=1)
    fusion = None
    if train.fused:
        fusion = _compare_parts(args, train, x_train, t_train, x_val, t_val, len(classes))
        fusion["val_accuracy"]["+".join(fusion["parts"])] = float((predicted == t_val).mean())
        fusion["best"] = max(fusion["val_accuracy"], key=fusion["val_accuracy"].get)
    validation = chosen.describe()
    if val is not None:
        validation["validation_rows"] = len(y_val)
    report = {
        "classes": classes,
        "counts": {
            "train": {c: int((y_train == c).sum()) for c in classes},
            "validation": {c: int((y_val == c).sum()) for c in classes},
        },
        **classification_report(t_val, predicted, classes),
        "head": args.head,
        "epochs_run": len(history["loss"]),
        "seed": args.seed,
        "validation": validation,
        "feature_table_fingerprint": train.fingerprint,
        "feature_table_metadata": train.metadata,
        "feature_tables": list(args.features),
    }
    if len(chosen.test):
        report["test"] = _score_test(head, train, chosen.test, classes)
    if fusion is not None:
        report["feature_table_parts"] = list(train.parts)
        report["fusion"] = fusion
    with storage.staged_output(args.model_dir, overwrite=args.overwrite, flag="--model-dir") as out:
        report["pictures"] = _save_plots(
            out,
            history,
            report,
            classes,
            np.concatenate([x_train, x_val]),
            np.concatenate([y_train, y_val]),
        )
        report["history"] = {k: [round(float(v), 5) for v in vs] for k, vs in history.items()}
        report["seconds"] = round(time.monotonic() - started, 2)
        model_io.save_head(out, head, report)
        model_io.write_validation_predictions(
            out,
            uris=val_uris,
            labels=y_val,
            predicted=[classes[i] for i in predicted],
            probabilities=probabilities,
            classes=classes,
        )
    return report


def _score_test(head, train: FeatureSet, rows: np.ndarray, classes: list[str]) -> dict:
    """The head's accuracy on the table's test rows (never trained or validated on); labels the
    head does not know count as wrong."""
    labels = train.labels[rows]
    probabilities = head.predict(train.x[rows], batch_size=256, verbose=0)
    predicted = np.array([classes[i] for i in probabilities.argmax(axis=1)])
    return {
        "accuracy": float((predicted == labels).mean()),
        "rows": int(len(rows)),
        "counts": {c: int((labels == c).sum()) for c in sorted(set(labels.tolist()))},
    }


def main(argv: Sequence[str] | None = None) -> None:
    report = cli.run_main(run, argv)
    print(
        f"validation accuracy {report['accuracy']:.3f} on {sum(report['counts']['validation'].values())} "
        f"examples, {len(report['classes'])} classes, {report['epochs_run']} epochs, {report['seconds']} s"
    )
    validation = report["validation"]
    print(
        f"  validation: {validation['source']} ({validation['train_rows']} train rows, "
        f"{validation['validation_rows']} validation rows)"
    )
    if validation.get("left_out"):
        left_out = ", ".join(f"{name}: {n}" for name, n in validation["left_out"].items())
        print(f"  left out (neither train, validation nor test): {left_out}")
    if "test" in report:
        print(f"  test accuracy {report['test']['accuracy']:.3f} on {report['test']['rows']} rows")
    for name, stats in report["per_class"].items():
        print(
            f"  {name}: precision {stats['precision']:.3f} recall {stats['recall']:.3f} ({stats['support']})"
        )
    if "fusion" in report:
        print("late fusion, validation accuracy:")
        for name, accuracy in sorted(
            report["fusion"]["val_accuracy"].items(), key=lambda kv: -kv[1]
        ):
            print(f"  {accuracy:.3f}  {name}")
        print(f"best: {report['fusion']['best']}")


if __name__ == "__main__":
    main()
