"""FeatureRecipe: one object owns what makes a vector; metadata round trips; flags are checked."""

from __future__ import annotations

import pytest

from transforms.models.recipe import (
    COMPATIBILITY_KEYS,
    DEFAULT_RESIZE,
    RECIPE_KEYS,
    FeatureRecipe,
    RecipeMismatch,
    first_difference,
)


def test_metadata_round_trip_covers_every_recipe_key():
    recipe = FeatureRecipe(
        "mobilenet_v3_small", weights="none", image_size=48, resize="crop", precision="bfloat16"
    )
    meta = recipe.to_metadata()
    assert set(RECIPE_KEYS) <= set(meta)
    assert (meta["resize"], meta["precision"], meta["input_size"]) == ("crop", "bfloat16", "48")
    assert FeatureRecipe.from_metadata(meta) == recipe
    assert set(COMPATIBILITY_KEYS) == {*RECIPE_KEYS, "head"}


def test_tables_from_older_versions_get_the_defaults():
    meta = FeatureRecipe("resnet50", weights="none").to_metadata()
    del meta["resize"], meta["precision"]
    recipe = FeatureRecipe.from_metadata(meta)
    assert (recipe.resize, recipe.precision) == (DEFAULT_RESIZE, "float32")


def test_flags_that_contradict_the_recorded_recipe_are_refused_by_key():
    recipe = FeatureRecipe("mobilenet_v3_small", weights="none", image_size=48, resize="crop")
    recipe.check_flags(resize="crop", image_size=48, backbone="mobilenet-v3-small", pooling=None)
    for flags, key in [
        ({"resize": "squash"}, "resize"),
        ({"precision": "bfloat16"}, "precision"),
        ({"image_size": 64}, "input_size"),
        ({"backbone": "resnet50"}, "backbone"),
        ({"weights": "imagenet"}, "weights_fingerprint"),
        ({"pooling": "max"}, "pooling"),
    ]:
        with pytest.raises(RecipeMismatch, match=f"contradicts the recorded recipe \\({key}=") as e:
            recipe.check_flags(**flags)
        assert e.value.key == key


def test_weights_whose_values_changed_are_refused(tmp_path):
    from transforms.models.build import build_model

    path = tmp_path / "w.weights.h5"
    recipe = FeatureRecipe("mobilenet_v3_small", weights=str(path), image_size=32)
    model = build_model(FeatureRecipe("mobilenet_v3_small", weights="none", image_size=32))
    model.save_weights(path)
    meta = recipe.to_metadata()
    model.set_weights([w * 0.5 for w in model.get_weights()])
    path.unlink()
    model.save_weights(path)
    with pytest.raises(RecipeMismatch, match="do not match the recorded fingerprint"):
        FeatureRecipe.from_metadata(meta)
    assert FeatureRecipe.from_metadata(meta, verify_weights=False).weights == str(path)


def test_from_flags_states_the_defaults_once():
    recipe = FeatureRecipe.from_flags(backbone="resnet50", weights="none")
    assert (recipe.pooling, recipe.resize, recipe.precision, recipe.image_size) == (
        "avg",
        "squash",
        "float32",
        224,
    )
    with pytest.raises(ValueError, match="weights file not found"):
        FeatureRecipe.from_flags(backbone="resnet50", weights="/no/such.h5")
    with pytest.raises(ValueError, match="resize must be one of"):
        FeatureRecipe("resnet50", resize="stretch")


def test_first_difference_names_the_key():
    a = FeatureRecipe("resnet50", weights="none").to_metadata()
    b = FeatureRecipe("resnet50", weights="none", resize="crop").to_metadata()
    assert first_difference(a, a) is None
    assert first_difference(a, b) == "resize"
