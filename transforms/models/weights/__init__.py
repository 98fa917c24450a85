"""``--weights``: what each form means, where it is cached, and what identifies it.

Forms: ``imagenet`` (Keras' own download, CNNs), ``preset`` (the entry's KerasHub preset), ``none``
(a seeded random init), ``sample`` (the offline real MobileNetV2, :mod:`.sample`), a ``kaggle://``
/ ``hf://`` KerasHub handle, or a local / ``gs://`` path: a ``.weights.h5`` / ``.h5`` / ``.keras``
file for a CNN, a KerasHub preset or Transformers folder for a KerasHub backbone.

:func:`resolve_weights` turns what a user typed into what a recipe records; :func:`fingerprint`
identifies the weights (a hash of the weight *values* for files and folders, so the same weights
saved twice match); :func:`~.cache.cache_dir` is the one cache folder (weights copied to workers, frozen graphs, the
sample weights).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import zipfile

from transforms import storage
from transforms.models.registry import get_backbone
from transforms.models.specs import (
    IMAGENET,
    NONE,
    PRESET,
    RANDOM_INIT_SEED,
    SAMPLE,
    WEIGHT_KEYWORDS,
    BackboneSpec,
    HubSpec,
    is_handle,
)
from transforms.models.weights import checkpoints
from transforms.models.weights.cache import cache_dir  # noqa: F401  (the one cache folder)


def weights_file(weights: str) -> str | None:
    """The weights file or checkpoint folder (local or remote) that ``weights`` names, or None
    for a keyword or a KerasHub handle."""
    if weights in WEIGHT_KEYWORDS or is_handle(weights):
        return None
    return weights


def fingerprint(spec: BackboneSpec | HubSpec, weights: str) -> str:
    """Identifies resolved weights: a content hash for files and folders, a description for
    keywords and handles."""
    if spec.is_hub and weights == PRESET:
        # KerasHub handles are versioned (``.../dinov2_small/1``); a version never changes.
        return f"keras-hub:{spec.handle}"
    if is_handle(weights):
        return f"handle:{weights}"
    if weights == IMAGENET:
        # Keras verifies each ImageNet download against a hash pinned in its own source.
        return f"keras-applications:{spec.constructor}:imagenet"
    if weights == NONE:
        return f"random-init:seed={RANDOM_INIT_SEED}"
    return weights_fingerprint(weights)


def resolve_weights(backbone: str, weights: str) -> tuple[str, int | None]:
    """``(weights, default image size)``: keywords as they are (``sample`` becomes its cached
    file and 160 px), paths checked for existence.

    Raises:
        ValueError: ``sample`` for another backbone, or a missing weights file.
    """
    keyword = weights.lower()
    if keyword in (IMAGENET, NONE, PRESET):
        return keyword, None
    if is_handle(weights):
        return weights, None
    if keyword == SAMPLE:
        from transforms.models.weights import sample

        if get_backbone(backbone).name != sample.BACKBONE:
            raise ValueError(f"--weights sample is only available for --backbone {sample.BACKBONE}")
        return sample.ensure_sample_weights(), sample.IMAGE_SIZE
    if not storage.exists(weights):
        raise ValueError(f"--weights file not found: {weights}")
    spec = get_backbone(backbone)
    if spec.is_hub:
        dir_tower(spec.name, weights)  # a directory with a config.json of the right family
    return weights, None


def resolve_recorded(weights: str) -> str:
    """The weights a table records, found on this machine: the offline sample weights are
    prepared again where this machine has no copy; any other file must be where it was.

    Raises:
        ValueError: the recorded weights file is not here.
    """
    if weights_file(weights) is None or storage.exists(weights):
        return weights
    from transforms.models.weights import sample

    if os.path.basename(weights) != sample.FILE_NAME:
        raise ValueError(f"the weights that made this table are not here: {weights}")
    return sample.ensure_sample_weights()


@functools.lru_cache(maxsize=32)
def dir_tower(backbone: str, uri: str):
    """The image tower a KerasHub checkpoint folder states (cached per folder)."""
    return checkpoints.read_dir_tower(get_backbone(backbone), uri)


@functools.lru_cache(maxsize=32)
def hub_preprocessing(backbone: str, weights: str):
    """The preprocessing a KerasHub backbone's weights state (cached per weights)."""
    return checkpoints.read_preprocessing(get_backbone(backbone), weights)


def fingerprint_of(backbone: str, weights: str) -> str:
    """The fingerprint of weights as a user types them (``sample`` and paths resolved)."""
    resolved, _ = resolve_weights(backbone, weights)
    return fingerprint(get_backbone(backbone), resolved)


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
    try:
        return _hash_values(uri, data)
    except Exception as exc:  # h5py, zipfile and safetensors each raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ValueError(f"--weights: {uri} is not a readable weights file ({first})") from exc


def _hash_values(uri: str, data: bytes) -> str:
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
