"""transforms/embed/embedder.py: the frozen (weights folded in) and cached model function gives the
model's own vectors."""

import numpy as np

from transforms.embed.embedder import Embedder, frozen_graph_name
from transforms.models.recipe import FeatureRecipe


def _recipe():
    return FeatureRecipe.from_flags(backbone="mobilenet_v2", weights="none", image_size=32)


def test_frozen_and_cached_graph_give_the_models_vectors(tmp_path, caplog):
    recipe = _recipe()
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    plain = Embedder(recipe, None)(pixels)
    path = tmp_path / "graphs" / frozen_graph_name(recipe.to_metadata())
    frozen = Embedder(recipe, None, frozen_graph=str(path))
    assert path.is_file()
    np.testing.assert_allclose(frozen(pixels), plain, rtol=1e-5, atol=1e-6)
    cached = Embedder(recipe, None, frozen_graph=str(path))
    assert not hasattr(cached, "model")  # loaded from the file, not built
    np.testing.assert_allclose(cached(pixels), plain, rtol=1e-5, atol=1e-6)
    assert cached(pixels[:1]).shape == (1, recipe.feature_dim)

    path.write_bytes(b"not a graph")  # a damaged cache file is rebuilt and rewritten
    rebuilt = Embedder(recipe, None, frozen_graph=str(path))
    assert "cannot use the cached graph" in caplog.text
    np.testing.assert_allclose(rebuilt(pixels), plain, rtol=1e-5, atol=1e-6)
    assert path.stat().st_size > 1000


def test_cache_names_follow_the_recipe_and_skip_what_is_not_frozen():
    metadata = _recipe().to_metadata()
    name = frozen_graph_name(metadata)
    assert name.startswith("mobilenet_v2-") and name.endswith(".pb")
    assert frozen_graph_name({**metadata, "pooling": "max"}) != name
    assert frozen_graph_name({**metadata, "weights_fingerprint": "other"}) != name
    assert frozen_graph_name({**metadata, "head": "gs://b/head.keras"}) is None
    assert frozen_graph_name({**metadata, "precision": "bfloat16"}) is None
    hub = FeatureRecipe.from_flags(backbone="dinov2_small", weights="none")
    assert frozen_graph_name(hub.to_metadata()) is None
