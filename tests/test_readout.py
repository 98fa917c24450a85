"""The shared readout step (``transforms.models.readout``): one pooling and L2 rule for every family."""

from __future__ import annotations

import numpy as np
import pytest
from hub_checkpoints import write_keras_hub_preset

from pipeline.extract import run
from transforms import table
from transforms.embed.embedder import Embedder
from transforms.models.build import build_model
from transforms.models.recipe import FeatureRecipe

SMALL_CNN = dict(backbone="mobilenet_v3_small", weights="none", image_size=32)


def _pixels(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_cnn_pooling_equals_keras_applications_own(pooling):
    """Our readout gives what Keras' own ``pooling=`` gives, so tables made before the shared
    readout hold the same vectors as rows added to them now."""
    import keras

    from transforms.models.preprocessing import preprocess

    recipe = FeatureRecipe(**SMALL_CNN, pooling=pooling)
    ours = build_model(recipe)
    keras.utils.set_random_seed(0)
    theirs = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling=pooling
    )
    theirs.set_weights(ours.get_weights())
    x = preprocess(recipe.spec, _pixels(3, 32))
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(theirs(x)))


@pytest.mark.parametrize(
    "flags",
    [
        dict(SMALL_CNN),
        dict(SMALL_CNN, pooling="max"),
        dict(SMALL_CNN, precision="bfloat16"),
    ],
    ids=["cnn-avg", "cnn-max", "cnn-bfloat16"],
)
def test_l2_normalize_gives_unit_vectors_on_a_cnn(flags):
    plain = FeatureRecipe(**flags)
    unit = FeatureRecipe(**flags, l2_normalize=True)
    pixels = _pixels(4, 32)
    a, b = Embedder(plain, None)(pixels), Embedder(unit, None)(pixels)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-5)
    tolerance = 1e-2 if plain.precision == "bfloat16" else 1e-5
    np.testing.assert_allclose(b, a / np.linalg.norm(a, axis=1, keepdims=True), atol=tolerance)


def test_l2_normalize_gives_unit_vectors_on_a_keras_hub_backbone(tmp_path):
    preset = write_keras_hub_preset(tmp_path / "p", "dinov2")
    for pooling in ("cls", "avg", "cls_avg"):
        recipe = FeatureRecipe.from_flags(
            backbone="dinov2_small", weights=str(preset), pooling=pooling, l2_normalize=True
        )
        vectors = Embedder(recipe, str(preset))(_pixels(3, 28))
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_a_cnn_table_made_with_l2_normalize_holds_unit_vectors(image_tree, tmp_path):
    """The bug this step fixed: the table said ``l2_normalize: true`` and held vectors of norm
    about 30. Through the job (frozen graph included), every row is a unit vector."""
    out = tmp_path / "out"
    run(
        ["--input", str(image_tree), "--output", str(out), "--backbone", "mobilenet_v3_small"]
        + ["--weights", "none", "--image-size", "32", "--l2-normalize"]
    )
    features = table.read_table(str(out))
    assert table.table_metadata(features.schema)["l2_normalize"] == "true"
    norms = np.linalg.norm(table.features_matrix(features), axis=1)
    assert features.num_rows == 12
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
