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
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from pipeline import cli
from transforms import model_io, sample_weights, storage
from transforms.backbones import build_model, get_backbone
from transforms.recipe import WEIGHT_KEYWORDS, FeatureRecipe

_LOG = logging.getLogger(__name__)


def stage(backbone: str, weights: str, destination: str) -> str:
    """Writes the backbone's full model with ``weights`` under ``destination``; returns its URI."""
    import keras

    if weights not in WEIGHT_KEYWORDS:
        raise ValueError(f"--weights must be one of {WEIGHT_KEYWORDS}, got {weights!r}")
    spec = get_backbone(backbone)
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


def main(argv: Sequence[str] | None = None) -> None:
    cli.configure_logging()
    parser = argparse.ArgumentParser(prog="python -m pipeline.stage_weights", description=__doc__)
    parser.add_argument("--backbone", required=True, help="a registered backbone, e.g. resnet50")
    parser.add_argument(
        "--weights", default="imagenet", choices=WEIGHT_KEYWORDS, help="default: %(default)s"
    )
    parser.add_argument("--to", required=True, help="destination folder (local or gs://)")
    args = parser.parse_args(argv)
    uri = stage(args.backbone, args.weights, args.to)
    print(uri)
    print(f"use it with: --backbone {args.backbone} --weights {uri}")


if __name__ == "__main__":
    main()
