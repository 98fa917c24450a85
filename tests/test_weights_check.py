"""Weights are checked before anything starts (``transforms.models.weights.check``): a bad file,
weights of another architecture or unreachable published weights are one line and exit 2, with
nothing written to the output (no lease, no plan file)."""

from __future__ import annotations

import json
import os

import pytest
from hub_checkpoints import write_transformers_dinov2

from pipeline import extract
from transforms.models.recipe import FeatureRecipe
from transforms.models.weights import check

SMALL = ["--backbone", "mobilenet_v3_small", "--image-size", "32"]


def _fails(argv, capsys) -> str:
    """Runs extract's main; returns its one error line after checking exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        extract.main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def _argv(image_tree, out, *flags):
    return ["--input", str(image_tree), "--output", str(out), *flags]


def _nothing_written(out):
    assert not out.exists() or os.listdir(out) == []


def test_a_file_that_is_not_weights_is_one_line(image_tree, tmp_path, capsys):
    bad = tmp_path / "notes.weights.h5"
    bad.write_text("these are my notes, not weights")
    out = tmp_path / "out"
    line = _fails(_argv(image_tree, out, *SMALL, "--weights", str(bad)), capsys)
    assert str(bad) in line and "not an HDF5 weights file" in line
    _nothing_written(out)


def test_a_keras_file_that_is_not_an_archive_is_named_not_missing(image_tree, tmp_path, capsys):
    """Keras itself says "File not found" for a .keras file that exists but is not a zip."""
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"\x00" * 64)
    line = _fails(_argv(image_tree, tmp_path / "out", *SMALL, "--weights", str(bad)), capsys)
    assert str(bad) in line and "not a .keras file" in line and "not found" not in line


def test_weights_of_another_architecture_name_the_layer_and_shapes(image_tree, tmp_path, capsys):
    import keras

    other = tmp_path / "mobilenet_v2.weights.h5"
    keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    ).save_weights(other)
    out = tmp_path / "out"
    line = _fails(_argv(image_tree, out, *SMALL, "--weights", str(other)), capsys)
    assert f"--weights {other}: not mobilenet_v3_small weights: layer 'conv'" in line
    assert "(3, 3, 3, 16)" in line and "(3, 3, 3, 32)" in line
    _nothing_written(out)


def test_fitting_weights_pass_and_are_checked_once_per_machine(tmp_path, monkeypatch):
    import keras

    path = tmp_path / "small.weights.h5"
    keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    ).save_weights(path)
    recipe = FeatureRecipe.from_flags(
        backbone="mobilenet_v3_small", weights=str(path), image_size=32
    )
    cache = tmp_path / "cache"
    check.check_weights(recipe, cache=str(cache))
    assert len(os.listdir(cache / "checked")) == 1

    def no_build(*_, **__):
        raise AssertionError("built again")

    monkeypatch.setattr("transforms.models.build.build_model", no_build)
    check.check_weights(recipe, cache=str(cache))  # the marker says these weights fit


def test_a_broken_safetensors_file_is_named(image_tree, tmp_path, capsys):
    folder = write_transformers_dinov2(tmp_path / "hf")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    argv = _argv(
        image_tree, tmp_path / "out", "--backbone", "dinov2_small", "--weights", str(folder)
    )
    line = _fails([*argv, "--image-size", "28"], capsys)
    assert "model.safetensors is not a readable weights file" in line


def test_a_transformers_config_without_hidden_size_is_named(image_tree, tmp_path, capsys):
    folder = write_transformers_dinov2(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    argv = _argv(
        image_tree, tmp_path / "out", "--backbone", "dinov2_small", "--weights", str(folder)
    )
    line = _fails(argv, capsys)
    assert str(folder) in line and "'hidden_size'" in line


def _offline(monkeypatch, tmp_path):
    def refuse(*_, **__):
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(check.socket, "create_connection", refuse)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))


def test_imagenet_weights_that_cannot_be_fetched_say_what_to_do(
    image_tree, tmp_path, capsys, monkeypatch
):
    _offline(monkeypatch, tmp_path)
    out = tmp_path / "out"
    line = _fails(_argv(image_tree, out, "--backbone", "resnet50", "--weights", "imagenet"), capsys)
    assert "storage.googleapis.com, which cannot be reached from here" in line
    assert "--weights sample" in line and "stage-weights --backbone resnet50" in line
    _nothing_written(out)


def test_imagenet_weights_in_keras_cache_need_no_network(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    models = tmp_path / "keras_home" / "models"
    models.mkdir(parents=True)
    (models / "efficientnetv2-b0_notop.h5").write_bytes(b"")
    check.check_weights(FeatureRecipe.from_flags(backbone="efficientnet_v2_b0"))
    with pytest.raises(ValueError, match="cannot be reached"):
        check.check_weights(FeatureRecipe.from_flags(backbone="efficientnet_v2_b1"))


def test_a_keras_hub_preset_that_cannot_be_fetched_says_what_to_do(
    image_tree, tmp_path, capsys, monkeypatch
):
    import keras_hub

    def offline(*_, **__):
        raise ConnectionError(
            "HTTPSConnectionPool(host='api.kaggle.com', port=443): Max retries exceeded with url: "
            "/v1/models (Caused by NameResolutionError(\"Failed to resolve 'api.kaggle.com'\"))"
        )

    monkeypatch.setattr(keras_hub.layers.ImageConverter, "from_preset", offline)
    out = tmp_path / "out"
    line = _fails(_argv(image_tree, out, "--backbone", "dinov2_small"), capsys)
    assert "from api.kaggle.com, which cannot be reached from here" in line
    assert "--weights none" in line and "stage-weights --backbone dinov2_small" in line
    _nothing_written(out)
