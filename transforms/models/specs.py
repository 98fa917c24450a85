"""The shapes of the registry's entries, and the words every floor of the model wing shares.

A :class:`BackboneSpec` is a ``keras.applications`` CNN; a :class:`HubSpec` is one KerasHub preset,
of a :class:`Family` (what the presets of one KerasHub model family share: its classes, how its
image tower is read out, its Transformers ``model_type`` names, its reference preprocessing). The
entries themselves are in ``transforms.models.registry``; nothing here imports Keras (KerasHub's
preset lists are read lazily, for parameter counts and handles).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any

from transforms.images import CROP, DEFAULT_INTERPOLATION, SQUASH

#: The two family kinds: a ``keras.applications`` CNN, or a KerasHub preset.
KERAS_APPLICATIONS = "keras_applications"
KERAS_HUB = "keras_hub"

#: Poolings of the ``keras.applications`` CNNs, over the last feature map.
POOLINGS = ("avg", "max")
#: Poolings of the KerasHub towers (after the final norm): ``cls`` the class token (DINOv2/v3,
#: ViT), SigLIP's attention-pooled output or CLIP's projected image embedding; ``avg`` the mean of
#: the patch tokens (class and register tokens excluded); ``cls_avg`` both, concatenated.
HUB_POOLINGS = ("cls", "avg", "cls_avg")
#: ``bfloat16`` builds the backbone under Keras' ``mixed_bfloat16`` policy (variables stay float32).
PRECISIONS = ("float32", "bfloat16")
#: Every classifier's ImageNet top: ``--layer predictions`` gives the 1000 class probabilities.
PREDICTIONS = "predictions"

#: ``--weights`` keywords. ``imagenet``: Keras' own download (CNNs); ``preset``: the entry's KerasHub
#: preset (KerasHub backbones); ``none``: a seeded random init; ``sample``: the offline real
#: MobileNetV2 (``transforms.models.weights.sample``), resolved to its cached file. Anything else is
#: a local or remote path, or a ``kaggle://`` / ``hf://`` handle (KerasHub backbones).
IMAGENET = "imagenet"
PRESET = "preset"
NONE = "none"
SAMPLE = "sample"
WEIGHT_KEYWORDS = (IMAGENET, PRESET, NONE, SAMPLE)
#: KerasHub handles, passed to KerasHub as they are.
HANDLE_SCHEMES = ("kaggle://", "hf://")
#: Seed for ``--weights none``: every worker process must build the *same* random network.
RANDOM_INIT_SEED = 1234


def is_handle(weights: str) -> bool:
    """A ``kaggle://`` or ``hf://`` KerasHub handle."""
    return weights.startswith(HANDLE_SCHEMES)


@dataclass(frozen=True)
class BackboneSpec:
    """A registered ``keras.applications`` CNN.

    Attributes:
        name: the registry key users type (``resnet50``).
        constructor: attribute of ``keras.applications`` (``ResNet50``).
        module: ``keras.applications`` submodule holding its ``preprocess_input``.
        input_size: default square input side in pixels.
        feature_dim: width of the pooled headless output (the same for ``avg`` and ``max``: the
            channel count of the last feature map).
        layers: named layers of the full (``include_top=True``) model usable as features,
            mapped to their widths (always includes ``predictions``).
        min_size: the smallest input side Keras accepts for the headless model.
        params_m: parameters of the full classifier, in millions, as the Keras applications
            table states them (an upper bound of the headless model's; sizes memory).
    """

    name: str
    constructor: str
    module: str
    input_size: int
    feature_dim: int
    layers: dict[str, int] = field(default_factory=dict)
    min_size: int = 32
    params_m: float = 0.0

    kind = KERAS_APPLICATIONS
    is_hub = False
    family = KERAS_APPLICATIONS
    poolings = POOLINGS
    default_pooling = "avg"
    default_resize = SQUASH
    default_weights = IMAGENET
    interpolation = DEFAULT_INTERPOLATION

    @property
    def preprocessing(self) -> str:
        """The dotted name of the preprocessing function (recorded in table metadata)."""
        return f"keras.applications.{self.module}.preprocess_input"


@dataclass(frozen=True)
class Family:
    """What the presets of one KerasHub model family share.

    Attributes:
        name: family key (``dinov2``).
        backbone_class: the ``keras_hub.models`` class a preset of this family loads as.
        converter_class: its ``keras_hub.layers`` image converter.
        presets_module: KerasHub's module listing the family's presets (plain dicts).
        input_key: the image input's name in the KerasHub functional model (None: it takes a
            bare tensor).
        model_types: Transformers ``model_type`` values KerasHub 0.32 converts for this family
            (empty: KerasHub reads only its own preset format).
        resizable: position embeddings are interpolated (or rotary), so any multiple of the patch
            size works; otherwise the input size is the preset's.
        published: ``(mean, std, interpolation)`` from the model card, used only for a random
            init, which has no preset to read them from.
        default_resize: how images are fitted to the square input by the reference processor
            (``crop``: resize the short side, centre crop; ``squash``: resize both sides).
        text_tower: the family has a text tower (zero-shot classification).
    """

    name: str
    backbone_class: str
    converter_class: str
    presets_module: str
    input_key: str | None
    model_types: tuple[str, ...]
    resizable: bool
    published: tuple[tuple[float, ...], tuple[float, ...], str]
    default_resize: str
    text_tower: bool = False


#: Reference normalisations (mean, std), used only for a random init, which has no preset to read.
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

FAMILIES = {
    f.name: f
    for f in (
        Family(
            "dinov2",
            "DINOV2Backbone",
            "DINOV2ImageConverter",
            "dinov2.dinov2_presets",
            "images",
            ("dinov2", "dinov2_with_registers"),
            resizable=True,
            published=(*_IMAGENET, "bicubic"),
            default_resize=CROP,
        ),
        Family(
            "dinov3",
            "DINOV3Backbone",
            "DINOV3ImageConverter",
            "dinov3.dinov3_presets",
            "pixel_values",
            ("dinov3_vit",),
            resizable=True,
            published=(*_IMAGENET, "bicubic"),
            default_resize=CROP,
        ),
        Family(
            "vit",
            "ViTBackbone",
            "ViTImageConverter",
            "vit.vit_presets",
            None,
            ("vit",),
            resizable=False,
            published=(*_HALF, "bilinear"),
            default_resize=SQUASH,
        ),
        Family(
            "siglip",
            "SigLIPBackbone",
            "SigLIPImageConverter",
            "siglip.siglip_presets",
            "images",
            (),
            resizable=False,
            published=(*_HALF, "bicubic"),
            default_resize=SQUASH,
            text_tower=True,
        ),
        Family(
            "clip",
            "CLIPBackbone",
            "CLIPImageConverter",
            "clip.clip_presets",
            "images",
            (),
            resizable=False,
            published=(*_CLIP, "bicubic"),
            default_resize=CROP,
            text_tower=True,
        ),
        Family(
            "metaclip_2",
            "MetaCLIP2Backbone",
            "MetaCLIP2ImageConverter",
            "metaclip_2.metaclip_2_presets",
            "images",
            ("metaclip_2",),
            resizable=False,
            published=(*_CLIP, "bicubic"),
            default_resize=CROP,
            text_tower=True,
        ),
    )
}


@dataclass(frozen=True)
class HubSpec:
    """A registered KerasHub backbone (one preset).

    Attributes:
        name: registry key, the KerasHub preset name (``dinov2_small``).
        family: :data:`FAMILIES` key.
        input_size: the preset's input side in pixels.
        patch_size: the patch side; input sizes must be a multiple of it.
        config: the preset's architecture, as keyword arguments of the family's KerasHub
            class(es); ``vision`` / ``text`` / ``projection_dim`` for two-tower families.
    """

    name: str
    family: str
    input_size: int
    patch_size: int
    config: dict[str, Any] = field(default_factory=dict)

    kind = KERAS_HUB
    is_hub = True
    default_weights = PRESET
    layers: dict[str, int] = field(default_factory=dict, init=False)  # no named layers

    @property
    def fam(self) -> Family:
        return FAMILIES[self.family]

    @property
    def poolings(self) -> tuple[str, ...]:
        return HUB_POOLINGS

    @property
    def default_pooling(self) -> str:
        return "cls"

    @property
    def default_resize(self) -> str:
        return self.fam.default_resize

    @property
    def min_size(self) -> int:
        return self.patch_size

    @property
    def feature_dim(self) -> int:
        return self.tower().widths[self.default_pooling]

    def tower(self) -> Tower:
        """The image tower this entry's preset builds."""
        config = self.config
        if self.fam.text_tower:
            vision = config["vision"]
            return Tower(
                vision["hidden_dim"], config["projection_dim"], self.patch_size, self.input_size
            )
        return Tower(config["hidden_dim"], None, self.patch_size, self.input_size)

    @property
    def params_m(self) -> float:
        """Parameters in millions, as KerasHub's preset list states them (both towers)."""
        return _preset_params(self.fam.presets_module)[self.name] / 1e6

    @property
    def handle(self) -> str:
        """The versioned KerasHub handle of the preset (``kaggle://keras/...``), from KerasHub."""
        return _preset_handles(self.fam.presets_module)[self.name]


@dataclass(frozen=True)
class Tower:
    """The shape of an image tower: what the widths and the input size depend on.

    Attributes:
        hidden_dim: token width (the ``avg`` width).
        projection_dim: CLIP-style projected embedding width (the ``cls`` width), or None.
        patch_size: patch side in pixels.
        image_size: the input side its position embeddings were made for.
    """

    hidden_dim: int
    projection_dim: int | None
    patch_size: int
    image_size: int

    @property
    def widths(self) -> dict[str, int]:
        """Vector width per pooling."""
        cls = self.projection_dim or self.hidden_dim
        return {"cls": cls, "avg": self.hidden_dim, "cls_avg": cls + self.hidden_dim}


@functools.cache
def _preset_params(module: str) -> dict[str, int]:
    presets = importlib.import_module(f"keras_hub.src.models.{module}").backbone_presets
    return {name: int(entry["metadata"]["params"]) for name, entry in presets.items()}


@functools.cache
def _preset_handles(module: str) -> dict[str, str]:
    presets = importlib.import_module(f"keras_hub.src.models.{module}").backbone_presets
    return {name: entry["kaggle_handle"] for name, entry in presets.items()}


@dataclass(frozen=True)
class Preprocessing:
    """``pixels * scale + offset`` per channel (pixels 0-255), and the resize interpolation:
    KerasHub's ``ImageConverter`` semantics."""

    scale: tuple[float, float, float]
    offset: tuple[float, float, float]
    interpolation: str
    source: str = "published"  # where the numbers were read: a preset, a file, or the model card

    @classmethod
    def from_mean_std(cls, mean, std, interpolation, *, rescale=1 / 255, source="published"):
        return cls(
            scale=tuple(rescale / s for s in std),
            offset=tuple(-m / s for m, s in zip(mean, std, strict=True)),
            interpolation=interpolation,
            source=source,
        )

    @classmethod
    def from_converter_config(cls, config: dict[str, Any], *, source: str) -> Preprocessing:
        """From an ``ImageConverter`` config (``scale``/``offset`` scalars or per channel)."""

        def triple(value, default):
            if value is None:
                value = default
            if isinstance(value, int | float):
                value = [value] * 3
            return tuple(float(v) for v in value)

        return cls(
            scale=triple(config.get("scale"), 1.0),
            offset=triple(config.get("offset"), 0.0),
            interpolation=str(config.get("interpolation") or DEFAULT_INTERPOLATION),
            source=source,
        )


def describe_preprocessing(p: Preprocessing) -> str:
    """The string recorded as a table's ``preprocessing`` (it decides comparability)."""

    def fmt(values):
        return "[" + ",".join(f"{v:.6g}" for v in values) + "]"

    return f"keras_hub:x*{fmt(p.scale)}+{fmt(p.offset)};interpolation={p.interpolation}"


def check_image_size(spec: HubSpec, tower: Tower, size: int) -> None:
    """Raises ValueError unless ``size`` suits the tower (a patch multiple; fixed for towers
    whose position embeddings do not follow the input)."""
    patch_size, preset_size = tower.patch_size, tower.image_size
    if not spec.fam.resizable and size == preset_size:
        return  # the preset's own size (SigLIP so400m/14 at 384 is not a multiple: conv drops 6 px)
    if size % patch_size:
        lower = max(patch_size, size // patch_size * patch_size)
        raise ValueError(
            f"{spec.name}: --image-size must be a multiple of the patch size {patch_size}, "
            f"got {size} (try {lower} or {lower + patch_size})"
        )
    if not spec.fam.resizable and size != preset_size:
        raise ValueError(
            f"{spec.name}: {spec.family} position embeddings are fixed at {preset_size} px in "
            f"KerasHub; --image-size {size} is not supported (pick a preset of that size)"
        )
