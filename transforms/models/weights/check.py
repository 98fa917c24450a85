"""Checking a recipe's weights before anything starts: before the lease, the plan and Beam.

Weights that cannot work should stop a run on the launcher in seconds, with one line naming the
file (or the host that cannot be reached) and what to do instead, not in a worker with a traceback
after the table's lease was taken. :func:`check_weights` raises ``ValueError`` for:

- ``imagenet`` (Keras' download) or a KerasHub ``preset`` / handle that cannot be fetched from
  here and is not in the local cache;
- a file that is not a Keras weights file (``.weights.h5``, ``.h5``, ``.keras``), or weights of
  another architecture (the first layer and shapes that do not match are named);
- a checkpoint folder whose ``config.json``, converter or weights cannot be read (the readers in
  ``checkpoints`` and the fingerprint say which file).

A CNN's weights file is loaded into the model once per machine; a marker in the cache folder
remembers that these exact weights (by fingerprint) fit this backbone, so later runs skip it.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import warnings
import zipfile

from transforms import storage
from transforms.models.specs import IMAGENET, PRESET, is_handle
from transforms.models.weights.cache import cache_dir

_LOG = logging.getLogger(__name__)

#: Where ``keras.applications`` downloads its ImageNet weights from.
KERAS_WEIGHTS_HOST = "storage.googleapis.com"
#: Seconds to wait for that host before calling it unreachable.
REACH_TIMEOUT_S = 5.0
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def instead(backbone: str) -> str:
    """What to do when a backbone's published weights cannot be fetched."""
    return (
        "use --weights sample (offline real MobileNetV2), --weights none (random init), a local or "
        "gs:// weights file, or stage the weights once where there is internet: featurebeam "
        f"stage-weights --backbone {backbone} --to DIR"
    )


def check_weights(recipe, *, cache: str | None = None) -> None:
    """Raises ValueError (one line: the weights, the reason, what to do) unless ``recipe``'s
    weights can be had and fit its backbone. Builds the model only for a CNN weights file that
    this machine has not checked before.

    Args:
        recipe: the ``FeatureRecipe`` a run will embed with.
        cache: where remote weights are copied (a job's ``--cache-dir``; default: the cache
            folder's ``weights/``, as the model handler uses).
    """
    cache = cache or cache_dir("weights")
    spec = recipe.spec
    if recipe.weights == IMAGENET:
        _check_keras_download(spec)
    elif spec.is_hub and (recipe.weights == PRESET or is_handle(recipe.weights)):
        recipe.preprocessing_spec  # noqa: B018  (reads the preset's converter: fetches it)
    elif recipe.weights_file is not None:
        recipe.fingerprint()  # reads every weights file: a broken one is named here
        if spec.is_hub:
            recipe.preprocessing_spec  # noqa: B018  (a folder's converter / preprocessor config)
        else:
            _check_cnn_file(recipe, cache)


def _check_keras_download(spec) -> None:
    try:
        socket.create_connection((KERAS_WEIGHTS_HOST, 443), timeout=REACH_TIMEOUT_S).close()
        return
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
    if _keras_cached(spec.constructor):
        _LOG.info(
            "%s cannot be reached (%s); using Keras' cached weights", KERAS_WEIGHTS_HOST, reason
        )
        return
    raise ValueError(
        f"--weights imagenet: Keras downloads {spec.name}'s ImageNet weights from "
        f"{KERAS_WEIGHTS_HOST}, which cannot be reached from here ({reason}), and they are not in "
        f"Keras' cache; {instead(spec.name)}"
    )


def _keras_cached(constructor: str) -> bool:
    """Whether Keras' cache folder holds a weights file of this constructor (Keras names them
    after the model: ``resnet50_weights_..._notop.h5``, ``efficientnetv2-b0_notop.h5``)."""
    folder = os.path.join(
        os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras"), "models"
    )
    want = _alnum(constructor)
    try:
        return any(want in _alnum(name) for name in os.listdir(folder))
    except OSError:
        return False


def _alnum(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _check_cnn_file(recipe, cache: str) -> None:
    uri = recipe.weights_file
    _check_file_format(uri)
    marker = os.path.join(cache, "checked", f"{_alnum(recipe.fingerprint())[:48]}-{_key(recipe)}")
    if os.path.exists(marker):
        return
    from transforms.models.build import build_model

    local = storage.local_copy(uri, cache)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns per layer before it raises
            build_model(recipe, weights_path=local)
    except Exception as exc:  # Keras raises ValueError, OSError, TypeError...: all one reason
        raise ValueError(
            f"--weights {uri}: not {recipe.backbone} weights: {_mismatch(exc)}"
        ) from exc
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "w").close()
    except OSError:  # a read-only cache only costs the next run this check again
        pass


def _key(recipe) -> str:
    """What the check depends on besides the weights: the architecture that is built."""
    return f"{recipe.backbone}-{recipe.layer or recipe.pooling}-{recipe.image_size}"


def _check_file_format(uri: str) -> None:
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    if not name.endswith((".h5", ".keras")):
        raise ValueError(
            f"--weights {uri}: a CNN's weights are a .weights.h5, .h5 or .keras file (or a keyword: "
            "imagenet, sample, none)"
        )
    with storage.open_file(uri) as f:
        head = f.read(8)
    if name.endswith(".keras"):
        if head[:4] != b"PK\x03\x04":
            raise ValueError(f"--weights {uri}: not a .keras file (a zip archive saved by Keras)")
        with storage.open_file(uri) as f, zipfile.ZipFile(f) as archive:
            members = set(archive.namelist())
        missing = {"config.json", "model.weights.h5"} - members
        if missing:
            raise ValueError(
                f"--weights {uri}: not a .keras file: it has no {', '.join(sorted(missing))}"
            )
    elif head != _HDF5_SIGNATURE:
        raise ValueError(f"--weights {uri}: not an HDF5 weights file (.weights.h5 or .h5)")


def _mismatch(exc: Exception) -> str:
    """One line from Keras' loading error: the first layer and the shapes that do not match."""
    text = str(exc)
    layer = re.search(r"object <\w+ name=([^,>]+)", text)
    shapes = re.search(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))", text)
    if layer and shapes:
        return (
            f"layer {layer.group(1)!r} expects {shapes.group(1)}, the file holds {shapes.group(2)}"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
