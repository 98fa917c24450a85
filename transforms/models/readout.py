"""The one readout step every family shares: tower outputs -> the recipe's vector.

A builder hands over what its tower offers (:class:`TowerOutputs`: a CNN's last feature map or a
named layer's output; a transformer's pooled class vector and patch tokens); :func:`read_out`
picks the recipe's pooling or layer and applies its L2 normalisation. Because it is one step,
``--l2-normalize`` (and every pooling) means the same on every backbone.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class TowerOutputs(NamedTuple):
    """What a tower offers the readout (symbolic Keras tensors; None where it has none).

    Attributes:
        feature_map: a CNN's last feature map, ``(batch, h, w, channels)``.
        layer: the output of the recipe's named layer (``fc2``, ``predictions``).
        cls: a transformer's pooled vector (class token, SigLIP's attention pool, CLIP's
            projected embedding).
        patches: a transformer's patch tokens, ``(batch, tokens, width)``, class and register
            tokens excluded.
    """

    feature_map: Any = None
    layer: Any = None
    cls: Any = None
    patches: Any = None


def read_out(recipe, outputs: TowerOutputs):
    """The recipe's vector from the tower's outputs: its named layer or pooling, then (with
    ``recipe.l2_normalize``) scaled to unit length in float32.

    Raises:
        ValueError: the tower does not offer what the recipe asks for.
    """
    import keras

    if recipe.layer:
        features = _need(outputs.layer, recipe, "a named layer")
    elif recipe.pooling in ("avg", "max") and outputs.feature_map is not None:
        pool = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
        # The names Keras' own ``pooling=`` argument gives these layers.
        features = pool[recipe.pooling](name=f"{recipe.pooling}_pool")(outputs.feature_map)
    elif recipe.pooling == "avg":
        features = keras.ops.mean(_need(outputs.patches, recipe, "patch tokens"), axis=1)
    elif recipe.pooling == "cls":
        features = _need(outputs.cls, recipe, "a class vector")
    elif recipe.pooling == "cls_avg":
        cls = _need(outputs.cls, recipe, "a class vector")
        patches = keras.ops.mean(_need(outputs.patches, recipe, "patch tokens"), axis=1)
        features = keras.ops.concatenate([cls, patches], axis=-1)
    else:
        raise ValueError(f"{recipe.backbone} offers no pooling {recipe.pooling!r}")
    if recipe.l2_normalize:
        features = keras.ops.normalize(keras.ops.cast(features, "float32"), axis=-1, epsilon=1e-12)
    return features


def _need(tensor, recipe, what: str):
    if tensor is None:
        raise ValueError(f"{recipe.backbone} has no {what} for {recipe.output_name}")
    return tensor
