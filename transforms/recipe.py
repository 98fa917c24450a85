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

import functools
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transforms import hub, storage
from transforms.backbones import PRECISIONS, RANDOM_INIT_SEED, BackboneSpec, get_backbone
from transforms.hub import HubSpec
from transforms.images import DEFAULT_RESIZE, RESIZE_MODES

#: ``--weights`` keywords; anything else is a local or remote path to a weights or model file
#: (CNNs) or a KerasHub / Transformers checkpoint directory or ``kaggle://`` / ``hf://`` handle
#: (KerasHub backbones). ``imagenet`` is Keras' own download (CNNs), ``preset`` the entry's KerasHub
#: preset (KerasHub backbones), ``none`` a seeded random init, ``sample`` the offline real
#: MobileNetV2 (``transforms.sample_weights``), resolved to its cached file path.
WEIGHT_KEYWORDS = ("imagenet", "preset", "none", "sample")

DEFAULT_BACKBONE = "mobilenet_v2"
#: Default weights of the ``keras.applications`` CNNs; KerasHub backbones default to ``preset``.
DEFAULT_WEIGHTS = "imagenet"
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
            (``transforms.hub``). None: the backbone's default.
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
        hub_backbone = spec.kind == "keras_hub"
        object.__setattr__(self, "backbone", spec.name)
        weights = self.weights or (hub.PRESET if hub_backbone else DEFAULT_WEIGHTS)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "pooling", self.pooling or spec.default_pooling)
        object.__setattr__(self, "resize", self.resize or spec.default_resize)
        object.__setattr__(self, "l2_normalize", bool(self.l2_normalize))
        if weights == "sample":
            raise ValueError(
                "weights='sample' must be resolved first: use FeatureRecipe.from_flags"
            )
        if hub_backbone and weights == "imagenet":
            raise ValueError(
                f"{spec.name} is a KerasHub backbone: --weights preset, none, a checkpoint "
                "directory or a kaggle:// / hf:// handle (not imagenet)"
            )
        if not hub_backbone and (weights == hub.PRESET or hub.is_handle(weights)):
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
            hub.check_image_size(spec, tower, size)
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
        return self.spec.kind == "keras_hub"

    @property
    def tower(self) -> hub.Tower:
        """KerasHub backbones: the image tower the weights state (a checkpoint directory's
        ``config.json``), else the registry entry's."""
        if self.weights_file is not None:
            return _dir_tower(self.backbone, self.weights)
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
    def preprocessing_spec(self) -> hub.Preprocessing:
        """KerasHub backbones: the scale, offset and interpolation read from the preset."""
        return _hub_preprocessing(self.backbone, self.weights)

    @property
    def preprocessing(self) -> str:
        """What is recorded as the table's ``preprocessing``."""
        if self.is_hub:
            return hub.describe_preprocessing(self.preprocessing_spec)
        return self.spec.preprocessing

    @property
    def interpolation(self) -> str:
        """The resize filter used when decoding (the preset's for KerasHub backbones)."""
        return self.preprocessing_spec.interpolation if self.is_hub else "bilinear"

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
        if self.weights in WEIGHT_KEYWORDS or hub.is_handle(self.weights):
            return None
        return self.weights

    def fingerprint(self) -> str:
        """Identifies the weights: a content hash for files, a description for keywords."""
        if self.is_hub and self.weights == hub.PRESET:
            # KerasHub handles are versioned (``.../dinov2_small/1``); a version never changes.
            return f"keras-hub:{self.spec.handle}"
        if hub.is_handle(self.weights):
            return f"handle:{self.weights}"
        if self.weights == "imagenet":
            # Keras verifies each ImageNet download against a hash pinned in its own source.
            return f"keras-applications:{self.spec.constructor}:imagenet"
        if self.weights == "none":
            return f"random-init:seed={RANDOM_INIT_SEED}"
        return weights_fingerprint(self.weights)

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
        if (
            verify_weights
            and weights
            and weights not in WEIGHT_KEYWORDS
            and not hub.is_handle(weights)
            and not storage.exists(weights)
        ):
            from transforms import sample_weights

            if os.path.basename(weights) != sample_weights.FILE_NAME:
                raise ValueError(f"the weights that made this table are not here: {weights}")
            weights = sample_weights.ensure_sample_weights()
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
        default = hub.PRESET if spec.kind == "keras_hub" else DEFAULT_WEIGHTS
        weights, default_size = resolve_weights(spec.name, weights or default)
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
                ours, theirs = self.fingerprint(), _fingerprint_of(self.backbone, value)
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


def resolve_weights(backbone: str, weights: str) -> tuple[str, int | None]:
    """``(weights, default image size)``: keywords as they are (``sample`` becomes its cached
    file and 160 px), paths checked for existence.

    Raises:
        ValueError: ``sample`` for another backbone, or a missing weights file.
    """
    keyword = weights.lower()
    if keyword in ("imagenet", "none", hub.PRESET):
        return keyword, None
    if hub.is_handle(weights):
        return weights, None
    if keyword == "sample":
        from transforms import sample_weights

        if get_backbone(backbone).name != sample_weights.BACKBONE:
            raise ValueError(
                f"--weights sample is only available for --backbone {sample_weights.BACKBONE}"
            )
        return sample_weights.ensure_sample_weights(), sample_weights.IMAGE_SIZE
    if not storage.exists(weights):
        raise ValueError(f"--weights file not found: {weights}")
    spec = get_backbone(backbone)
    if spec.kind == "keras_hub":
        _dir_tower(spec.name, weights)  # a directory with a config.json of the right family
    return weights, None


@functools.lru_cache(maxsize=32)
def _dir_tower(backbone: str, uri: str) -> hub.Tower:
    return hub.read_dir_tower(get_backbone(backbone), uri)


@functools.lru_cache(maxsize=32)
def _hub_preprocessing(backbone: str, weights: str) -> hub.Preprocessing:
    return hub.read_preprocessing(get_backbone(backbone), weights)


def _fingerprint_of(backbone: str, weights: str) -> str:
    resolved, _ = resolve_weights(backbone, weights)
    return FeatureRecipe(backbone, weights=resolved).fingerprint()


@functools.lru_cache(maxsize=16)
def _cached_fingerprint(uri: str, size: int, version: str) -> str:
    return _hash_weight_values(uri)


def weights_fingerprint(uri: str) -> str:
    """A content hash of a weights file's *values* (local or remote); cached per file version.

    HDF5 files (``.h5``, ``.weights.h5``, and the weights inside a ``.keras`` zip) are hashed
    dataset by dataset, in name order, so the same weights saved twice (HDF5 embeds timestamps)
    get the same fingerprint. Other files are hashed byte for byte.
    """
    if storage.is_dir(uri):
        files = storage.find_files(uri)
        version = "|".join(f"{f.uri}:{f.size}:{f.version}" for f in files)
        return _cached_dir_fingerprint(uri, version)
    info = storage.file_info(uri)
    return _cached_fingerprint(info.uri, info.size, info.version)


@functools.lru_cache(maxsize=16)
def _cached_dir_fingerprint(uri: str, version: str) -> str:
    """A checkpoint directory: its architecture (``config.json``, canonical JSON) and the values
    of every weights file (``*.weights.h5`` dataset by dataset, ``*.safetensors`` tensor by
    tensor), in name order. Tokenizer and converter files do not change image vectors."""
    import json

    digest = hashlib.sha256()
    root = uri.rstrip("/")
    for info in storage.find_files(uri):
        name = info.uri[len(root) + 1 :]
        if name == "config.json":
            config = json.loads(storage.read_bytes(info.uri))
            digest.update(json.dumps(config, sort_keys=True).encode())
        elif name.endswith((".h5", ".safetensors")):
            digest.update(name.encode())
            digest.update(_hash_weight_values(info.uri).encode())
    return "dir-values-sha256:" + digest.hexdigest()


def _hash_weight_values(uri: str) -> str:
    data = storage.read_bytes(uri)
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [n for n in archive.namelist() if n.endswith(".h5")]
            if members:
                data = archive.read(members[0])
    if uri.endswith(".safetensors"):
        return _hash_safetensors(data)
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


def _hash_safetensors(data: bytes) -> str:
    """Tensor by tensor in name order (the header's own metadata, e.g. a format note, and the
    byte layout do not count)."""
    from safetensors.numpy import load

    digest = hashlib.sha256()
    tensors = load(data)
    for name in sorted(tensors):
        values = tensors[name]
        digest.update(f"{name}|{values.dtype}|{values.shape}".encode())
        digest.update(values.tobytes())
    return "safetensors-values-sha256:" + digest.hexdigest()
