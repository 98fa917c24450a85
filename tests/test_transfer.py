"""The downstream jobs: train a head on a table, classify, export, fine-tune."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes import run_extract

from pipeline import classify, export_model, finetune, train_head
from transforms import model_io, table
from transforms.head import read_features


def test_train_head_on_a_small_table(image_tree, tmp_path):
    run_extract(str(image_tree / "train"), tmp_path / "train")
    run_extract(str(image_tree / "val"), tmp_path / "val")
    report = train_head.run(
        ["--features", str(tmp_path / "train"), "--val-features", str(tmp_path / "val")]
        + ["--model-dir", str(tmp_path / "head"), "--head", "mlp", "--epochs", "3"]
    )
    assert report["classes"] == ["cats", "dogs"]
    assert report["counts"]["validation"] == {"cats": 3, "dogs": 3}
    assert len(report["confusion_matrix"]) == 2 and report["epochs_run"] <= 3
    files = {p.name for p in (tmp_path / "head").iterdir()}
    assert {"head.keras", "report.json", "confusion_matrix.png", "learning_curves.png"} <= files
    assert "features_pca.png" in files
    assert json.loads((tmp_path / "head" / "report.json").read_text())["feature_table_fingerprint"]
    assert len(report["history"]["val_loss"]) == report["epochs_run"]
    rows = model_io.read_validation_predictions(str(tmp_path / "head")).to_pylist()
    assert sorted(r["label"] for r in rows) == ["cats"] * 3 + ["dogs"] * 3
    assert all(r["uri"].startswith(str(image_tree / "val")) for r in rows)
    hits = [r["predicted"] == r["label"] for r in rows]
    assert sum(hits) / 6 == pytest.approx(report["accuracy"])
    for r in rows:  # the prediction's probability is the largest; the label's is its own
        assert r["probability"] >= r["label_probability"] - 1e-6
        assert (r["probability"] == r["label_probability"]) == (r["predicted"] == r["label"])


def test_train_head_fuses_tables_of_different_recipes(image_tree, tmp_path, capsys):
    """Late fusion: tables of two recipes over the same images are joined on image_id (an image
    missing from one is left out) and their vectors concatenated; the report scores each part
    alone and together, and a fused head is not served as if it had one recipe."""
    from fakes import MeanColorHandler

    from transforms import model_io

    for split in ("train", "val"):
        for resize in ("squash", "crop"):
            source = str(image_tree / split)
            if split == "train" and resize == "crop":
                source = str(image_tree / split / "*" / "[01].*")  # one image per class missing
            run_extract(
                source, tmp_path / f"{split}-{resize}", handler=MeanColorHandler(resize=resize)
            )
    fused = read_features([str(tmp_path / "train-squash"), str(tmp_path / "train-crop")])
    assert fused.fused and fused.widths == (3, 3) and fused.x.shape == (4, 6)
    squash = read_features([str(tmp_path / "train-squash")])
    by_uri = dict(zip(squash.uris, squash.x, strict=True))
    for uri, row in zip(fused.uris, fused.x, strict=True):
        np.testing.assert_array_equal(row[:3], by_uri[uri])

    report = train_head.run(
        ["--features", str(tmp_path / "train-squash"), "--features", str(tmp_path / "train-crop")]
        + [
            "--val-features",
            str(tmp_path / "val-squash"),
            "--val-features",
            str(tmp_path / "val-crop"),
        ]
        + ["--model-dir", str(tmp_path / "head"), "--epochs", "3"]
    )
    fusion = report["fusion"]
    assert fusion["parts"] == ["mean_color", "mean_color[resize=crop]"]
    assert len(fusion["val_accuracy"]) == 3 and fusion["best"] in fusion["val_accuracy"]
    assert [p["resize"] for p in report["feature_table_parts"]] == ["squash", "crop"]
    with pytest.raises(ValueError, match="late-fused features of 2 recipes"):
        model_io.head_recipe(report)
    with pytest.raises(SystemExit):
        train_head.run(
            [
                "--features",
                str(tmp_path / "train-squash"),
                "--features",
                str(tmp_path / "train-crop"),
            ]
            + ["--val-features", str(tmp_path / "val-squash"), "--model-dir", str(tmp_path / "h2")]
        )
    assert "1 recipe(s) here but 2 in the training tables" in capsys.readouterr().err


def test_tables_without_labels_or_with_one_class_are_refused(image_tree, tmp_path, capsys):
    run_extract(str(image_tree / "train" / "cats"), tmp_path / "nolabels")
    with pytest.raises(ValueError, match="no row has a label"):
        read_features([str(tmp_path / "nolabels")])
    run_extract(str(image_tree / "train"), tmp_path / "t")
    run_extract(str(image_tree / "val" / "*" / "0.png"), tmp_path / "v")  # labelled, both classes
    with pytest.raises(SystemExit):
        train_head.run(
            ["--features", str(tmp_path / "v"), "--model-dir", str(tmp_path / "h")]
            + ["--val-split", "1.5"]
        )
    assert "--val-split must be in (0, 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_four_uses_on_ants_and_bees(hymenoptera, sample_weights, tmp_path):
    from pipeline.extract import run as extract

    for split in ("train", "val"):
        extract(
            ["--input", str(hymenoptera / split), "--output", str(tmp_path / split)]
            + ["--backbone", "mobilenet_v2", "--weights", "sample"]
        )
    # 1. a new head on the frozen features
    report = train_head.run(
        ["--features", str(tmp_path / "train"), "--val-features", str(tmp_path / "val")]
        + ["--model-dir", str(tmp_path / "head")]
    )
    print(f"\nhead val accuracy {report['accuracy']:.3f}")
    assert report["accuracy"] >= 0.90
    # 2. classify new images with backbone + head
    summary = classify.run(
        ["--input", str(hymenoptera / "val"), "--output", str(tmp_path / "pred")]
        + ["--head", str(tmp_path / "head"), "--top-k", "2"]
    )
    predictions = table.read_table(str(tmp_path / "pred"))
    assert summary["rows"] == predictions.num_rows == 153
    labels = np.array(predictions.column("label").to_pylist())
    predicted = np.array(predictions.column("prediction").to_pylist())
    assert (labels == predicted).mean() == pytest.approx(report["accuracy"], abs=0.01)
    # 3. one exported model equals the two-step path
    exported = export_model.run(
        ["--head", str(tmp_path / "head"), "--model-dir", str(tmp_path / "model")]
    )
    assert exported["max_abs_difference"] <= 1e-4 and exported["argmax_agreement"] == 1.0
    # 4. fine-tuning a few steps runs and reports both accuracies
    tuned = finetune.run(
        ["--images", str(hymenoptera / "train"), "--val-images", str(hymenoptera / "val")]
        + ["--from", str(tmp_path / "model"), "--model-dir", str(tmp_path / "ft")]
        + ["--unfreeze-top", "10", "--steps", "3", "--batch-size", "8"]
    )
    print(f"fine-tuning: {tuned['val_accuracy_before']:.3f} -> {tuned['val_accuracy_after']:.3f}")
    assert tuned["val_accuracy_before"] == pytest.approx(report["accuracy"], abs=0.01)
    assert 0.0 <= tuned["val_accuracy_after"] <= 1.0 and tuned["unfrozen_layers_with_weights"] > 0


@pytest.mark.slow
def test_a_head_is_served_with_the_recipe_it_was_trained_on(image_tree, tmp_path, capsys):
    """Features made with --resize crop and bfloat16: classify, export_model and finetune all
    rebuild that recipe from the head, and a contradicting flag is refused by name."""
    import keras

    from pipeline.extract import run as extract

    recipe = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--image-size", "48"]
    recipe += ["--resize", "crop", "--precision", "bfloat16"]
    for split in ("train", "val"):
        extract(["--input", str(image_tree / split), "--output", str(tmp_path / split), *recipe])
    report = train_head.run(
        ["--features", str(tmp_path / "train"), "--val-features", str(tmp_path / "val")]
        + ["--model-dir", str(tmp_path / "head"), "--epochs", "5"]
    )

    summary = classify.run(
        ["--input", str(image_tree / "val"), "--output", str(tmp_path / "pred")]
        + ["--head", str(tmp_path / "head"), "--top-k", "2"]
    )
    assert (summary["metadata"]["resize"], summary["metadata"]["precision"]) == (
        "crop",
        "bfloat16",
    )
    predictions = table.read_table(str(tmp_path / "pred")).sort_by("uri")
    val = table.read_table(str(tmp_path / "val")).sort_by("uri")
    head = keras.models.load_model(tmp_path / "head" / "head.keras")
    expected = head.predict(table.features_matrix(val), verbose=0)
    served = np.array(
        [
            [dict(zip(c, p, strict=True))[name] for name in report["classes"]]
            for c, p in zip(
                predictions["top_classes"].to_pylist(),
                predictions["top_probabilities"].to_pylist(),
                strict=True,
            )
        ]
    )
    np.testing.assert_allclose(served, expected, atol=1e-5)
    labels = np.array(predictions["label"].to_pylist())
    accuracy = (labels == np.array(predictions["prediction"].to_pylist())).mean()
    assert accuracy == pytest.approx(report["accuracy"])

    with pytest.raises(SystemExit):
        classify.run(
            ["--input", str(image_tree / "val"), "--output", str(tmp_path / "p2")]
            + ["--head", str(tmp_path / "head"), "--resize", "squash"]
        )
    assert (
        "--resize squash contradicts the recorded recipe (resize=crop)" in capsys.readouterr().err
    )

    exported = export_model.run(
        ["--head", str(tmp_path / "head"), "--model-dir", str(tmp_path / "model")]
    )
    assert exported["max_abs_difference"] <= 1e-4
    assert (exported["recipe"]["resize"], exported["recipe"]["precision"]) == ("crop", "bfloat16")
    tuned = finetune.run(
        ["--images", str(image_tree / "train"), "--val-images", str(image_tree / "val")]
        + ["--from", str(tmp_path / "model"), "--model-dir", str(tmp_path / "ft")]
        + ["--unfreeze-top", "5", "--steps", "1", "--batch-size", "4"]
    )
    assert tuned["resize"] == "crop"
    assert tuned["val_accuracy_before"] == pytest.approx(report["accuracy"])
    assert json.loads((tmp_path / "ft" / "recipe.json").read_text())["resize"] == "crop"
