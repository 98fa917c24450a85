"""The one backbone registry: every pretrained CNN the pipeline can run, as a small frozen spec.

A :class:`BackboneSpec` names a ``keras.applications`` constructor, its default input size, the
module whose ``preprocess_input`` it expects, the feature width of its headless output (the same for
``pooling="avg"`` and ``"max"``: it is the channel count of the last feature map) and, optionally,
named inner layers of the full classifier that can serve as features (VGG16 ``fc2`` -> 4096-d).

What the pipeline runs is a :class:`transforms.recipe.FeatureRecipe` (backbone plus weights, pooling
or layer, input size, resize, precision). :func:`build_model` turns one into a Keras model; it is
called in the worker (``transforms.embed``), never at graph-construction time.

TensorFlow and Keras are imported lazily so that listing, decoding and table code stay light.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transforms import startup
from transforms.hub import HUB_SPECS, HubSpec

if TYPE_CHECKING:
    from transforms.recipe import FeatureRecipe

#: Poolings of the ``keras.applications`` CNNs (KerasHub towers: ``transforms.hub.HUB_POOLINGS``).
POOLINGS = ("avg", "max")
#: ``bfloat16`` builds the backbone under Keras' ``mixed_bfloat16`` policy (variables stay float32).
PRECISIONS = ("float32", "bfloat16")

#: Seed for ``weights=none``: every worker process must build the *same* random network.
RANDOM_INIT_SEED = 1234


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone.

    Attributes:
        name: the registry key users type (``resnet50``).
        constructor: attribute of ``keras.applications`` (``ResNet50``).
        module: ``keras.applications`` submodule holding its ``preprocess_input``.
        input_size: default square input side in pixels.
        feature_dim: width of the pooled headless output.
        layers: named layers of the full (``include_top=True``) model usable as features,
            mapped to their widths.
        min_size: the smallest input side Keras accepts for the headless model.
        params_m: parameters of the full classifier, in millions, as the Keras applications
            table states them (an upper bound of the headless model's; sizes memory).
    """

    name: str
    constructor: str
    module: str
    input_size: int
    feature_dim: int
    layers: dict[str, int] = field(default_factory=dict)  # always includes "predictions"
    min_size: int = 32
    params_m: float = 0.0

    kind = "keras_applications"
    poolings = POOLINGS
    default_pooling = "avg"
    default_resize = "squash"

    @property
    def preprocessing(self) -> str:
        """The dotted name of the preprocessing function (recorded in table metadata)."""
        return f"keras.applications.{self.module}.preprocess_input"


#: Every classifier's ImageNet top: ``--layer predictions`` gives the 1000 class probabilities.
PREDICTIONS = "predictions"


def _spec(name, constructor, module, input_size, feature_dim, layers=None, **kw) -> BackboneSpec:
    layers = {**(layers or {}), PREDICTIONS: 1000}
    return BackboneSpec(name, constructor, module, input_size, feature_dim, layers=layers, **kw)


_VGG_LAYERS = {"fc1": 4096, "fc2": 4096}

_SPECS = [
    _spec("vgg16", "VGG16", "vgg16", 224, 512, layers=_VGG_LAYERS, params_m=138.4),
    _spec("vgg19", "VGG19", "vgg19", 224, 512, layers=_VGG_LAYERS, params_m=143.7),
    _spec("resnet50", "ResNet50", "resnet", 224, 2048, params_m=25.6),
    _spec("resnet101", "ResNet101", "resnet", 224, 2048, params_m=44.7),
    _spec("resnet152", "ResNet152", "resnet", 224, 2048, params_m=60.4),
    _spec("resnet50_v2", "ResNet50V2", "resnet_v2", 224, 2048, params_m=25.6),
    _spec("resnet101_v2", "ResNet101V2", "resnet_v2", 224, 2048, params_m=44.7),
    _spec("resnet152_v2", "ResNet152V2", "resnet_v2", 224, 2048, params_m=60.4),
    _spec("inception_v3", "InceptionV3", "inception_v3", 299, 2048, min_size=75, params_m=23.9),
    _spec(
        "inception_resnet_v2",
        "InceptionResNetV2",
        "inception_resnet_v2",
        299,
        1536,
        min_size=75,
        params_m=55.9,
    ),
    _spec("xception", "Xception", "xception", 299, 2048, min_size=71, params_m=22.9),
    _spec("mobilenet", "MobileNet", "mobilenet", 224, 1024, params_m=4.3),
    _spec("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, 1280, params_m=3.5),
    _spec("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, 576, params_m=2.6),
    _spec("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, 960, params_m=5.5),
    _spec("efficientnet_b0", "EfficientNetB0", "efficientnet", 224, 1280, params_m=5.3),
    _spec("efficientnet_b1", "EfficientNetB1", "efficientnet", 240, 1280, params_m=7.9),
    _spec("efficientnet_b2", "EfficientNetB2", "efficientnet", 260, 1408, params_m=9.2),
    _spec("efficientnet_b3", "EfficientNetB3", "efficientnet", 300, 1536, params_m=12.3),
    _spec("efficientnet_b4", "EfficientNetB4", "efficientnet", 380, 1792, params_m=19.5),
    _spec("efficientnet_b5", "EfficientNetB5", "efficientnet", 456, 2048, params_m=30.6),
    _spec("efficientnet_b6", "EfficientNetB6", "efficientnet", 528, 2304, params_m=43.3),
    _spec("efficientnet_b7", "EfficientNetB7", "efficientnet", 600, 2560, params_m=66.7),
    _spec("efficientnet_v2_b0", "EfficientNetV2B0", "efficientnet_v2", 224, 1280, params_m=7.2),
    _spec("efficientnet_v2_b1", "EfficientNetV2B1", "efficientnet_v2", 240, 1280, params_m=8.2),
    _spec("efficientnet_v2_b2", "EfficientNetV2B2", "efficientnet_v2", 260, 1408, params_m=10.2),
    _spec("efficientnet_v2_b3", "EfficientNetV2B3", "efficientnet_v2", 300, 1536, params_m=14.5),
    _spec("efficientnet_v2_s", "EfficientNetV2S", "efficientnet_v2", 384, 1280, params_m=21.6),
    _spec("efficientnet_v2_m", "EfficientNetV2M", "efficientnet_v2", 480, 1280, params_m=54.4),
    _spec("efficientnet_v2_l", "EfficientNetV2L", "efficientnet_v2", 480, 1280, params_m=119.0),
    _spec("densenet121", "DenseNet121", "densenet", 224, 1024, params_m=8.1),
    _spec("densenet169", "DenseNet169", "densenet", 224, 1664, params_m=14.3),
    _spec("densenet201", "DenseNet201", "densenet", 224, 1920, params_m=20.2),
    _spec("convnext_tiny", "ConvNeXtTiny", "convnext", 224, 768, params_m=28.6),
    _spec("convnext_small", "ConvNeXtSmall", "convnext", 224, 768, params_m=50.2),
    _spec("convnext_base", "ConvNeXtBase", "convnext", 224, 1024, params_m=88.5),
    _spec("convnext_large", "ConvNeXtLarge", "convnext", 224, 1536, params_m=197.7),
    _spec("convnext_xlarge", "ConvNeXtXLarge", "convnext", 224, 2048, params_m=350.1),
]

#: Every backbone: the ``keras.applications`` CNNs above, then the KerasHub presets
#: (``transforms.hub``: DINOv2/v3, ViT, SigLIP/SigLIP 2, CLIP, MetaCLIP 2).
BACKBONES: dict[str, BackboneSpec | HubSpec] = {spec.name: spec for spec in [*_SPECS, *HUB_SPECS]}


def get_backbone(name: str) -> BackboneSpec | HubSpec:
    """Looks a backbone up by name (case-insensitive; ``-`` and ``_`` are equivalent).

    Raises:
        ValueError: unknown name, listing every valid one.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in BACKBONES:
        close = difflib.get_close_matches(key, BACKBONES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}{hint}; valid backbones: {', '.join(BACKBONES)}"
        )
    return BACKBONES[key]


def preprocess_fn(spec: BackboneSpec | HubSpec):
    """The backbone's ``keras.applications.<module>.preprocess_input``; KerasHub models scale
    their pixels inside the model (by their preset's converter), so theirs only casts."""
    if spec.kind == "keras_hub":
        return lambda pixels: pixels
    return importlib.import_module(f"keras.applications.{spec.module}").preprocess_input


def preprocess(spec: BackboneSpec, pixels: Any) -> Any:
    """Applies the backbone's own ``preprocess_input`` without touching the caller's data.

    Works on numpy arrays (a float32 copy is made first, since Keras may scale in place) and on
    tensors inside a compiled function (cast, which is never in place).
    """
    fn = preprocess_fn(spec)
    if hasattr(pixels, "__array__") and not _is_tensor(pixels):
        import numpy as np

        return fn(np.array(pixels, dtype=np.float32, copy=True))
    import keras

    return fn(keras.ops.cast(pixels, "float32"))


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith(("tensorflow", "keras"))


def build_model(recipe: FeatureRecipe, *, weights_path: str | None = None):
    """Builds the headless Keras model that maps preprocessed pixels to feature vectors.

    Args:
        recipe: what to build; ``recipe.precision == "bfloat16"`` builds it under Keras'
            ``mixed_bfloat16`` policy (variables stay float32).
        weights_path: a *local* copy of ``recipe.weights`` when it is a file or a KerasHub /
            Transformers directory (the caller fetches remote ones first); ignored for keywords.

    Returns:
        A ``keras.Model`` from ``(batch, size, size, 3)`` float32 (after :func:`preprocess`) to
        ``(batch, feature_dim)``.
    """
    with _precision(recipe):
        return _build(recipe, weights_path)


def build_zero_shot(recipe: FeatureRecipe, prompts, *, weights_path: str | None = None):
    """``(image model, head)`` for zero-shot classification by text prompts (two-tower KerasHub
    backbones; see ``transforms.hub.build_zero_shot``), under the recipe's precision."""
    from transforms.hub import build_zero_shot as build

    with _precision(recipe):
        return build(recipe, prompts, local_dir=weights_path)


@contextlib.contextmanager
def _precision(recipe: FeatureRecipe):
    import keras

    previous = keras.mixed_precision.global_policy()
    if recipe.precision == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _build(recipe: FeatureRecipe, weights_path: str | None):
    import keras

    spec = recipe.spec
    if spec.kind == "keras_hub":
        from transforms.hub import build_image_model

        model = build_image_model(recipe, local_dir=weights_path)
        startup.mark("model build + weights")
        return model
    constructor = getattr(keras.applications, spec.constructor)
    from_file = recipe.weights_file is not None
    weights = "imagenet" if recipe.weights == "imagenet" else None
    if recipe.weights == "none":
        keras.utils.set_random_seed(RANDOM_INIT_SEED)

    if recipe.layer:
        full = constructor(include_top=True, weights=weights)
        if from_file:
            _load_file_weights(full, weights_path)
        layer = full.get_layer(recipe.layer)
        return keras.Model(full.inputs, layer.output, name=f"{spec.name}_{recipe.layer}")

    size = recipe.image_size
    model = constructor(
        include_top=False, weights=weights, input_shape=(size, size, 3), pooling=recipe.pooling
    )
    startup.mark("model build")
    if from_file:
        _load_file_weights(model, weights_path)
        startup.mark("weights load")
    return model


def _load_file_weights(model, path: str | None) -> None:
    """Loads a weights file, or the weights of a saved model, into ``model``."""
    import keras

    if path is None:
        raise ValueError("a weights file path is required")
    if path.endswith(".keras"):
        saved = keras.models.load_model(path, compile=False)
        model.set_weights(_matching_weights(model, saved))
        return
    try:
        model.load_weights(path)
    except ValueError:
        # A full saved model in legacy .h5 format, or weights saved with a top: match by shape.
        saved = keras.models.load_model(path, compile=False)
        model.set_weights(_matching_weights(model, saved))


def _matching_weights(model, saved) -> list:
    """The weights of ``saved`` (or of a nested backbone inside it) that fit ``model``.

    Headless Keras applications hold exactly the leading weights of the full classifier, so a
    saved classifier (or a fine-tuned model wrapping a backbone) matches on its leading tensors.
    """
    candidates = [saved] + [layer for layer in saved.layers if hasattr(layer, "layers")]
    shapes = [tuple(w.shape) for w in model.weights]
    for candidate in candidates:
        values = candidate.get_weights()[: len(shapes)]
        if [tuple(v.shape) for v in values] == shapes:
            return values
    raise ValueError(
        f"no part of the saved model {saved.name!r} has weights matching {model.name!r} "
        f"({len(shapes)} tensors)"
    )


def build_classifier(recipe: FeatureRecipe, head, *, weights_path: str | None = None):
    """One Keras model: raw pixels -> preprocessing -> frozen backbone -> ``head``.

    The backbone is called with ``training=False`` so its BatchNorm layers stay in inference
    mode even when some of its layers are later unfrozen for fine-tuning (Keras' advice).
    """
    import keras

    from transforms.keras_layers import Preprocess

    backbone = build_model(recipe, weights_path=weights_path)
    backbone.trainable = False
    size = recipe.image_size
    pixels = keras.Input((size, size, 3), name="pixels")
    features = backbone(Preprocess(recipe.backbone, name="preprocess")(pixels), training=False)
    # Mixed-precision backbones give bfloat16 features; the head was trained on float32 vectors.
    outputs = head(keras.ops.cast(features, "float32"))
    return keras.Model(pixels, outputs, name=f"{recipe.backbone}_classifier")
