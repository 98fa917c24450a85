"""Reading a KerasHub backbone's checkpoint: its image tower and its preprocessing.

A checkpoint is a KerasHub preset (a ``kaggle://`` / ``hf://`` handle, the entry's own ``preset``,
or a local / ``gs://`` folder with ``config.json`` and ``image_converter.json``) or a Transformers
folder (``config.json`` + ``preprocessor_config.json`` + ``model.safetensors``). The registry
states each preset's architecture; a folder's own ``config.json`` overrides it, and the
preprocessing is always read from the checkpoint when it states one. Only a random init, which
has no checkpoint, falls back to the family's published normalisation.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any

from transforms import storage
from transforms.models.specs import (
    FAMILIES,
    NONE,
    PRESET,
    HubSpec,
    Preprocessing,
    Tower,
    describe_preprocessing,
    is_handle,
)

_LOG = logging.getLogger(__name__)

_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def preset_source(spec: HubSpec, weights: str, local_dir: str | None = None) -> str:
    """What KerasHub loads for ``weights``: a local copy of a remote folder where there is one,
    the entry's versioned handle for ``preset``, else ``weights`` itself (a handle or folder)."""
    return local_dir or (spec.handle if weights == PRESET else weights)


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
    if weights == NONE:
        mean, std, interpolation = spec.fam.published
        return Preprocessing.from_mean_std(mean, std, interpolation)
    source = preset_source(spec, weights, local_dir)
    if is_handle(weights) or weights == PRESET:
        return _converter_from_preset(spec, source)
    files = dir_files(source)
    if "image_converter.json" in files:
        return _converter_from_preset(spec, source)
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


def _converter_from_preset(spec: HubSpec, preset: str) -> Preprocessing:
    import keras_hub

    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except Exception as exc:  # a download (requests, kagglehub) or a broken converter file
        raise ValueError(_unreadable_preset(spec, preset, exc)) from exc
    return Preprocessing.from_converter_config(converter.get_config(), source=preset)


def _unreadable_preset(spec: HubSpec, preset: str, exc: Exception) -> str:
    text = str(exc)
    host = re.search(r"host='([^']+)'", text)
    if host and re.search(r"resolve|Name or service|Connection|Max retries", text):
        return (
            f"--weights: KerasHub fetches {spec.name}'s preset {preset} from {host.group(1)}, which "
            "cannot be reached from here, and it is not in KerasHub's cache; use --weights none "
            "(random init), a local or gs:// preset or Transformers folder, or stage the preset "
            f"once where there is internet: featurebeam stage-weights --backbone {spec.name} "
            "--to DIR"
        )
    first = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
    return f"--weights: cannot read the image converter of {preset} ({first})"


def dir_files(uri: str) -> dict[str, Any]:
    """The files directly in a preset directory (local or remote): name -> reader."""
    if not storage.is_dir(uri):
        raise ValueError(f"--weights {uri}: not a directory or a known keyword")
    found = {}
    for info in storage.find_files(uri):
        name = info.uri[len(uri.rstrip("/")) + 1 :]
        found[name] = functools.partial(storage.read_bytes, info.uri)
    return found


def read_dir_tower(spec: HubSpec, uri: str) -> Tower:
    """The image tower a checkpoint directory's ``config.json`` states (so widths, patch and
    input size come from the checkpoint, not the registry entry).

    Raises:
        ValueError: no ``config.json``, a Transformers model type KerasHub cannot convert, or a
            checkpoint of another family.
    """
    files = dir_files(uri)
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
        return _tower_of(_tower_from_transformers, spec, config, uri)
    class_name = config.get("class_name") or config.get("registered_name", "")
    if family.backbone_class not in class_name:
        raise ValueError(
            f"--weights {uri}: a KerasHub {class_name or 'unknown'} preset, not a "
            f"{family.backbone_class} ({spec.family})"
        )
    return _tower_of(_tower_from_keras_hub, spec, config.get("config", {}), uri)


def _tower_of(read, spec: HubSpec, config: dict[str, Any], uri: str) -> Tower:
    try:
        return read(spec.family, config)
    except KeyError as exc:
        raise ValueError(
            f"--weights {uri}: its config.json states no {exc.args[0]!r}, which a {spec.family} "
            "checkpoint's config.json holds (is it a complete checkpoint?)"
        ) from None


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
