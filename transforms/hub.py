"""KerasHub vision transformers behind the one registry: DINOv2 (with and without registers),
DINOv3, ViT, SigLIP / SigLIP 2, CLIP and MetaCLIP 2.

A :class:`HubSpec` is the registry entry (``transforms.backbones`` holds both kinds); a
:class:`Family` is what the presets of one KerasHub model family share: the KerasHub classes, how
its image tower is read out, its Transformers ``model_type`` names and whether its position
embeddings follow the input size.

Each entry carries the architecture of its preset (the backbone config that the preset's
``config.json`` states), because ``--weights none`` must build the same network offline on every
worker, and the widths must be known before anything is downloaded. The *weights* and the
*preprocessing* are read from the preset itself whenever there is one: ``--weights preset`` (the
entry's KerasHub handle), a ``kaggle://`` / ``hf://`` handle, or a local / ``gs://`` directory in
KerasHub preset format (``image_converter.json``) or Transformers format
(``preprocessor_config.json``). Only a random init, which has no preset, falls back to the
family's published normalisation (:attr:`Family.published`).

Poolings (all after the tower's final norm):

- ``cls``: the class token (DINOv2/v3, ViT); SigLIP's attention-pooled output; CLIP's projected
  image embedding (the vector its text tower is trained against);
- ``avg``: the mean of the patch tokens, excluding class and register tokens;
- ``cls_avg``: the two concatenated (DINOv2's linear-probe recipe).

KerasHub and TensorFlow are imported only when a model is built or a preset is read.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

_LOG = logging.getLogger(__name__)

HUB_POOLINGS = ("cls", "avg", "cls_avg")

#: ``--weights`` keyword for the entry's own KerasHub preset (downloaded where reachable).
PRESET = "preset"
#: Handles passed through to KerasHub as they are.
HANDLE_SCHEMES = ("kaggle://", "hf://")

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


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
            default_resize="crop",
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
            default_resize="crop",
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
            default_resize="squash",
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
            default_resize="squash",
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
            default_resize="crop",
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
            default_resize="crop",
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

    kind = "keras_hub"
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


# --- preprocessing -------------------------------------------------------------------------------


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
            interpolation=str(config.get("interpolation") or "bilinear"),
            source=source,
        )


def describe_preprocessing(p: Preprocessing) -> str:
    """The string recorded as a table's ``preprocessing`` (it decides comparability)."""

    def fmt(values):
        return "[" + ",".join(f"{v:.6g}" for v in values) + "]"

    return f"keras_hub:x*{fmt(p.scale)}+{fmt(p.offset)};interpolation={p.interpolation}"


_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def read_preprocessing(spec: HubSpec, weights: str, local_dir: str | None = None) -> Preprocessing:
    """The preprocessing that goes with ``weights``, read from the preset where there is one.

    Args:
        spec: the registry entry.
        weights: ``none``, ``preset``, a handle, or a directory.
        local_dir: a local copy of a remote directory (read instead of ``weights``).
    """
    prep = _read_preprocessing(spec, weights, local_dir)
    _LOG.info(
        "%s preprocessing (from %s): %s", spec.name, prep.source, describe_preprocessing(prep)
    )
    return prep


def _read_preprocessing(spec: HubSpec, weights: str, local_dir: str | None) -> Preprocessing:
    if weights == "none":
        mean, std, interpolation = spec.fam.published
        return Preprocessing.from_mean_std(mean, std, interpolation)
    source = local_dir or (spec.handle if weights == PRESET else weights)
    if is_handle(weights) or weights == PRESET:
        return _converter_from_preset(source)
    files = _dir_files(source)
    if "image_converter.json" in files:
        return _converter_from_preset(source)
    if "preprocessor_config.json" in files:
        config = json.loads(files["preprocessor_config.json"]())
        mean = config.get("image_mean")
        std = config.get("image_std")
        if mean is not None and std is not None:
            resample = config.get("resample")
            interpolation = _PIL_RESAMPLE.get(resample, spec.fam.published[2])
            return Preprocessing.from_mean_std(
                _triple(mean),
                _triple(std),
                interpolation,
                rescale=float(config.get("rescale_factor", 1 / 255)),
                source="preprocessor_config.json",
            )
    _LOG.warning(
        "%s states no preprocessing (no image_converter.json or preprocessor_config.json): "
        "using %s's published normalisation",
        weights,
        spec.family,
    )
    mean, std, interpolation = spec.fam.published
    return Preprocessing.from_mean_std(mean, std, interpolation)


def _triple(values) -> tuple[float, float, float]:
    if isinstance(values, int | float):
        return (float(values),) * 3
    return tuple(float(v) for v in values)


def _converter_from_preset(preset: str) -> Preprocessing:
    import keras_hub

    converter = keras_hub.layers.ImageConverter.from_preset(preset)
    return Preprocessing.from_converter_config(converter.get_config(), source=preset)


def is_handle(weights: str) -> bool:
    return weights.startswith(HANDLE_SCHEMES)


def _dir_files(uri: str) -> dict[str, Any]:
    """The files directly in a preset directory (local or remote): name -> reader."""
    from transforms import storage

    if not storage.is_dir(uri):
        raise ValueError(f"--weights {uri}: not a directory or a known keyword")
    found = {}
    for info in storage.find_files(uri):
        name = info.uri[len(uri.rstrip("/")) + 1 :]
        found[name] = functools.partial(storage.read_bytes, info.uri)
    return found


# --- checkpoints ---------------------------------------------------------------------------------


def read_dir_tower(spec: HubSpec, uri: str) -> Tower:
    """The image tower a checkpoint directory's ``config.json`` states (so widths, patch and
    input size come from the checkpoint, not the registry entry).

    Raises:
        ValueError: no ``config.json``, a Transformers model type KerasHub cannot convert, or a
            checkpoint of another family.
    """
    files = _dir_files(uri)
    if "config.json" not in files:
        raise ValueError(
            f"--weights {uri}: a KerasHub preset or Transformers checkpoint directory needs a "
            f"config.json; found {', '.join(sorted(files)) or 'nothing'}"
        )
    config = json.loads(files["config.json"]())
    family = spec.fam
    if "model_type" in config:  # Transformers format
        model_type = config["model_type"]
        if model_type not in family.model_types:
            supported = ", ".join(family.model_types) or "none (use a KerasHub preset directory)"
            raise ValueError(
                f"--weights {uri}: Transformers model_type {model_type!r} is not a {spec.family} "
                f"checkpoint KerasHub can convert; {spec.family} accepts: {supported}"
            )
        return _tower_from_transformers(spec.family, config)
    class_name = config.get("class_name") or config.get("registered_name", "")
    if family.backbone_class not in class_name:
        raise ValueError(
            f"--weights {uri}: a KerasHub {class_name or 'unknown'} preset, not a "
            f"{family.backbone_class} ({spec.family})"
        )
    return _tower_from_keras_hub(spec.family, config["config"])


def _side(value) -> int:
    """A size stated as ``n``, ``[n, n]`` or ``[n, n, 3]``."""
    return int(value[0] if isinstance(value, list | tuple) else value)


def _tower_from_transformers(family: str, config: dict[str, Any]) -> Tower:
    if FAMILIES[family].text_tower:
        vision = config["vision_config"]
        projection = config.get("projection_dim") or vision.get("projection_dim")
        return Tower(
            vision["hidden_size"],
            projection,
            _side(vision["patch_size"]),
            _side(vision.get("image_size", 224)),
        )
    return Tower(
        config["hidden_size"],
        None,
        _side(config["patch_size"]),
        _side(config.get("image_size", 224)),
    )


def _tower_from_keras_hub(family: str, config: dict[str, Any]) -> Tower:
    if FAMILIES[family].text_tower:
        vision = config["vision_encoder"]["config"]
        return Tower(
            vision["hidden_dim"],
            config.get("projection_dim"),
            _side(vision["patch_size"]),
            _side(vision["image_shape"]),
        )
    return Tower(
        config["hidden_dim"],
        None,
        _side(config["patch_size"]),
        _side(config.get("image_shape") or 224),
    )


# --- building ------------------------------------------------------------------------------------


def build_image_model(recipe, *, local_dir: str | None = None):
    """A Keras model: float pixels 0-255 ``(batch, size, size, 3)`` -> the recipe's vectors.

    The preset's scale and offset are applied inside the model, then the tower, the pooling and
    (optionally) L2 normalisation. Called in the worker, under the recipe's dtype policy.
    """
    backbone = _load_backbone(recipe.spec, recipe.weights, recipe.image_size, local_dir)
    return _image_model(recipe, backbone)


def _image_model(recipe, backbone):
    import keras

    spec: HubSpec = recipe.spec
    size = recipe.image_size
    prep = recipe.preprocessing_spec
    pixels = keras.Input((size, size, 3), name="pixels")
    x = pixels * keras.ops.convert_to_tensor(prep.scale, "float32") + keras.ops.convert_to_tensor(
        prep.offset, "float32"
    )
    cls, patches = _readout(spec, backbone, x)
    parts = {"cls": [cls], "avg": [keras.ops.mean(patches, axis=1)]}
    parts["cls_avg"] = parts["cls"] + parts["avg"]
    chosen = parts[recipe.pooling]
    features = chosen[0] if len(chosen) == 1 else keras.ops.concatenate(chosen, axis=-1)
    if recipe.l2_normalize:
        features = keras.ops.cast(features, "float32")
        features = features / keras.ops.maximum(
            keras.ops.sqrt(keras.ops.sum(keras.ops.square(features), axis=-1, keepdims=True)),
            1e-12,
        )
    return keras.Model(pixels, features, name=f"{spec.name}_{recipe.pooling}")


#: Zero-shot classification per two-tower family: KerasHub's text preprocessor, the backbone's
#: head (cosine similarity times its learnt scale, plus SigLIP's bias) and how logits become
#: probabilities (CLIP was trained with a softmax over captions, SigLIP with a per-pair sigmoid).
ZERO_SHOT = {
    "clip": ("CLIPPreprocessor", "clip_head", "softmax"),
    "siglip": ("SigLIPPreprocessor", "siglip_head", "sigmoid"),
}
DEFAULT_PROMPT = "a photo of {}."


def check_zero_shot(recipe) -> None:
    """Raises ValueError unless ``recipe`` can classify images by text labels."""
    spec = recipe.spec
    if spec.kind != "keras_hub" or spec.family not in ZERO_SHOT:
        families = ", ".join(ZERO_SHOT)
        raise ValueError(
            f"{spec.name} has no text tower: zero-shot --labels needs a backbone of a "
            f"text-image family ({families}), e.g. siglip2_base_patch16_224"
        )
    if recipe.weights == "none":
        raise ValueError(
            "zero-shot --labels needs a preset's text tower and tokenizer: --weights none has "
            "neither"
        )


def prompts_for(labels: list[str], template: str) -> list[str]:
    """One text per label: ``template`` with ``{}`` replaced by the label."""
    if "{}" not in template:
        raise ValueError(f"--prompt must contain {{}} where the label goes, got {template!r}")
    return [template.replace("{}", label) for label in labels]


def build_zero_shot(recipe, prompts: list[str], *, local_dir: str | None = None):
    """``(image model, head)`` from one loaded two-tower preset: the image model gives the
    ``cls`` embedding, the head maps it to one probability per prompt.

    The prompts are tokenized by the preset's own preprocessor and embedded once, here.
    """
    import keras
    import keras_hub

    check_zero_shot(recipe)
    spec: HubSpec = recipe.spec
    preprocessor_class, head_name, activation = ZERO_SHOT[spec.family]
    source = local_dir or (spec.handle if recipe.weights == PRESET else recipe.weights)
    backbone = _load_backbone(spec, recipe.weights, recipe.image_size, local_dir)
    preprocessor = getattr(keras_hub.models, preprocessor_class).from_preset(source)
    tokens = preprocessor({"prompts": list(prompts), "images": None})["token_ids"]
    text = keras.ops.convert_to_tensor(backbone.get_text_embeddings(tokens))
    image_model = _image_model(recipe, backbone)
    features = keras.Input((image_model.output.shape[-1],), name="image_embedding")
    logits, _ = getattr(backbone, head_name)(features, text)
    probabilities = keras.layers.Activation(activation, dtype="float32")(logits)
    return image_model, keras.Model(features, probabilities, name=f"{spec.name}_zero_shot")


def _readout(spec: HubSpec, backbone, x):
    """``(pooled "cls" vector, patch tokens)`` of the image tower for input tensor ``x``."""
    import keras

    family = spec.family
    if family in ("dinov2", "dinov3", "vit"):
        key = spec.fam.input_key
        tokens = backbone({key: x} if key else x)
        prefix = 1 + int(getattr(backbone, "num_register_tokens", 0) or 0)
        return tokens[:, 0], tokens[:, prefix:]
    encoder = backbone.vision_encoder
    if family == "siglip":
        # The post-norm tokens feed the attention-pooling head; read both in one pass.
        both = keras.Model(encoder.inputs, [encoder.post_layer_norm.output, encoder.output])
        tokens, pooled = both({"images": x})
        return pooled, tokens
    tokens = encoder({"images": x})  # CLIP / MetaCLIP 2: final layer norm over all tokens
    return backbone.vision_projection(tokens[:, 0]), tokens[:, 1:]


def _load_backbone(spec: HubSpec, weights: str, size: int, local_dir: str | None):
    import keras
    import keras_hub

    cls = getattr(keras_hub.models, spec.fam.backbone_class)
    shape = {"image_shape": (size, size, 3)} if spec.fam.resizable else {}
    if weights == "none":
        from transforms.backbones import RANDOM_INIT_SEED

        keras.utils.set_random_seed(RANDOM_INIT_SEED)
        return _random_image_tower(spec, size)
    source = local_dir or (spec.handle if weights == PRESET else weights)
    backbone = cls.from_preset(source, **shape)
    return backbone


def _random_image_tower(spec: HubSpec, size: int):
    """A seeded random image tower of the entry's architecture. Two-tower families get their
    vision encoder (and CLIP's projection) only: a random text tower embeds no image, and
    SigLIP 2's alone holds 256,000 x 768 token embeddings."""
    import types

    import keras
    import keras_hub

    models = keras_hub.models
    config = dict(spec.config)
    shape = (size, size, 3)
    family = spec.family
    if family == "dinov2":
        return models.DINOV2Backbone(**config, image_shape=shape)
    if family == "dinov3":
        return models.DINOV3Backbone(**config, image_shape=shape)
    if family == "vit":
        return models.ViTBackbone(**config, image_shape=shape)
    vision = {**config["vision"], "image_shape": shape}
    encoder_cls = {
        "siglip": models.SigLIPVisionEncoder,
        "clip": models.CLIPVisionEncoder,
        "metaclip_2": models.MetaCLIP2VisionEncoder,
    }[family]
    tower = types.SimpleNamespace(vision_encoder=encoder_cls(**vision))
    if config.get("projection_dim"):
        tower.vision_projection = keras.layers.Dense(
            config["projection_dim"], use_bias=False, name="vision_projection"
        )
    return tower


# --- the registry entries ------------------------------------------------------------------------
# Architectures as the presets' config.json state them (needed for --weights none offline and for
# the widths); the weights and preprocessing always come from the preset when there is one.


def _dinov2(name, hidden, layers, heads, *, registers=0, swiglu=False):
    config = {
        "patch_size": 14,
        "num_layers": layers,
        "hidden_dim": hidden,
        "num_heads": heads,
        "intermediate_dim": hidden * 4,
        "num_register_tokens": registers,
        "use_swiglu_ffn": swiglu,
        "position_embedding_shape": (518, 518),
        "antialias_in_interpolation": registers > 0,
    }
    return HubSpec(name, "dinov2", 224, 14, config)


def _dinov3(name, hidden, layers, heads, intermediate, *, gated=False):
    config = {
        "patch_size": 16,
        "num_layers": layers,
        "hidden_dim": hidden,
        "num_heads": heads,
        "intermediate_dim": intermediate,
        "num_register_tokens": 4,
        "use_gated_mlp": gated,
        "hidden_activation": "silu" if gated else "gelu",
        "use_key_bias": False,
    }
    return HubSpec(name, "dinov3", 224, 16, config)


def _vit(name, size, patch, hidden, layers, heads):
    config = {
        "patch_size": patch,
        "num_layers": layers,
        "hidden_dim": hidden,
        "num_heads": heads,
        "mlp_dim": hidden * 4,
    }
    return HubSpec(name, "vit", size, patch, config)


_SIGLIP_TOWERS = {  # hidden, layers, heads, intermediate (the same for both towers)
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "so400m": (1152, 27, 16, 4304),
}


def _siglip(name, size, patch, tower, *, vocabulary):
    hidden, layers, heads, intermediate = _SIGLIP_TOWERS[tower]
    common = {
        "hidden_dim": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "intermediate_dim": intermediate,
    }
    text = {**common, "vocabulary_size": vocabulary, "embedding_dim": hidden}
    config = {"vision": {**common, "patch_size": patch}, "text": text, "projection_dim": None}
    return HubSpec(name, "siglip", size, patch, config)


def _clip(name, size, patch, vision, text, projection, *, family="clip", activation="quick_gelu"):
    (v_hidden, v_layers, v_heads), (t_hidden, t_layers, t_heads, vocabulary) = vision, text
    config = {
        "vision": {
            "patch_size": patch,
            "hidden_dim": v_hidden,
            "num_layers": v_layers,
            "num_heads": v_heads,
            "intermediate_dim": v_hidden * 4,
            "intermediate_activation": activation,
        },
        "text": {
            "vocabulary_size": vocabulary,
            "embedding_dim": t_hidden,
            "hidden_dim": t_hidden,
            "num_layers": t_layers,
            "num_heads": t_heads,
            "intermediate_dim": t_hidden * 4,
            "intermediate_activation": activation,
        },
        "projection_dim": projection,
    }
    return HubSpec(name, family, size, patch, config)


_CLIP_VOCAB = 49408
_METACLIP_2_VOCAB = 901629

HUB_SPECS = [
    _dinov2("dinov2_small", 384, 12, 6),
    _dinov2("dinov2_base", 768, 12, 12),
    _dinov2("dinov2_large", 1024, 24, 16),
    _dinov2("dinov2_giant", 1536, 40, 24, swiglu=True),
    _dinov2("dinov2_with_registers_small", 384, 12, 6, registers=4),
    _dinov2("dinov2_with_registers_base", 768, 12, 12, registers=4),
    _dinov2("dinov2_with_registers_large", 1024, 24, 16, registers=4),
    _dinov2("dinov2_with_registers_giant", 1536, 40, 24, registers=4, swiglu=True),
    _dinov3("dinov3_vit_small_lvd1689m", 384, 12, 6, 1536),
    _dinov3("dinov3_vit_small_plus_lvd1689m", 384, 12, 6, 1536, gated=True),
    _dinov3("dinov3_vit_base_lvd1689m", 768, 12, 12, 3072),
    _dinov3("dinov3_vit_large_lvd1689m", 1024, 24, 16, 4096),
    _dinov3("dinov3_vit_huge_plus_lvd1689m", 1280, 32, 20, 5120, gated=True),
    _dinov3("dinov3_vit_large_sat493m", 1024, 24, 16, 4096),
    _vit("vit_base_patch16_224_imagenet", 224, 16, 768, 12, 12),
    _vit("vit_base_patch16_384_imagenet", 384, 16, 768, 12, 12),
    _vit("vit_base_patch32_384_imagenet", 384, 32, 768, 12, 12),
    _vit("vit_large_patch16_224_imagenet", 224, 16, 1024, 24, 16),
    _vit("vit_large_patch16_384_imagenet", 384, 16, 1024, 24, 16),
    _vit("vit_large_patch32_384_imagenet", 384, 32, 1024, 24, 16),
    _vit("vit_base_patch16_224_imagenet21k", 224, 16, 768, 12, 12),
    _vit("vit_base_patch32_224_imagenet21k", 224, 32, 768, 12, 12),
    _vit("vit_large_patch16_224_imagenet21k", 224, 16, 1024, 24, 16),
    _vit("vit_large_patch32_224_imagenet21k", 224, 32, 1024, 24, 16),
    _vit("vit_huge_patch14_224_imagenet21k", 224, 14, 1280, 32, 16),
    *(
        _siglip(f"siglip_base_patch16_{s}", s, 16, "base", vocabulary=32000)
        for s in (224, 256, 384, 512)
    ),
    *(_siglip(f"siglip_large_patch16_{s}", s, 16, "large", vocabulary=32000) for s in (256, 384)),
    *(_siglip(f"siglip_so400m_patch14_{s}", s, 14, "so400m", vocabulary=32000) for s in (224, 384)),
    *(
        _siglip(f"siglip2_base_patch16_{s}", s, 16, "base", vocabulary=256000)
        for s in (224, 256, 384)
    ),
    _siglip("siglip2_base_patch32_256", 256, 32, "base", vocabulary=256000),
    *(
        _siglip(f"siglip2_large_patch16_{s}", s, 16, "large", vocabulary=256000)
        for s in (256, 384, 512)
    ),
    *(
        _siglip(f"siglip2_so400m_patch14_{s}", s, 14, "so400m", vocabulary=256000)
        for s in (224, 384)
    ),
    *(
        _siglip(f"siglip2_so400m_patch16_{s}", s, 16, "so400m", vocabulary=256000)
        for s in (256, 384, 512)
    ),
    _clip("clip_vit_base_patch16", 224, 16, (768, 12, 12), (512, 12, 8, _CLIP_VOCAB), 512),
    _clip("clip_vit_base_patch32", 224, 32, (768, 12, 12), (512, 12, 8, _CLIP_VOCAB), 512),
    _clip("clip_vit_large_patch14", 224, 14, (1024, 24, 16), (768, 12, 12, _CLIP_VOCAB), 768),
    _clip("clip_vit_large_patch14_336", 336, 14, (1024, 24, 16), (768, 12, 12, _CLIP_VOCAB), 768),
    _clip(
        "clip_vit_b_32_laion2b_s34b_b79k",
        224,
        32,
        (768, 12, 12),
        (512, 12, 8, _CLIP_VOCAB),
        512,
        activation="gelu",
    ),
    _clip(
        "clip_vit_h_14_laion2b_s32b_b79k",
        224,
        14,
        (1280, 32, 16),
        (1024, 24, 16, _CLIP_VOCAB),
        1024,
        activation="gelu",
    ),
    *(
        _clip(
            f"metaclip_2_vit_huge_patch14_{s}",
            s,
            14,
            (1280, 32, 16),
            (1024, 24, 16, _METACLIP_2_VOCAB),
            1024,
            family="metaclip_2",
            activation="gelu",
        )
        for s in (224, 378)
    ),
]


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
