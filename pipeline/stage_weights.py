"""Stage a backbone's weights to a folder or bucket, so that workers never download them.

    python -m pipeline.stage_weights --backbone resnet50 --to gs://BUCKET/weights
    # prints gs://BUCKET/weights/resnet50-imagenet.keras; then, on the cluster:
    python -m pipeline.extract ... --backbone resnet50 --weights gs://BUCKET/weights/resnet50-imagenet.keras

With ``--weights imagenet`` (the default) this runs where Keras can download its ImageNet weights
(your workstation or the launcher), builds the *full* classifier (``include_top=True``) and saves
it as one ``.keras`` file. That one file serves every use of the backbone: pooled vectors at any
input size, named layers such as VGG16's ``fc2``, and the ImageNet ``predictions``. Worker VMs
(Dataflow, Flink, Dask) then copy it from the bucket once per machine (``--cache-dir``) instead of
each worker process fetching it from the internet, which private-IP workers often cannot reach.

``--weights sample`` stages the offline sample MobileNetV2; ``--weights none`` stages the seeded
random network (useful for testing a deployment).

KerasHub backbones (DINOv2, SigLIP, CLIP, ...) are staged as a KerasHub preset folder:

    python -m pipeline.stage_weights --backbone dinov2_small --to gs://BUCKET/weights
    # prints gs://BUCKET/weights/dinov2_small-preset; then --weights gs://BUCKET/weights/dinov2_small-preset

``--weights`` is then ``preset`` (the registry's KerasHub handle, the default), a ``kaggle://`` /
``hf://`` handle, or a Transformers-format folder, which is converted once here. The folder holds
the backbone, the image converter with the preprocessing the source states (so vectors made from
the staged copy equal those made from the source), and the tokenizer and text preprocessor where
the family has them (zero-shot).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import tempfile
from collections.abc import Sequence

from pipeline import cli
from transforms import model_io, sample_weights, storage
from transforms.backbones import build_model, get_backbone
from transforms.recipe import WEIGHT_KEYWORDS, FeatureRecipe

_LOG = logging.getLogger(__name__)


def stage(backbone: str, weights: str, destination: str) -> str:
    """Writes the backbone's full model with ``weights`` under ``destination``; returns its URI."""
    import keras

    spec = get_backbone(backbone)
    if spec.kind == "keras_hub":
        return _stage_hub(spec, weights, destination)
    if weights not in WEIGHT_KEYWORDS:
        raise ValueError(f"--weights must be one of {WEIGHT_KEYWORDS}, got {weights!r}")
    if weights == "sample":
        if spec.name != sample_weights.BACKBONE:
            raise ValueError(f"the sample weights are for {sample_weights.BACKBONE} only")
        path = sample_weights.ensure_sample_weights()
        headless = FeatureRecipe(
            backbone=spec.name, weights=path, image_size=sample_weights.IMAGE_SIZE
        )  # the sample has no ImageNet top
        model = build_model(headless, weights_path=path)
    elif weights == "none":
        model = build_model(FeatureRecipe(backbone=spec.name, weights="none", layer="predictions"))
    else:
        model = getattr(keras.applications, spec.constructor)(include_top=True, weights="imagenet")
    uri = storage.join(destination, f"{spec.name}-{weights}.keras")
    model_io.save_keras(model, uri)
    return uri


def _stage_hub(spec, weights: str, destination: str) -> str:
    """Saves a KerasHub backbone (with its converter, tokenizer and preprocessor) as a preset
    folder under ``destination``; returns its URI."""
    import keras_hub

    from transforms import hub

    if weights in ("none", "imagenet", "sample"):
        raise ValueError(
            f"{spec.name} is a KerasHub backbone: stage --weights preset, a kaggle:// or hf:// "
            "handle, or a checkpoint folder (a random init is built on each worker)"
        )
    recipe = FeatureRecipe.from_flags(backbone=spec.name, weights=weights)
    source = spec.handle if weights == hub.PRESET else weights
    local = storage.local_copy(source, _cache()) if recipe.weights_file else source
    prep = hub.read_preprocessing(spec, weights, local_dir=local if recipe.weights_file else None)
    tag = weights if weights == hub.PRESET else _slug(weights)
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
        if spec.family in hub.ZERO_SHOT:
            preprocessor_class = hub.ZERO_SHOT[spec.family][0]
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


def _cache() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "featurebeam", "weights")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("pipeline.stage_weights", description=__doc__)
    parser.add_argument("--backbone", required=True, help="a registered backbone, e.g. resnet50")
    parser.add_argument(
        "--weights",
        default=None,
        help="CNNs: imagenet (the default), sample or none. KerasHub backbones: preset (the "
        "default), a kaggle:// or hf:// handle, or a Transformers-format folder",
    )
    parser.add_argument("--to", required=True, help="destination folder (local or gs://)")
    return parser


def run(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Parses flags and stages the weights; returns ``{"backbone", "uri"}`` (the staged copy)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    weights = args.weights or (
        "preset" if get_backbone(args.backbone).kind == "keras_hub" else "imagenet"
    )
    try:
        uri = stage(args.backbone, weights, args.to)
    except ValueError as exc:
        parser.error(str(exc))
    return {"backbone": args.backbone, "uri": uri}


def main(argv: Sequence[str] | None = None) -> None:
    staged = cli.run_main(run, argv)
    print(staged["uri"])
    print(f"use it with: --backbone {staged['backbone']} --weights {staged['uri']}")


if __name__ == "__main__":
    main()
