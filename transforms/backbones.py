"""The one backbone registry: every pretrained CNN the pipeline can run, as a small frozen spec.

A :class:`BackboneSpec` names a ``keras.applications`` constructor, its default input size, the
module whose ``preprocess_input`` it expects, the feature width of its headless output (the same for
``pooling="avg"`` and ``"max"``: it is the channel count of the last feature map) and, optionally,
named inner layers of the full classifier that can serve as features (VGG16 ``fc2`` -> 4096-d).

:class:`ModelSpec` is what the pipeline actually runs: a backbone plus weights, pooling or layer,
and input size, validated once. :func:`build_model` turns it into a Keras model; it is called in
the worker (``transforms.embed``), never at graph-construction time.

TensorFlow and Keras are imported lazily so that listing, decoding and table code stay light.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from typing import Any

POOLINGS = ("avg", "max")
#: ``bfloat16`` builds the backbone under Keras' ``mixed_bfloat16`` policy (variables stay float32).
PRECISIONS = ("float32", "bfloat16")

#: ``--weights`` keywords; anything else is a local or remote path to a weights or model file.
WEIGHT_KEYWORDS = ("imagenet", "none", "sample")

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
    """

    name: str
    constructor: str
    module: str
    input_size: int
    feature_dim: int
    layers: dict[str, int] = field(default_factory=dict)  # always includes "predictions"
    min_size: int = 32

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
    _spec("vgg16", "VGG16", "vgg16", 224, 512, layers=_VGG_LAYERS),
    _spec("vgg19", "VGG19", "vgg19", 224, 512, layers=_VGG_LAYERS),
    _spec("resnet50", "ResNet50", "resnet", 224, 2048),
    _spec("resnet101", "ResNet101", "resnet", 224, 2048),
    _spec("resnet152", "ResNet152", "resnet", 224, 2048),
    _spec("resnet50_v2", "ResNet50V2", "resnet_v2", 224, 2048),
    _spec("resnet101_v2", "ResNet101V2", "resnet_v2", 224, 2048),
    _spec("resnet152_v2", "ResNet152V2", "resnet_v2", 224, 2048),
    _spec("inception_v3", "InceptionV3", "inception_v3", 299, 2048, min_size=75),
    _spec(
        "inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 299, 1536, min_size=75
    ),
    _spec("xception", "Xception", "xception", 299, 2048, min_size=71),
    _spec("mobilenet", "MobileNet", "mobilenet", 224, 1024),
    _spec("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, 1280),
    _spec("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, 576),
    _spec("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, 960),
    _spec("efficientnet_b0", "EfficientNetB0", "efficientnet", 224, 1280),
    _spec("efficientnet_b1", "EfficientNetB1", "efficientnet", 240, 1280),
    _spec("efficientnet_b2", "EfficientNetB2", "efficientnet", 260, 1408),
    _spec("efficientnet_b3", "EfficientNetB3", "efficientnet", 300, 1536),
    _spec("efficientnet_b4", "EfficientNetB4", "efficientnet", 380, 1792),
    _spec("efficientnet_b5", "EfficientNetB5", "efficientnet", 456, 2048),
    _spec("efficientnet_b6", "EfficientNetB6", "efficientnet", 528, 2304),
    _spec("efficientnet_b7", "EfficientNetB7", "efficientnet", 600, 2560),
    _spec("efficientnet_v2_b0", "EfficientNetV2B0", "efficientnet_v2", 224, 1280),
    _spec("efficientnet_v2_b1", "EfficientNetV2B1", "efficientnet_v2", 240, 1280),
    _spec("efficientnet_v2_b2", "EfficientNetV2B2", "efficientnet_v2", 260, 1408),
    _spec("efficientnet_v2_b3", "EfficientNetV2B3", "efficientnet_v2", 300, 1536),
    _spec("efficientnet_v2_s", "EfficientNetV2S", "efficientnet_v2", 384, 1280),
    _spec("efficientnet_v2_m", "EfficientNetV2M", "efficientnet_v2", 480, 1280),
    _spec("efficientnet_v2_l", "EfficientNetV2L", "efficientnet_v2", 480, 1280),
    _spec("densenet121", "DenseNet121", "densenet", 224, 1024),
    _spec("densenet169", "DenseNet169", "densenet", 224, 1664),
    _spec("densenet201", "DenseNet201", "densenet", 224, 1920),
    _spec("convnext_tiny", "ConvNeXtTiny", "convnext", 224, 768),
    _spec("convnext_small", "ConvNeXtSmall", "convnext", 224, 768),
    _spec("convnext_base", "ConvNeXtBase", "convnext", 224, 1024),
    _spec("convnext_large", "ConvNeXtLarge", "convnext", 224, 1536),
    _spec("convnext_xlarge", "ConvNeXtXLarge", "convnext", 224, 2048),
]

BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in _SPECS}


def get_backbone(name: str) -> BackboneSpec:
    """Looks a backbone up by name (case-insensitive; ``-`` and ``_`` are equivalent).

    Raises:
        ValueError: unknown name, listing every valid one.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    return BACKBONES[key]


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines a feature vector, validated once at construction.

    Attributes:
        backbone: registry name.
        weights: ``"imagenet"`` (Keras' download and cache), ``"none"`` (seeded random init),
            ``"sample"`` (the offline real MobileNetV2 weights, see ``pipeline.sample_weights``,
            resolved to a path by the job before it reaches here) or a local / ``gs://`` path to a
            ``.weights.h5`` / ``.h5`` weights file or a ``.keras`` saved model.
        pooling: ``"avg"`` or ``"max"`` over the last feature map (ignored with ``layer``).
        layer: a named layer of the full classifier (``fc2``) instead of pooled features.
        image_size: square input side; defaults to the backbone's own.
    """

    backbone: str
    weights: str = "imagenet"
    pooling: str = "avg"
    layer: str | None = None
    image_size: int | None = None

    def __post_init__(self):
        spec = get_backbone(self.backbone)
        object.__setattr__(self, "backbone", spec.name)
        if self.weights == "sample":
            raise ValueError("weights='sample' must be resolved to a file path by the job first")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.layer is not None and self.layer not in spec.layers:
            valid = ", ".join(spec.layers)
            raise ValueError(f"unknown layer {self.layer!r} for {spec.name}; valid layers: {valid}")
        size = self.image_size or spec.input_size
        if self.layer is not None and size != spec.input_size:
            raise ValueError(
                f"layer {self.layer!r} needs the full classifier, whose input size is fixed at "
                f"{spec.input_size}; got image_size={size}"
            )
        if size < spec.min_size:
            raise ValueError(f"{spec.name} needs image_size >= {spec.min_size}, got {size}")
        object.__setattr__(self, "image_size", size)

    @property
    def spec(self) -> BackboneSpec:
        return get_backbone(self.backbone)

    @property
    def feature_dim(self) -> int:
        return self.spec.layers[self.layer] if self.layer else self.spec.feature_dim

    @property
    def size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    @property
    def output_name(self) -> str:
        """``pooling=avg`` or ``layer=fc2``: what the vector is."""
        return f"layer={self.layer}" if self.layer else f"pooling={self.pooling}"

    def fingerprint(self) -> str:
        """Identifies the weights: a content hash for files, a description for keywords."""
        if self.weights == "imagenet":
            # Keras verifies each ImageNet download against a hash pinned in its own source.
            return f"keras-applications:{self.spec.constructor}:imagenet"
        if self.weights == "none":
            return f"random-init:seed={RANDOM_INIT_SEED}"
        return weights_fingerprint(self.weights)


def weights_fingerprint(path: str) -> str:
    """A content hash of a weights file's *values* (local or remote).

    HDF5 files (``.h5``, ``.weights.h5``, and the weights inside a ``.keras`` zip) are hashed
    dataset by dataset, in name order, so the same weights saved twice (HDF5 embeds timestamps)
    get the same fingerprint. Other files are hashed byte for byte.
    """
    import io
    import zipfile

    from transforms import storage

    data = storage.read_bytes(path)
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [n for n in archive.namelist() if n.endswith(".h5")]
            if members:
                data = archive.read(members[0])
    if data[:8] != b"\x89HDF\r\n\x1a\n":
        return "sha256:" + hashlib.sha256(data).hexdigest()
    import h5py

    digest = hashlib.sha256()
    with h5py.File(io.BytesIO(data), "r") as f:
        names: list[str] = []
        f.visititems(
            lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
        )
        for name in sorted(names):
            values = f[name][()]
            digest.update(f"{name}|{values.dtype}|{values.shape}".encode())
            digest.update(values.tobytes() if hasattr(values, "tobytes") else repr(values).encode())
    return "h5-values-sha256:" + digest.hexdigest()


def preprocess_fn(spec: BackboneSpec):
    """The backbone's ``keras.applications.<module>.preprocess_input``."""
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


def build_model(model_spec: ModelSpec, *, weights_path: str | None = None):
    """Builds the headless Keras model that maps preprocessed pixels to feature vectors.

    Args:
        model_spec: what to build.
        weights_path: a *local* copy of ``model_spec.weights`` when it is a file (the caller
            fetches remote files first); ignored for keywords.

    Returns:
        A ``keras.Model`` from ``(batch, size, size, 3)`` float32 to ``(batch, feature_dim)``.
    """
    import keras

    spec = model_spec.spec
    constructor = getattr(keras.applications, spec.constructor)
    keyword = model_spec.weights in ("imagenet", "none")
    weights = "imagenet" if model_spec.weights == "imagenet" else None
    if model_spec.weights == "none":
        keras.utils.set_random_seed(RANDOM_INIT_SEED)

    if model_spec.layer:
        full = constructor(include_top=True, weights=weights)
        if not keyword:
            _load_file_weights(full, weights_path)
        layer = full.get_layer(model_spec.layer)
        return keras.Model(full.inputs, layer.output, name=f"{spec.name}_{model_spec.layer}")

    size = model_spec.image_size
    model = constructor(
        include_top=False, weights=weights, input_shape=(size, size, 3), pooling=model_spec.pooling
    )
    if not keyword:
        _load_file_weights(model, weights_path)
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


def build_classifier(model_spec: ModelSpec, head, *, weights_path: str | None = None):
    """One Keras model: raw pixels -> preprocessing -> frozen backbone -> ``head``.

    The backbone is called with ``training=False`` so its BatchNorm layers stay in inference
    mode even when some of its layers are later unfrozen for fine-tuning (Keras' advice).
    """
    import keras

    from transforms.keras_layers import Preprocess

    backbone = build_model(model_spec, weights_path=weights_path)
    backbone.trainable = False
    size = model_spec.image_size
    pixels = keras.Input((size, size, 3), name="pixels")
    features = backbone(Preprocess(model_spec.backbone, name="preprocess")(pixels), training=False)
    outputs = head(features)
    return keras.Model(pixels, outputs, name=f"{model_spec.backbone}_classifier")
