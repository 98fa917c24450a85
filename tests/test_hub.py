"""KerasHub backbones: the registry entries, poolings, preprocessing read from presets, checkpoint
directories (KerasHub preset and Transformers format) and their errors."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hub_checkpoints import (
    CONVERTER,
    write_clip_preset_with_tokenizer,
    write_keras_hub_preset,
    write_transformers_dinov2,
)

from transforms import table
from transforms.models.recipe import FeatureRecipe, RecipeMismatch, first_difference
from transforms.models.registry import BACKBONES, get_backbone
from transforms.models.specs import FAMILIES

HUB_NAMES = [name for name, spec in BACKBONES.items() if spec.is_hub]


def _pixels(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _embed(recipe, weights_path=None, pixels=None):
    from transforms.embed.embedder import Embedder

    return Embedder(recipe, weights_path)(pixels)


# --- the registry ---------------------------------------------------------------------------------


def test_registry_names_follow_keras_hub_presets():
    """Every entry is a preset KerasHub itself lists, with its versioned handle."""
    for name in HUB_NAMES:
        handle = get_backbone(name).handle
        assert handle.startswith("kaggle://keras/") and handle.split("/")[-2] == name, handle
    families = {get_backbone(n).family for n in HUB_NAMES}
    assert families == set(FAMILIES)
    for expected in ("dinov2_small", "dinov2_with_registers_base", "siglip2_base_patch16_224"):
        assert expected in BACKBONES


@pytest.mark.parametrize("name", HUB_NAMES)
def test_every_entry_states_its_widths_and_input(name):
    spec = get_backbone(name)
    tower = spec.tower()
    if spec.fam.resizable:
        assert tower.image_size % tower.patch_size == 0
    widths = tower.widths
    assert widths["cls_avg"] == widths["cls"] + widths["avg"]
    recipe = FeatureRecipe.from_flags(backbone=name, weights="none")
    assert recipe.pooling == "cls" and recipe.feature_dim == widths["cls"]
    assert recipe.image_size == spec.input_size


# One preset per family, random init, at a small input where the family allows it. MetaCLIP 2's
# smallest preset is ViT-H (632M parameters): it is covered by the tiny preset directory below.
FAMILY_CASES = [
    ("dinov2_small", 28),
    ("dinov2_with_registers_small", 28),
    ("dinov3_vit_small_lvd1689m", 32),
    ("vit_base_patch16_224_imagenet", 224),
    ("siglip2_base_patch16_224", 224),
    ("clip_vit_base_patch32", 224),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,size", FAMILY_CASES)
def test_every_family_builds_with_random_init(name, size):
    """Each family's preset architecture builds offline with a seeded random init, and its
    ``cls_avg`` vector has the stated ``cls`` + ``avg`` widths (the split of ``cls_avg`` into
    its parts is checked against KerasHub's tokens below)."""
    recipe = FeatureRecipe.from_flags(
        backbone=name, weights="none", pooling="cls_avg", image_size=size
    )
    vectors = _embed(recipe, pixels=_pixels(2, size))
    widths = recipe.tower.widths
    assert vectors.shape == (2, widths["cls"] + widths["avg"])
    assert np.isfinite(vectors).all() and np.abs(vectors).sum() > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_loads_a_keras_hub_preset_directory(family, tmp_path):
    """A ``save_to_preset`` directory of each family loads offline; widths come from its
    config, preprocessing from its image converter."""
    preset = write_keras_hub_preset(tmp_path / family, family)
    name = next(n for n in HUB_NAMES if get_backbone(n).family == family)
    recipe = FeatureRecipe.from_flags(backbone=name, weights=str(preset), pooling="cls_avg")
    assert recipe.preprocessing_spec.scale == tuple(CONVERTER["scale"])
    vectors = _embed(recipe, str(preset), _pixels(2, recipe.image_size))
    assert vectors.shape == (2, recipe.feature_dim)
    widths = recipe.tower.widths
    assert recipe.feature_dim == widths["cls"] + widths["avg"]


# --- poolings and preprocessing against KerasHub's own model ----------------------------------------


def test_vectors_equal_keras_hub_on_the_preset_pixels(tmp_path):
    """cls = the class token after the final norm, avg = the mean of the patch tokens without
    class and register tokens, on pixels scaled by the preset's converter."""
    import keras_hub

    preset = write_keras_hub_preset(tmp_path / "p", "dinov2")
    pixels = _pixels(3, 28)
    backbone = keras_hub.models.DINOV2Backbone.from_preset(str(preset))
    scaled = pixels.astype(np.float32) * np.float32(CONVERTER["scale"]) + np.float32(
        CONVERTER["offset"]
    )
    tokens = np.asarray(backbone({"images": scaled}))
    registers = backbone.num_register_tokens
    assert registers == 4
    expected = {"cls": tokens[:, 0], "avg": tokens[:, 1 + registers :].mean(axis=1)}
    expected["cls_avg"] = np.concatenate([expected["cls"], expected["avg"]], axis=1)
    for pooling, want in expected.items():
        recipe = FeatureRecipe.from_flags(
            backbone="dinov2_small", weights=str(preset), pooling=pooling
        )
        np.testing.assert_allclose(_embed(recipe, str(preset), pixels), want, rtol=1e-4, atol=1e-4)


def test_l2_normalize_gives_unit_vectors(tmp_path):
    preset = write_keras_hub_preset(tmp_path / "p", "dinov2")
    plain = FeatureRecipe.from_flags(backbone="dinov2_small", weights=str(preset))
    unit = FeatureRecipe.from_flags(backbone="dinov2_small", weights=str(preset), l2_normalize=True)
    pixels = _pixels(3, 28)
    a, b = _embed(plain, str(preset), pixels), _embed(unit, str(preset), pixels)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        b, a / np.linalg.norm(a, axis=1, keepdims=True), rtol=1e-4, atol=1e-6
    )
    assert unit.to_metadata()["l2_normalize"] == "true"
    assert first_difference(plain.to_metadata(), unit.to_metadata()) == "l2_normalize"


def test_preprocessing_is_read_from_the_preset(tmp_path):
    preset = write_keras_hub_preset(
        tmp_path / "p",
        "dinov2",
        converter={"scale": 1 / 127.5, "offset": -1.0, "interpolation": "bilinear"},
    )
    recipe = FeatureRecipe.from_flags(backbone="dinov2_small", weights=str(preset))
    prep = recipe.preprocessing_spec
    assert prep.scale == (1 / 127.5,) * 3 and prep.offset == (-1.0,) * 3
    assert recipe.interpolation == "bilinear"
    assert recipe.to_metadata()["preprocessing"] == (
        "keras_hub:x*[0.00784314,0.00784314,0.00784314]+[-1,-1,-1];interpolation=bilinear"
    )
    # A random init has no preset: the family's published normalisation (DINOv2: ImageNet's).
    random = FeatureRecipe.from_flags(backbone="dinov2_small", weights="none")
    np.testing.assert_allclose(
        random.preprocessing_spec.offset, (-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225)
    )
    assert random.interpolation == "bicubic" and random.resize == "crop"


def test_transformers_checkpoint_reads_its_preprocessor_config(tmp_path):
    hf = write_transformers_dinov2(
        tmp_path / "hf",
        preprocessor={"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "resample": 2},
    )
    recipe = FeatureRecipe.from_flags(backbone="dinov2_small", weights=str(hf), image_size=28)
    assert recipe.preprocessing_spec.offset == (-2.0,) * 3
    assert recipe.interpolation == "bilinear"
    assert recipe.feature_dim == 32 and recipe.tower.patch_size == 14


def test_transformers_checkpoint_matches_its_keras_hub_conversion(tmp_path):
    """Our vector from a Transformers directory is KerasHub's converted model on the same pixels."""
    import keras_hub

    hf = write_transformers_dinov2(tmp_path / "hf", registers=4)
    backbone = keras_hub.models.DINOV2Backbone.from_preset(str(hf), image_shape=(28, 28, 3))
    pixels = _pixels(2, 28)
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    tokens = np.asarray(backbone({"images": (pixels / np.float32(255) - mean) / std}))
    recipe = FeatureRecipe.from_flags(
        backbone="dinov2_with_registers_small", weights=str(hf), image_size=28, pooling="cls_avg"
    )
    want = np.concatenate([tokens[:, 0], tokens[:, 5:].mean(axis=1)], axis=1)
    np.testing.assert_allclose(_embed(recipe, str(hf), pixels), want, rtol=1e-4, atol=1e-4)


# --- recipe: metadata, fingerprints ----------------------------------------------------------------


def test_recipe_round_trips_through_table_metadata(tmp_path):
    hf = write_transformers_dinov2(tmp_path / "hf")
    recipe = FeatureRecipe.from_flags(
        backbone="dinov2_small", weights=str(hf), image_size=28, pooling="avg", l2_normalize=True
    )
    meta = recipe.to_metadata()
    assert FeatureRecipe.from_metadata(meta) == recipe
    with pytest.raises(RecipeMismatch, match="--pooling cls contradicts"):
        recipe.check_flags(pooling="cls")


def test_directory_fingerprint_hashes_the_weight_values(tmp_path):
    one = write_transformers_dinov2(tmp_path / "one", seed=1)
    same = write_transformers_dinov2(tmp_path / "same", seed=1)
    other = write_transformers_dinov2(tmp_path / "other", seed=2)

    def fingerprint(path):
        return FeatureRecipe.from_flags(backbone="dinov2_small", weights=str(path)).fingerprint()

    assert fingerprint(one) == fingerprint(same)
    assert fingerprint(one) != fingerprint(other)
    assert fingerprint(one).startswith("dir-values-sha256:")
    assert (
        FeatureRecipe.from_flags(backbone="dinov2_small").fingerprint()
        == "keras-hub:kaggle://keras/dinov2/keras/dinov2_small/1"
    )


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"backbone": "dinov2_smal"}, "did you mean dinov2_small"),
        ({"backbone": "dinov2_small", "image_size": 30}, "multiple of the patch size 14"),
        ({"backbone": "siglip_base_patch16_224", "image_size": 256}, "fixed at 224 px"),
        ({"backbone": "dinov2_small", "weights": "imagenet"}, "KerasHub backbone"),
        ({"backbone": "dinov2_small", "pooling": "max"}, "must be one of ('cls', 'avg'"),
        ({"backbone": "resnet50", "weights": "preset"}, "for KerasHub backbones"),
        ({"backbone": "resnet50", "pooling": "cls"}, "must be one of ('avg', 'max')"),
    ],
)
def test_bad_recipes_are_clear_errors(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FeatureRecipe.from_flags(**flags)


def test_directory_without_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="needs a config.json; found model.safetensors"):
        FeatureRecipe.from_flags(backbone="dinov2_small", weights=str(tmp_path / "ckpt"))


def test_checkpoint_of_another_family_is_a_clear_error(tmp_path):
    hf = write_transformers_dinov2(tmp_path / "hf")
    with pytest.raises(ValueError, match="'dinov2' is not a vit checkpoint"):
        FeatureRecipe.from_flags(backbone="vit_base_patch16_224_imagenet", weights=str(hf))
    preset = write_keras_hub_preset(tmp_path / "clip", "clip")
    with pytest.raises(ValueError, match="not a SigLIPBackbone"):
        FeatureRecipe.from_flags(backbone="siglip_base_patch16_224", weights=str(preset))


# --- in the pipeline -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["transformers", "keras_hub"])
def test_checkpoint_directories_give_identical_vectors_on_two_worker_processes(
    kind, image_tree, tmp_path
):
    """The extraction job with a checkpoint directory: one process and two worker processes
    write the same table, equal to the vectors computed here."""
    from pipeline.extract import run

    if kind == "transformers":
        weights = write_transformers_dinov2(tmp_path / "ckpt", registers=4)
    else:
        weights = write_keras_hub_preset(tmp_path / "ckpt", "dinov2")
    base = ["--input", str(image_tree), "--backbone", "dinov2_with_registers_small"]
    base += ["--weights", str(weights), "--image-size", "28", "--chunk-size", "3"]
    run([*base, "--output", str(tmp_path / "one")])
    run(
        [*base, "--output", str(tmp_path / "two")]
        + ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    )
    one = table.read_table(str(tmp_path / "one"))
    two = table.read_table(str(tmp_path / "two"))
    assert one.num_rows == 12
    assert one.column("image_id").to_pylist() == two.column("image_id").to_pylist()
    np.testing.assert_array_equal(table.features_matrix(one), table.features_matrix(two))
    meta = table.table_metadata(one.schema)
    assert meta["backbone"] == "dinov2_with_registers_small" and meta["pooling"] == "cls"
    assert meta["feature_dim"] == "32" and meta["resize"] == "crop"

    from transforms.images import load_image

    recipe = FeatureRecipe.from_metadata(meta)
    uris = one.column("uri").to_pylist()[:4]
    pixels = np.stack(
        [
            load_image(
                pathlib.Path(u.removeprefix("file://")).read_bytes(),
                recipe.size,
                resize=recipe.resize,
                interpolation=recipe.interpolation,
            ).pixels
            for u in uris
        ]
    )
    np.testing.assert_allclose(
        _embed(recipe, str(weights), pixels), table.features_matrix(one)[:4], rtol=1e-5, atol=1e-5
    )


# --- against the reference implementation ------------------------------------------------------------

_REFERENCE = os.path.join(os.path.dirname(__file__), "reference_transformers.py")


def test_dinov2_vectors_equal_transformers_pytorch(tmp_path):
    """Our vectors against Hugging Face Transformers (PyTorch) on the same checkpoint and pixels.

    torch + transformers are not project dependencies: point FEATUREBEAM_TORCH_PYTHON at a
    Python that has them (see docs/backbones/kerashub.md, "What is checked, and how")."""
    python = os.environ.get("FEATUREBEAM_TORCH_PYTHON")
    if not python or not shutil.which(python):
        pytest.skip("set FEATUREBEAM_TORCH_PYTHON to a Python with torch + transformers")
    hf = write_transformers_dinov2(tmp_path / "hf", hidden=64, heads=4, layers=3, registers=4)
    pixels = _pixels(4, 56)
    np.save(tmp_path / "pixels.npy", pixels)
    subprocess.run(
        [python, _REFERENCE, str(hf), str(tmp_path / "pixels.npy"), str(tmp_path / "ref.json")],
        check=True,
    )
    reference = json.loads((tmp_path / "ref.json").read_text())
    for pooling in ("cls", "avg", "cls_avg"):
        recipe = FeatureRecipe.from_flags(
            backbone="dinov2_with_registers_small", weights=str(hf), image_size=56, pooling=pooling
        )
        ours = _embed(recipe, str(hf), pixels)
        want = np.asarray(reference[pooling], np.float32)
        cosine = (ours * want).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(want, axis=1)
        assert cosine.min() > 0.99999, (pooling, cosine)
        np.testing.assert_allclose(ours, want, rtol=1e-3, atol=1e-4)


# --- zero-shot ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_zero_shot_classify_with_a_tiny_tokenizer(image_tree, tmp_path):
    """``classify --labels``: each image's probabilities are the softmax of CLIP's own forward
    pass (image and prompt towers, its head) on the same pixels and prompts."""
    import keras
    import keras_hub
    import pyarrow.parquet as pq

    from pipeline.classify import run
    from transforms.images import load_image

    preset = write_clip_preset_with_tokenizer(tmp_path / "clip")
    summary = run(
        ["--input", str(image_tree), "--output", str(tmp_path / "out")]
        + ["--backbone", "clip_vit_base_patch16", "--weights", str(preset)]
        + ["--labels", "cats,dogs", "--prompt", "a photo of {}.", "--top-k", "2"]
    )
    assert (summary["rows"], summary["errors"]) == (12, 0)
    predictions = pq.read_table(str(tmp_path / "out")).to_pylist()
    recipe = FeatureRecipe.from_flags(backbone="clip_vit_base_patch16", weights=str(preset))
    backbone = keras_hub.models.CLIPBackbone.from_preset(str(preset))
    preprocessor = keras_hub.models.CLIPPreprocessor.from_preset(str(preset))
    tokens = preprocessor({"prompts": ["a photo of cats.", "a photo of dogs."], "images": None})
    for row in predictions[:4]:
        path = row["uri"].removeprefix("file://")
        pixels = (
            load_image(
                pathlib.Path(path).read_bytes(),
                recipe.size,
                resize=recipe.resize,
                interpolation=recipe.interpolation,
            )
            .pixels[None]
            .astype(np.float32)
        )
        scaled = pixels * np.float32(CONVERTER["scale"]) + np.float32(CONVERTER["offset"])
        inputs = {"images": keras.ops.convert_to_tensor(scaled), "token_ids": tokens["token_ids"]}
        logits = backbone(inputs)["vision_logits"]
        want = np.asarray(keras.ops.softmax(logits))[0]
        got = dict(zip(row["top_classes"], row["top_probabilities"], strict=True))
        np.testing.assert_allclose([got["cats"], got["dogs"]], want, rtol=1e-4, atol=1e-5)
        assert row["prediction"] == ("cats", "dogs")[int(np.argmax(want))]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--backbone", "dinov2_small", "--weights", "none", "--labels", "a,b"], "no text tower"),
        (["--backbone", "resnet50", "--weights", "none", "--labels", "a,b"], "no text tower"),
        (
            ["--backbone", "clip_vit_base_patch16", "--weights", "none", "--labels", "a,b"],
            "none has",
        ),
        (["--backbone", "clip_vit_base_patch16", "--labels", "ants"], "at least 2 labels"),
        (
            ["--backbone", "clip_vit_base_patch16", "--labels", "a,b", "--prompt", "x"],
            "must contain {}",
        ),
    ],
)
def test_zero_shot_bad_flags_are_clear_errors(argv, message, tmp_path, capsys):
    from pipeline.classify import run

    with pytest.raises(SystemExit):
        run(["--input", str(tmp_path), "--output", str(tmp_path / "o"), *argv])
    assert message in capsys.readouterr().err


# --- staging ---------------------------------------------------------------------------------------


def test_stage_weights_converts_a_transformers_checkpoint_to_a_preset(tmp_path):
    """The staged KerasHub preset gives the same vectors and preprocessing as its source."""
    from pipeline.stage_weights import stage

    hf = write_transformers_dinov2(
        tmp_path / "hf",
        registers=4,
        preprocessor={"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "resample": 2},
    )
    uri = stage("dinov2_with_registers_small", str(hf), str(tmp_path / "bucket"))
    assert uri == str(tmp_path / "bucket" / "dinov2_with_registers_small-hf")
    assert {"config.json", "model.weights.h5", "image_converter.json"} <= set(os.listdir(uri))
    source = FeatureRecipe.from_flags(
        backbone="dinov2_with_registers_small", weights=str(hf), image_size=28
    )
    staged = FeatureRecipe.from_flags(
        backbone="dinov2_with_registers_small", weights=uri, image_size=28
    )
    assert staged.preprocessing == source.preprocessing
    assert staged.interpolation == "bilinear"
    pixels = _pixels(2, 28)
    np.testing.assert_allclose(
        _embed(staged, uri, pixels), _embed(source, str(hf), pixels), rtol=1e-5, atol=1e-5
    )


def test_stage_weights_keeps_the_text_preprocessor(tmp_path):
    from pipeline.stage_weights import stage

    preset = write_clip_preset_with_tokenizer(tmp_path / "clip")
    uri = stage("clip_vit_base_patch16", str(preset), str(tmp_path / "bucket"))
    assert {"preprocessor.json", "tokenizer.json", "image_converter.json"} <= set(os.listdir(uri))
    with pytest.raises(ValueError, match="a random init is built on each worker"):
        stage("clip_vit_base_patch16", "none", str(tmp_path / "bucket"))


@pytest.mark.slow
def test_a_keras_hub_backbone_serves_the_four_uses(image_tree, tmp_path):
    """Features, a head on them, classify --head with the recorded recipe, and one exported
    Keras model (loadable in a fresh process) whose probabilities equal backbone -> head."""
    from pipeline import classify, export_model, extract, train_head

    hf = write_transformers_dinov2(tmp_path / "hf", registers=4)
    common = ["--backbone", "dinov2_with_registers_small", "--weights", str(hf)]
    common += ["--image-size", "28", "--pooling", "cls_avg"]
    for split in ("train", "val"):
        extract.run(
            ["--input", str(image_tree / split), "--output", str(tmp_path / split), *common]
        )
    train_head.run(
        ["--features", str(tmp_path / "train"), "--val-features", str(tmp_path / "val")]
        + ["--model-dir", str(tmp_path / "head"), "--epochs", "3"]
    )
    summary = classify.run(
        ["--input", str(image_tree / "val"), "--output", str(tmp_path / "pred")]
        + ["--head", str(tmp_path / "head")]
    )
    assert (summary["rows"], summary["errors"]) == (6, 0)
    assert summary["metadata"]["pooling"] == "cls_avg"
    export_model.main(["--head", str(tmp_path / "head"), "--model-dir", str(tmp_path / "model")])
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import keras, transforms.models.preprocessing; "
            f"m = keras.models.load_model({str(tmp_path / 'model' / 'model.keras')!r}, "
            "compile=False); print(tuple(m.output.shape))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip().endswith("(None, 2)")
