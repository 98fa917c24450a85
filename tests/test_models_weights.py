"""transforms/models/weights: the one cache folder, keyword resolution, and fingerprints that
follow the weight values (not the file's bytes)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from transforms.models import weights
from transforms.models.registry import get_backbone
from transforms.models.weights.cache import cache_dir


def test_the_cache_folder_is_featurebeam_cache_else_the_platform_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATUREBEAM_CACHE", str(tmp_path / "fb"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("weights") == str(tmp_path / "fb" / "weights")
    monkeypatch.delenv("FEATUREBEAM_CACHE")
    assert cache_dir() == str(tmp_path / "xdg" / "featurebeam")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir("weights") == os.path.expanduser("~/.cache/featurebeam/weights")


def test_the_handler_and_the_sample_weights_use_that_folder(monkeypatch, tmp_path):
    from transforms.embed.handler import BackboneModelHandler
    from transforms.models.recipe import FeatureRecipe

    monkeypatch.setenv("FEATUREBEAM_CACHE", str(tmp_path))
    handler = BackboneModelHandler(FeatureRecipe("mobilenet_v3_small", weights="none"))
    assert handler._cache_dir == str(tmp_path / "weights")
    from transforms.models.weights import sample

    assert sample.default_cache_dir() == str(tmp_path)


@pytest.mark.parametrize(
    "given,expected",
    [
        ("imagenet", "imagenet"),
        ("NONE", "none"),
        ("preset", "preset"),
        ("hf://org/m", "hf://org/m"),
    ],
)
def test_keywords_and_handles_resolve_as_they_are(given, expected):
    assert weights.resolve_weights("mobilenet_v2", given) == (expected, None)


def test_a_missing_weights_file_and_sample_for_another_backbone_are_clear():
    with pytest.raises(ValueError, match="--weights file not found: /no/such.h5"):
        weights.resolve_weights("resnet50", "/no/such.h5")
    with pytest.raises(ValueError, match="only available for --backbone mobilenet_v2"):
        weights.resolve_weights("resnet50", "sample")


def test_fingerprints_name_keywords_and_hash_values(tmp_path):
    assert weights.fingerprint(get_backbone("resnet50"), "imagenet") == (
        "keras-applications:ResNet50:imagenet"
    )
    assert weights.fingerprint(get_backbone("resnet50"), "none") == "random-init:seed=1234"
    import h5py

    for name, value in (("a.h5", 1.0), ("b.h5", 1.0), ("c.h5", 2.0)):
        with h5py.File(tmp_path / name, "w") as f:
            f["layer/kernel"] = np.full((2, 2), value, np.float32)
            f.attrs["saved_at"] = name  # differs in every file, as HDF5 timestamps do
    a, b, c = (weights.weights_fingerprint(str(tmp_path / n)) for n in ("a.h5", "b.h5", "c.h5"))
    assert a == b != c and a.startswith("h5-values-sha256:")
