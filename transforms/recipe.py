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
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transforms import storage
from transforms.backbones import POOLINGS, PRECISIONS, RANDOM_INIT_SEED, BackboneSpec, get_backbone
from transforms.images import DEFAULT_RESIZE, RESIZE_MODES

#: ``--weights`` keywords; anything else is a local or remote path to a weights or model file.
#: ``imagenet`` is Keras' own download, ``none`` a seeded random init, ``sample`` the offline real
#: MobileNetV2 (``transforms.sample_weights``), resolved to its cached file path.
WEIGHT_KEYWORDS = ("imagenet", "none", "sample")

DEFAULT_BACKBONE = "mobilenet_v2"
DEFAULT_WEIGHTS = "imagenet"
DEFAULT_POOLING = "avg"
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
)
#: Keys that must agree to mix two tables' rows (to train one head on both, or to add rows to a
#: table): the recipe, plus the head a prediction table was made with.
COMPATIBILITY_KEYS = (*RECIPE_KEYS, "head")


class RecipeMismatch(ValueError):
    """A flag or a table disagrees with the recipe it must match; ``key`` names the setting."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """The first of :data:`COMPATIBILITY_KEYS` on which two tables' metadata differ, or None."""
    return next((k for k in COMPATIBILITY_KEYS if str(a.get(k, "")) != str(b.get(k, ""))), None)


@dataclass(frozen=True)
class FeatureRecipe:
    """Everything that determines a feature vector, validated once at construction.

    Attributes:
        backbone: registry name.
        weights: ``"imagenet"``, ``"none"`` or a local / ``gs://`` path to a ``.weights.h5`` /
            ``.h5`` weights file or a ``.keras`` saved model (``"sample"`` is resolved to its path
            by :meth:`from_flags`).
        pooling: ``"avg"`` or ``"max"`` over the last feature map (ignored with ``layer``).
        layer: a named layer of the full classifier (``fc2``) instead of pooled features.
        image_size: square input side; defaults to the backbone's own.
        resize: how an image is fitted to the square input: ``squash`` or ``crop``.
        precision: ``float32`` or ``bfloat16`` (Keras mixed precision; vectors stay float32).
    """

    backbone: str
    weights: str = DEFAULT_WEIGHTS
    pooling: str = DEFAULT_POOLING
    layer: str | None = None
    image_size: int | None = None
    resize: str = DEFAULT_RESIZE
    precision: str = DEFAULT_PRECISION

    def __post_init__(self):
        spec = get_backbone(self.backbone)
        object.__setattr__(self, "backbone", spec.name)
        if self.weights == "sample":
            raise ValueError(
                "weights='sample' must be resolved first: use FeatureRecipe.from_flags"
            )
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
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    # --- what the recipe implies ---

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

    @property
    def weights_file(self) -> str | None:
        """The weights file (local or remote), or None for a keyword."""
        return None if self.weights in WEIGHT_KEYWORDS else self.weights

    def fingerprint(self) -> str:
        """Identifies the weights: a content hash for files, a description for keywords."""
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
            "preprocessing": self.spec.preprocessing,
            "resize": self.resize,
            "feature_dim": str(self.feature_dim),
            "precision": self.precision,
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
        weights = meta.get("weights") or DEFAULT_WEIGHTS
        if verify_weights and weights not in WEIGHT_KEYWORDS and not storage.exists(weights):
            from transforms import sample_weights

            if os.path.basename(weights) != sample_weights.FILE_NAME:
                raise ValueError(f"the weights that made this table are not here: {weights}")
            weights = sample_weights.ensure_sample_weights()
        recipe = cls(
            backbone=meta["backbone"],
            weights=weights,
            pooling=meta.get("pooling") or DEFAULT_POOLING,
            layer=meta.get("layer") or None,
            image_size=int(meta["input_size"]),
            resize=meta.get("resize") or DEFAULT_RESIZE,
            precision=meta.get("precision") or DEFAULT_PRECISION,
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
        image_size: int | None = None,
        resize: str | None = None,
        precision: str | None = None,
    ) -> FeatureRecipe:
        """A recipe from command-line values (None = the default); resolves ``sample`` weights
        to their cached file and checks that a weights file exists.

        Raises:
            ValueError: a bad combination, or a weights file that does not exist.
        """
        backbone = get_backbone(backbone or DEFAULT_BACKBONE).name
        weights, default_size = resolve_weights(backbone, weights or DEFAULT_WEIGHTS)
        return cls(
            backbone=backbone,
            weights=weights,
            pooling=pooling or DEFAULT_POOLING,
            layer=layer or None,
            image_size=image_size or default_size,
            resize=resize or DEFAULT_RESIZE,
            precision=precision or DEFAULT_PRECISION,
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
            else:
                raise TypeError(f"unknown recipe flag {name!r}")
            if ours != theirs:
                flag = "--" + name.replace("_", "-")
                raise RecipeMismatch(
                    key,
                    f"{flag} {value} contradicts the recorded recipe ({key}={ours}); "
                    f"leave {flag} out to use the recorded value",
                )


def resolve_weights(backbone: str, weights: str) -> tuple[str, int | None]:
    """``(weights, default image size)``: keywords as they are (``sample`` becomes its cached
    file and 160 px), paths checked for existence.

    Raises:
        ValueError: ``sample`` for another backbone, or a missing weights file.
    """
    keyword = weights.lower()
    if keyword in ("imagenet", "none"):
        return keyword, None
    if keyword == "sample":
        from transforms import sample_weights

        if get_backbone(backbone).name != sample_weights.BACKBONE:
            raise ValueError(
                f"--weights sample is only available for --backbone {sample_weights.BACKBONE}"
            )
        return sample_weights.ensure_sample_weights(), sample_weights.IMAGE_SIZE
    if not storage.exists(weights):
        raise ValueError(f"--weights file not found: {weights}")
    return weights, None


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
    info = storage.file_info(uri)
    return _cached_fingerprint(info.uri, info.size, info.version)


def _hash_weight_values(uri: str) -> str:
    data = storage.read_bytes(uri)
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
