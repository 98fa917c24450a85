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
the family has them (zero-shot). The staging itself is ``transforms.models.weights.stage``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline import cli
from transforms.models.registry import get_backbone
from transforms.models.weights.stage import stage


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("pipeline.stage_weights", description=cli.plain(__doc__))
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
    try:
        weights = args.weights or get_backbone(args.backbone).default_weights
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
