"""FeatureRecipe: everything that decides what a feature vector is, in one frozen object.

A recipe names the backbone, its weights (and their fingerprint), the input size, the pooling or
named layer, the backbone's preprocessing, how images are fitted to the input (``resize``) and the
numeric precision. Two vectors are comparable exactly when their recipes agree, so:

- the extraction job writes ``recipe.to_metadata()`` into every table it makes;
- incremental runs, ``train_head`` and the serving jobs compare metadata with
  :func:`first_difference` over :data:`COMPATIBILITY_KEYS`;
- every job that serves a trained head rebuilds the exact recipe it was trained on with
  :meth:`FeatureRecipe.from_metadata`, and :meth:`FeatureRecipe.check_flags` refuses command-line
  flags that contradict it.

The defaults every job shares are stated here once (``DEFAULT_RESIZE`` beside the resize modes in
``transforms.images``, which cannot import this module).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transforms import storage
from transforms.images import DEFAULT_RESIZE, RESIZE_MODES
from transforms.models import weights as weight_forms
from transforms.models.registry import get_backbone
from transforms.models.specs import (
    IMAGENET,
    PRECISIONS,
    PRESET,
    SAMPLE,
    BackboneSpec,
    HubSpec,
    Preprocessing,
    Tower,
    check_image_size,
    describe_preprocessing,
    is_handle,
)

DEFAULT_BACKBONE = "mobilenet_v2"
DEFAULT_PRECISION = PRECISIONS[0]
#: Images per model call; not part of the recipe (it does not change the vectors).
DEFAULT_BATCH_SIZE = 32

#: Metadata keys that decide a vector: two tables agreeing on all of them hold comparable vectors.
RECIPE_KEYS = (
    "backbone",
    "weights_fingerprint",
    "input_size",
    "pooling",
    "layer",
    "preprocessing",
    "resize",
    "feature_dim",
    "precision",
    "l2_normalize",
)
#: Keys that must agree to mix two tables' rows (to train one head on both, or to add rows to a
#: table): the recipe, plus the head a prediction table was made with.
COMPATIBILITY_KEYS = (*RECIPE_KEYS, "head")


class RecipeMismatch(ValueError):
    """A flag or a table disagrees with the recipe it must match; ``key`` names the setting."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


#: What a key meant in tables written before it was recorded.
_LEGACY_DEFAULTS = {"l2_normalize": "false"}


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """The first of :data:`COMPATIBILITY_KEYS` on which two tables' metadata differ, or None."""

    def value(meta, key):
        return str(meta.get(key) or _LEGACY_DEFAULTS.get(key, ""))

    return next((k for k in COMPATIBILITY_KEYS if value(a, k) != value(b, k)), None)


def table_fingerprint(metadata: Mapping[str, str]) -> str:
    """Identifies what made a table's vectors (its recipe, and the head of a prediction table),
    not which images: tables with one fingerprint hold comparable vectors."""
    key = json.dumps({k: metadata.get(k, "") for k in COMPATIBILITY_KEYS}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FeatureRecipe:
    """Everything that determines a feature vector, validated once at construction.

    Attributes:
        backbone: registry name.
        weights: CNNs: ``"imagenet"``, ``"none"`` or a local / ``gs://`` path to a
            ``.weights.h5`` / ``.h5`` weights file or a ``.keras`` saved model (``"sample"`` is
            resolved to its path by :meth:`from_flags`). KerasHub backbones: ``"preset"``,
            ``"none"``, a ``kaggle://`` / ``hf://`` handle, or a local / ``gs://`` directory in
            KerasHub preset or Transformers format.
        pooling: CNNs: ``"avg"`` or ``"max"`` over the last feature map (ignored with
            ``layer``); KerasHub backbones: ``"cls"``, ``"avg"`` or ``"cls_avg"``
            (``transforms.models.specs.HUB_POOLINGS``). None: the backbone's default.
        layer: a named layer of the full classifier (``fc2``) instead of pooled features.
        image_size: square input side; defaults to the backbone's own.
        resize: how an image is fitted to the square input: ``squash`` or ``crop``; None: the
            backbone's reference (``crop`` for DINOv2 and CLIP, else ``squash``).
        precision: ``float32`` or ``bfloat16`` (Keras mixed precision; vectors stay float32).
        l2_normalize: scale every vector to unit length (for cosine retrieval).
    """

    backbone: str
    weights: str | None = None
    pooling: str | None = None
    layer: str | None = None
    image_size: int | None = None
    resize: str | None = None
    precision: str = DEFAULT_PRECISION
    l2_normalize: bool = False

    def __post_init__(self):
        spec = get_backbone(self.backbone)
        hub_backbone = spec.is_hub
        object.__setattr__(self, "backbone", spec.name)
        weights = self.weights or spec.default_weights
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "pooling", self.pooling or spec.default_pooling)
        object.__setattr__(self, "resize", self.resize or spec.default_resize)
        object.__setattr__(self, "l2_normalize", bool(self.l2_normalize))
        if weights == SAMPLE:
            raise ValueError(
                "weights='sample' must be resolved first: use FeatureRecipe.from_flags"
            )
        if hub_backbone and weights == IMAGENET:
            raise ValueError(
                f"{spec.name} is a KerasHub backbone: --weights preset, none, a checkpoint "
                "directory or a kaggle:// / hf:// handle (not imagenet)"
            )
        if not hub_backbone and (weights == PRESET or is_handle(weights)):
            raise ValueError(
                f"--weights {weights} is for KerasHub backbones; {spec.name} takes imagenet, "
                "none, sample (mobilenet_v2) or a weights file"
            )
        if self.pooling not in spec.poolings:
            raise ValueError(
                f"pooling must be one of {spec.poolings} for {spec.name}, got {self.pooling!r}"
            )
        if self.layer is not None and self.layer not in spec.layers:
            valid = ", ".join(spec.layers)
            raise ValueError(f"unknown layer {self.layer!r} for {spec.name}; valid layers: {valid}")
        if hub_backbone:
            tower = self.tower
            size = self.image_size or tower.image_size
            check_image_size(spec, tower, size)
        else:
            size = self.image_size or spec.input_size
        if self.layer is not None and size != spec.input_size:
            raise ValueError(
                f"layer {self.layer!r} needs the full classifier, whose input size is fixed at "
                f"{spec.input_size}; got image_size={size}"
            )
        if size < spec.min_size:
            raise ValueError(f"{spec.name} needs image_size >= {spec.min_size}, got {size}")
        object.__setattr__(self, "image_size", size)
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    # --- what the recipe implies ---

    @property
    def spec(self) -> BackboneSpec | HubSpec:
        return get_backbone(self.backbone)

    @property
    def is_hub(self) -> bool:
        return self.spec.is_hub

    @property
    def tower(self) -> Tower:
        """KerasHub backbones: the image tower the weights state (a checkpoint directory's
        ``config.json``), else the registry entry's."""
        if self.weights_file is not None:
            return weight_forms.dir_tower(self.backbone, self.weights)
        return self.spec.tower()

    @property
    def feature_dim(self) -> int:
        spec = self.spec
        if self.is_hub:
            return self.tower.widths[self.pooling]
        return spec.layers[self.layer] if self.layer else spec.feature_dim

    def weight_bytes(self) -> int:
        """About how much memory the model's float32 weights take: a weights file's or
        checkpoint folder's size, else the registry's parameter count (KerasHub's for its
        presets)."""
        if self.weights_file is not None:
            uri = self.weights_file
            files = storage.find_files(uri) if storage.is_dir(uri) else [storage.file_info(uri)]
            return sum(f.size for f in files if f.uri.endswith((".h5", ".keras", ".safetensors")))
        return int(self.spec.params_m * 1e6 * 4)

    @property
    def preprocessing_spec(self) -> Preprocessing:
        """KerasHub backbones: the scale, offset and interpolation read from the preset."""
        return weight_forms.hub_preprocessing(self.backbone, self.weights)

    @property
    def preprocessing(self) -> str:
        """What is recorded as the table's ``preprocessing``."""
        if self.is_hub:
            return describe_preprocessing(self.preprocessing_spec)
        return self.spec.preprocessing

    @property
    def interpolation(self) -> str:
        """The resize filter used when decoding (the preset's for KerasHub backbones)."""
        return self.preprocessing_spec.interpolation if self.is_hub else self.spec.interpolation

    @property
    def size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    @property
    def output_name(self) -> str:
        """``pooling=avg`` or ``layer=fc2``: what the vector is."""
        return f"layer={self.layer}" if self.layer else f"pooling={self.pooling}"

    @property
    def weights_file(self) -> str | None:
        """The weights file or checkpoint directory (local or remote), or None for a keyword
        or a KerasHub handle."""
        return weight_forms.weights_file(self.weights)

    def fingerprint(self) -> str:
        """Identifies the weights: a content hash for files, a description for keywords."""
        return weight_forms.fingerprint(self.spec, self.weights)

    # --- metadata ---

    def to_metadata(self) -> dict[str, str]:
        """The table metadata that records this recipe (string values)."""
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "weights_fingerprint": self.fingerprint(),
            "input_size": str(self.image_size),
            "pooling": "" if self.layer else self.pooling,
            "layer": self.layer or "",
            "preprocessing": self.preprocessing,
            "resize": self.resize,
            "feature_dim": str(self.feature_dim),
            "precision": self.precision,
            "l2_normalize": "true" if self.l2_normalize else "false",
        }

    @classmethod
    def from_metadata(
        cls, meta: Mapping[str, str], *, verify_weights: bool = True
    ) -> FeatureRecipe:
        """Rebuilds the recipe that produced a table, as recorded in its metadata.

        The offline sample weights are re-prepared if this machine has no cached copy; any other
        weights file must be where the table says. Keys missing from tables written by older
        versions take their defaults. ``verify_weights=False`` skips both (for a saved model that
        carries its own weights and needs only the input side of the recipe).

        Raises:
            ValueError: the recorded weights are missing, or their values differ from those
                that made the table (fingerprint mismatch).
        """
        weights = meta.get("weights") or None
        if verify_weights and weights:
            weights = weight_forms.resolve_recorded(weights)
        recipe = cls(
            backbone=meta["backbone"],
            weights=weights,
            pooling=meta.get("pooling") or None,
            layer=meta.get("layer") or None,
            image_size=int(meta["input_size"]),
            resize=meta.get("resize") or DEFAULT_RESIZE,
            precision=meta.get("precision") or DEFAULT_PRECISION,
            l2_normalize=meta.get("l2_normalize") == "true",
        )
        recorded = meta.get("weights_fingerprint")
        if verify_weights and recorded and recipe.fingerprint() != recorded:
            raise RecipeMismatch(
                "weights_fingerprint",
                f"weights {weights} do not match the recorded fingerprint {recorded}",
            )
        return recipe

    @classmethod
    def from_flags(
        cls,
        *,
        backbone: str | None = None,
        weights: str | None = None,
        pooling: str | None = None,
        layer: str | None = None,
        image_size: int | str | None = None,
        resize: str | None = None,
        precision: str | None = None,
        l2_normalize: bool | None = None,
    ) -> FeatureRecipe:
        """A recipe from command-line values (None = the backbone's default); resolves
        ``sample`` weights to their cached file and checks that a weights file exists.

        Raises:
            ValueError: a bad combination, or a weights file that does not exist.
        """
        spec = get_backbone(backbone or DEFAULT_BACKBONE)
        weights, default_size = weight_forms.resolve_weights(
            spec.name, weights or spec.default_weights
        )
        return cls(
            backbone=spec.name,
            weights=weights,
            pooling=pooling or None,
            layer=layer or None,
            image_size=_size(image_size) or default_size,
            resize=resize or None,
            precision=precision or DEFAULT_PRECISION,
            l2_normalize=bool(l2_normalize),
        )

    def check_flags(self, **given: Any) -> None:
        """Refuses flags that contradict this (recorded) recipe; None means "not given".

        Accepts the keyword names of :meth:`from_flags`.

        Raises:
            RecipeMismatch: naming the first setting that differs.
        """
        for name, value in given.items():
            if value is None or value == "":
                continue
            if name == "weights":
                ours, theirs = self.fingerprint(), weight_forms.fingerprint_of(self.backbone, value)
                key = "weights_fingerprint"
            elif name == "backbone":
                ours, theirs, key = self.backbone, get_backbone(value).name, "backbone"
            elif name == "image_size":
                ours, theirs, key = self.image_size, int(value), "input_size"
            elif name in ("pooling", "layer", "resize", "precision"):
                ours, theirs, key = getattr(self, name), value, name
            elif name == "l2_normalize":
                if not value:  # a store_true flag left out says nothing
                    continue
                ours, theirs, key = self.l2_normalize, bool(value), name
            else:
                raise TypeError(f"unknown recipe flag {name!r}")
            if ours != theirs:
                flag = "--" + name.replace("_", "-")
                raise RecipeMismatch(
                    key,
                    f"{flag} {value} contradicts the recorded recipe ({key}={ours}); "
                    f"leave {flag} out to use the recorded value",
                )


def _size(value: int | str | None) -> int | None:
    """``--image-size`` as given (a string from the command line)."""
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--image-size must be a whole number of pixels, got {value!r}") from None
