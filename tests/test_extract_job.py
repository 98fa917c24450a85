"""End to end: ``pipeline.extract.run(argv)`` on real Keras backbones, read back and checked."""

from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pytest
from fakes import add_bad_files

from pipeline.extract import format_summary, run
from transforms import table
from transforms.embed.embedder import Embedder
from transforms.images import load_image
from transforms.models.recipe import FeatureRecipe

SMALL = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--image-size", "32"]


def direct_features(uris, recipe: FeatureRecipe) -> np.ndarray:
    """The same features computed without Beam: decode each file, one model call."""
    pixels = np.stack([load_image(pathlib.Path(u).read_bytes(), recipe.size).pixels for u in uris])
    return Embedder(recipe, None)(pixels)


def test_run_writes_the_table_and_matches_a_direct_computation(image_tree, tmp_path):
    bad = add_bad_files(image_tree)
    out = tmp_path / "out"
    summary = run(
        ["--input", str(image_tree), "--output", str(out), *SMALL, "--batch-size", "5"]
        + ["--max-pixels", "4000000"]
    )
    assert (summary["inputs"], summary["rows"], summary["errors"]) == (16, 12, len(bad))
    assert "inputs 16 = rows 12 + errors 4" in format_summary(summary)

    features = table.read_table(str(out))
    assert features.num_rows == 12
    assert features.schema.names == [
        "image_id",
        "uri",
        "label",
        "split",
        "width",
        "height",
        "file_size",
        "file_version",
        "feature",
    ]
    assert features.schema.field("feature").type == pa.list_(pa.float32(), 576)
    meta = table.table_metadata(features.schema)
    assert meta["backbone"] == "mobilenet_v3_small"
    assert meta["weights_fingerprint"] == "random-init:seed=1234"
    assert (meta["input_size"], meta["pooling"], meta["layer"]) == ("32", "avg", "")
    assert meta["preprocessing"] == "keras.applications.mobilenet_v3.preprocess_input"
    assert meta["tool_version"] and meta["feature_dim"] == "576"
    assert set(features.column("width").to_pylist()) == {40}

    uris = features.column("uri").to_pylist()
    expected = direct_features(
        uris, FeatureRecipe("mobilenet_v3_small", weights="none", image_size=32)
    )
    np.testing.assert_allclose(table.features_matrix(features), expected, rtol=1e-4, atol=1e-5)


def test_existing_table_needs_overwrite(image_tree, tmp_path):
    argv = ["--input", str(image_tree / "val"), "--output", str(tmp_path / "o"), *SMALL]
    first = run(argv)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(argv)
    again = run([*argv, "--overwrite"])
    assert again["rows"] == first["rows"] == 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backbone", "resnet9000"], "featurebeam backbones lists all"),
        (["--weights", "/no/such/file.h5"], "weights file not found"),
        (
            ["--backbone", "resnet50", "--weights", "sample"],
            "only available for --backbone mobilenet_v2",
        ),
        (["--batch-size", "0"], "batch-size must be >= 1"),
    ],
)
def test_bad_flags_exit_with_a_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["--input", str(tmp_path), "--output", str(tmp_path / "o"), *argv])
    assert message in capsys.readouterr().err


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        run(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), *SMALL])


@pytest.mark.slow
def test_multi_process_mode_gives_the_same_rows(image_tree, tmp_path):
    base = ["--input", str(image_tree), *SMALL]
    run([*base, "--output", str(tmp_path / "one")])
    run(
        [*base, "--output", str(tmp_path / "two")]
        + ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    )
    one = table.read_table(str(tmp_path / "one"))
    two = table.read_table(str(tmp_path / "two"))
    assert one.column("image_id").to_pylist() == two.column("image_id").to_pylist()
    np.testing.assert_allclose(
        table.features_matrix(one), table.features_matrix(two), rtol=1e-4, atol=1e-5
    )


@pytest.mark.slow
def test_named_layer_vgg16_fc2(image_tree, tmp_path):
    summary = run(
        ["--input", str(image_tree / "val"), "--output", str(tmp_path / "o")]
        + ["--backbone", "vgg16", "--weights", "none", "--layer", "fc2"]
    )
    features = table.read_table(str(tmp_path / "o"))
    assert summary["rows"] == 6
    assert features.schema.field("feature").type.list_size == 4096
    assert table.table_metadata(features.schema)["layer"] == "fc2"
