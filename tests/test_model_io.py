"""transforms/model_io.py: the head and model folders, and the recipe they carry."""

from __future__ import annotations

import pytest

from transforms import model_io
from transforms.models.recipe import FeatureRecipe


def test_a_folder_without_a_report_is_not_a_head_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not a train_head --model-dir"):
        model_io.read_head_report(str(tmp_path))


def test_a_head_report_gives_back_the_recipe_it_was_trained_on(tmp_path):
    recipe = FeatureRecipe("mobilenet_v3_small", weights="none", image_size=48, resize="crop")
    model_io.write_json(
        str(tmp_path / model_io.REPORT_FILE), {"feature_table_metadata": recipe.to_metadata()}
    )
    assert model_io.head_recipe(model_io.read_head_report(str(tmp_path))) == recipe


def test_a_late_fusion_head_is_refused_for_serving_naming_its_recipes():
    parts = [{"backbone": "resnet50", "pooling": "avg"}, {"backbone": "vgg16", "layer": "fc2"}]
    with pytest.raises(ValueError, match=r"2 recipes \(resnet50/avg, vgg16/fc2\)"):
        model_io.head_recipe({"feature_table_parts": parts, "feature_table_metadata": {}})
