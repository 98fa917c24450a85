"""Keras layers of ours that saved ``.keras`` models contain; import before ``load_model``.

Kept apart from ``transforms.backbones`` so that importing the registry does not import Keras.
"""

from __future__ import annotations

import keras

from transforms.backbones import get_backbone, preprocess


@keras.saving.register_keras_serializable(package="featurebeam")
class Preprocess(keras.layers.Layer):
    """A backbone's own ``preprocess_input`` as a saveable layer: raw 0-255 pixels in."""

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = get_backbone(backbone).name

    def call(self, pixels):
        return preprocess(get_backbone(self.backbone), pixels)

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}
