"""Staging a backbone's weights to a folder or bucket, so that workers never download them.

A ``keras.applications`` CNN is staged as its *full* classifier (``include_top=True``) in one
``.keras`` file, which serves every use of the backbone: pooled vectors at any input size, named
layers such as VGG16's ``fc2``, and the ImageNet ``predictions``. ``imagenet`` weights are
downloaded here (where Keras can reach them); ``sample`` stages the offline MobileNetV2 (headless:
it has no ImageNet top), ``none`` the seeded random network.

A KerasHub backbone is staged as a KerasHub preset folder: the backbone, the image converter with
the preprocessing its source states (so vectors made from the staged copy equal those made from the
source), and the tokenizer and text preprocessor where the family has them (zero-shot). A
Transformers-format source is converted once, here.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile

from transforms import storage
from transforms.models.build import build_model
from transforms.models.recipe import FeatureRecipe
from transforms.models.registry import get_backbone
from transforms.models.saving import save_keras
from transforms.models.specs import IMAGENET, NONE, PREDICTIONS, PRESET, SAMPLE
from transforms.models.weights import checkpoints, sample
from transforms.models.weights.cache import cache_dir
from transforms.models.zero_shot import ZERO_SHOT

_LOG = logging.getLogger(__name__)


def stage(backbone: str, weights: str, destination: str) -> str:
    """Writes the backbone's full model with ``weights`` under ``destination``; returns its URI."""
    import keras

    spec = get_backbone(backbone)
    if spec.is_hub:
        return _stage_hub(spec, weights, destination)
    cnn_keywords = (IMAGENET, SAMPLE, NONE)
    if weights not in cnn_keywords:
        raise ValueError(f"--weights must be one of {cnn_keywords}, got {weights!r}")
    if weights == SAMPLE:
        if spec.name != sample.BACKBONE:
            raise ValueError(f"the sample weights are for {sample.BACKBONE} only")
        path = sample.ensure_sample_weights()
        headless = FeatureRecipe(
            backbone=spec.name, weights=path, image_size=sample.IMAGE_SIZE
        )  # the sample has no ImageNet top
        model = build_model(headless, weights_path=path)
    elif weights == NONE:
        model = build_model(FeatureRecipe(backbone=spec.name, weights=NONE, layer=PREDICTIONS))
    else:
        model = getattr(keras.applications, spec.constructor)(include_top=True, weights="imagenet")
    uri = storage.join(destination, f"{spec.name}-{weights}.keras")
    save_keras(model, uri)
    return uri


def _stage_hub(spec, weights: str, destination: str) -> str:
    """Saves a KerasHub backbone (with its converter, tokenizer and preprocessor) as a preset
    folder under ``destination``; returns its URI."""
    import keras_hub

    if weights in (NONE, IMAGENET, SAMPLE):
        raise ValueError(
            f"{spec.name} is a KerasHub backbone: stage --weights preset, a kaggle:// or hf:// "
            "handle, or a checkpoint folder (a random init is built on each worker)"
        )
    recipe = FeatureRecipe.from_flags(backbone=spec.name, weights=weights)
    source = checkpoints.preset_source(spec, weights)
    local = storage.local_copy(source, cache_dir("weights")) if recipe.weights_file else source
    prep = checkpoints.read_preprocessing(
        spec, weights, local_dir=local if recipe.weights_file else None
    )
    tag = weights if weights == PRESET else _slug(weights)
    uri = storage.join(destination, f"{spec.name}-{tag}")
    with tempfile.TemporaryDirectory() as tmp:
        backbone = keras_hub.models.Backbone.from_preset(local)
        backbone.save_to_preset(tmp)
        size = recipe.tower.image_size
        converter = getattr(keras_hub.layers, spec.fam.converter_class)(
            image_size=(size, size),
            scale=list(prep.scale),
            offset=list(prep.offset),
            interpolation=prep.interpolation,
        )
        converter.save_to_preset(tmp)
        if spec.family in ZERO_SHOT:
            preprocessor_class = ZERO_SHOT[spec.family][0]
            try:
                preprocessor = getattr(keras_hub.models, preprocessor_class).from_preset(local)
            except Exception as exc:  # a checkpoint without a tokenizer: images only
                _LOG.warning("%s has no text preprocessor (%s): staging images only", source, exc)
            else:
                preprocessor.save_to_preset(tmp)
                converter.save_to_preset(tmp)  # the preprocessor saved its own; keep the source's
        for root, _, files in os.walk(tmp):
            for name in files:
                path = os.path.join(root, name)
                relative = os.path.relpath(path, tmp).replace(os.sep, "/")
                data = pathlib.Path(path).read_bytes()
                storage.write_atomically(storage.join(uri, relative), lambda f, d=data: f.write(d))
    return uri


def _slug(weights: str) -> str:
    return "".join(
        c if c.isalnum() or c in "-_." else "_" for c in weights.rstrip("/").split("/")[-1]
    )
