"""A backbone's own preprocessing, on arrays, on tensors and as a saveable Keras layer.

The ``keras.applications`` CNNs expect their module's ``preprocess_input`` applied to 0-255
pixels; KerasHub towers scale their pixels inside the model (by the preset's converter,
``transforms.models.hub``), so theirs only casts. :class:`Preprocess` is the layer that exported
models (``export_model``, ``finetune``) start with; import this module before ``load_model``.
"""

from __future__ import annotations

import importlib
from typing import Any

import keras

from transforms.models.registry import get_backbone
from transforms.models.specs import BackboneSpec, HubSpec


def preprocess_fn(spec: BackboneSpec | HubSpec):
    """The backbone's ``keras.applications.<module>.preprocess_input`` (KerasHub: a cast)."""
    if spec.is_hub:
        return lambda pixels: pixels
    return importlib.import_module(f"keras.applications.{spec.module}").preprocess_input


def preprocess(spec: BackboneSpec | HubSpec, pixels: Any) -> Any:
    """Applies the backbone's own preprocessing without touching the caller's data.

    Works on numpy arrays (a float32 copy is made first, since Keras may scale in place) and on
    tensors inside a compiled function (cast, which is never in place).
    """
    fn = preprocess_fn(spec)
    if hasattr(pixels, "__array__") and not _is_tensor(pixels):
        import numpy as np

        return fn(np.array(pixels, dtype=np.float32, copy=True))
    return fn(keras.ops.cast(pixels, "float32"))


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith(("tensorflow", "keras"))


@keras.saving.register_keras_serializable(package="featurebeam")
class Preprocess(keras.layers.Layer):
    """A backbone's own ``preprocess_input`` as a saveable layer: raw 0-255 pixels in.

    Saved models name it ``featurebeam>Preprocess``: that name, not this module's path, is what
    ``load_model`` looks up, so models saved before the model wing existed still load.
    """

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = get_backbone(backbone).name

    def call(self, pixels):
        return preprocess(get_backbone(self.backbone), pixels)

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}
