"""Building a recipe's model: the entry points every job and worker calls.

:func:`build_model` dispatches to the family's builder (``applications`` or ``hub``), under the
recipe's precision; :func:`build_zero_shot` builds the image and text towers of a two-tower
preset; :func:`build_classifier` puts preprocessing, the frozen backbone and a trained head into
one model (raw pixels in) for export and fine-tuning. They are called in the worker (a model
handler's ``load_model``), never when a pipeline graph is built.
"""

from __future__ import annotations

import contextlib


def build_model(recipe, *, weights_path: str | None = None):
    """The Keras model that maps preprocessed pixels to the recipe's feature vectors.

    Args:
        recipe: what to build; ``recipe.precision == "bfloat16"`` builds it under Keras'
            ``mixed_bfloat16`` policy (variables stay float32).
        weights_path: a *local* copy of ``recipe.weights`` when it is a file or a KerasHub /
            Transformers directory (the caller fetches remote ones first); ignored for keywords.

    Returns:
        A ``keras.Model`` from ``(batch, size, size, 3)`` float32 (after
        ``transforms.models.preprocessing.preprocess``) to ``(batch, feature_dim)``.
    """
    with _precision(recipe):
        if recipe.is_hub:
            from transforms.models.hub import build_image_model

            return build_image_model(recipe, local_dir=weights_path)
        from transforms.models.applications import build_cnn

        return build_cnn(recipe, weights_path)


def build_zero_shot(recipe, prompts, *, weights_path: str | None = None):
    """``(image model, head)`` for zero-shot classification by text prompts (two-tower KerasHub
    backbones; see ``transforms.models.zero_shot``), under the recipe's precision."""
    from transforms.models import zero_shot

    with _precision(recipe):
        return zero_shot.build_zero_shot(recipe, prompts, local_dir=weights_path)


@contextlib.contextmanager
def _precision(recipe):
    import keras

    previous = keras.mixed_precision.global_policy()
    if recipe.precision == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def build_classifier(recipe, head, *, weights_path: str | None = None):
    """One Keras model: raw pixels -> preprocessing -> frozen backbone -> ``head``.

    The backbone is called with ``training=False`` so its BatchNorm layers stay in inference
    mode even when some of its layers are later unfrozen for fine-tuning (Keras' advice).
    """
    import keras

    from transforms.models.preprocessing import Preprocess

    backbone = build_model(recipe, weights_path=weights_path)
    backbone.trainable = False
    size = recipe.image_size
    pixels = keras.Input((size, size, 3), name="pixels")
    features = backbone(Preprocess(recipe.backbone, name="preprocess")(pixels), training=False)
    # Mixed-precision backbones give bfloat16 features; the head was trained on float32 vectors.
    outputs = head(keras.ops.cast(features, "float32"))
    return keras.Model(pixels, outputs, name=f"{recipe.backbone}_classifier")
