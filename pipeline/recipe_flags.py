"""The recipe flags every job that makes or serves vectors takes (``--backbone``, ``--weights``,
``--pooling``, ``--layer``, ``--image-size``, ``--resize``, ``--precision``, ``--l2-normalize``).

They default to "not given", so that a job serving a trained head can tell a flag the user typed
(which must agree with the recorded recipe) from a default (which the recorded recipe replaces);
the defaults themselves are stated once, in ``transforms.models.recipe``.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.cli import Switch
from transforms.images import RESIZE_MODES
from transforms.models import recipe as recipes
from transforms.models.recipe import FeatureRecipe
from transforms.models.specs import HUB_POOLINGS, POOLINGS, PRECISIONS, BackboneSpec

RECIPE_FLAGS = (
    "backbone",
    "weights",
    "pooling",
    "layer",
    "image_size",
    "resize",
    "precision",
    "l2_normalize",
)


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that make a :class:`FeatureRecipe`; each defaults to None ("not given")."""
    group = parser.add_argument_group("feature recipe (what makes a vector)")
    group.add_argument(
        "--backbone",
        default=None,
        help="a registered backbone (see featurebeam backbones), or several comma-separated "
        "(extract: one decode pass, one table per backbone) "
        f"(default: {recipes.DEFAULT_BACKBONE})",
    )
    group.add_argument(
        "--weights",
        default=None,
        help="CNNs: imagenet (Keras download + cache), none (seeded random init), sample "
        "(offline real MobileNetV2 weights, see featurebeam sample-weights), or a local / gs:// path "
        f"to a .weights.h5, .h5 or .keras file (default: {BackboneSpec.default_weights}). KerasHub "
        "backbones: preset (the registry's KerasHub preset, downloaded; the default), none, a "
        "kaggle:// or hf:// handle, or a local / gs:// directory in KerasHub preset or "
        "Transformers format (config.json + model.safetensors)",
    )
    group.add_argument(
        "--pooling",
        default=None,
        choices=tuple(dict.fromkeys((*POOLINGS, *HUB_POOLINGS))),
        help="CNNs: avg or max over the last feature map (default avg). KerasHub backbones: cls "
        "(class token / SigLIP's pooled output / CLIP's projected embedding; the default), avg "
        "(mean of the patch tokens) or cls_avg (both concatenated)",
    )
    group.add_argument(
        "--layer",
        default=None,
        help="use a named layer of the full classifier (e.g. VGG16 fc2) (default: none, the "
        "pooled last feature map)",
    )
    group.add_argument(
        "--image-size",
        default=None,
        help="square input side (default: the backbone's); with several backbones, one for all "
        "or one each (224,160)",
    )
    group.add_argument(
        "--resize",
        default=None,
        choices=RESIZE_MODES,
        help="squash the whole image to the square input, or crop its centre first "
        f"(default: the backbone's reference: {recipes.DEFAULT_RESIZE} for CNNs, SigLIP and ViT, "
        "crop for DINOv2/v3 and CLIP)",
    )
    group.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="bfloat16 runs the backbone in Keras mixed precision: faster on CPUs with bf16 "
        "support and on GPUs for large convnets, slower for depthwise nets (MobileNet) "
        f"(default: {recipes.DEFAULT_PRECISION})",
    )
    group.add_argument(
        "--l2-normalize",
        action=Switch,
        default=None,
        help="scale every vector to unit length, for cosine retrieval (default: off)",
    )


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe flags the user gave (None for those left out)."""
    return {name: getattr(args, name, None) for name in RECIPE_FLAGS}


#: Recipe flags that may list one value per backbone (``--weights preset,imagenet``).
PER_BACKBONE_FLAGS = ("weights", "pooling", "image_size")


def recipes_from_args(args: argparse.Namespace) -> list[FeatureRecipe]:
    """One recipe per ``--backbone`` in a comma-separated list (a multi-backbone run).

    ``--weights``, ``--pooling`` and ``--image-size`` give one value for every backbone or one
    each, in order;
    the other recipe flags apply to every backbone (None: each backbone's default).

    Raises:
        ValueError: a repeated backbone, a list of the wrong length, or a bad recipe.
    """
    flags = given(args)
    backbones = [b.strip() for b in (flags["backbone"] or "").split(",") if b.strip()] or [None]
    if len(backbones) == 1:
        return [FeatureRecipe.from_flags(**{**flags, "backbone": backbones[0]})]
    per_backbone = {}
    for name in PER_BACKBONE_FLAGS:
        values = [v.strip() for v in str(flags[name]).split(",")] if flags[name] else [None]
        if len(values) not in (1, len(backbones)):
            raise ValueError(
                f"--{name} lists {len(values)} values for {len(backbones)} backbones: give one "
                "for all, or one per backbone"
            )
        per_backbone[name] = values * len(backbones) if len(values) == 1 else values
    if flags["layer"]:
        raise ValueError("--layer names a layer of one backbone: not with several backbones")
    recipes = [
        FeatureRecipe.from_flags(
            **{**flags, "backbone": backbone, **{k: v[i] for k, v in per_backbone.items()}}
        )
        for i, backbone in enumerate(backbones)
    ]
    names = [r.backbone for r in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"--backbone lists a backbone twice: {','.join(names)}")
    return recipes
