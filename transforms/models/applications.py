"""The ``keras.applications`` builder: a CNN, its weights, and the shared readout.

The network is built headless (or, for a named layer such as VGG16's ``fc2``, as the full
classifier), its weights loaded (Keras' ImageNet download, a seeded random init, or a file:
``.weights.h5``, a legacy ``.h5`` or a ``.keras`` saved model, including one that nests the
backbone), and its last feature map or named layer handed to ``transforms.models.readout``.
"""

from __future__ import annotations

from transforms import startup
from transforms.models.readout import TowerOutputs, read_out
from transforms.models.specs import IMAGENET, NONE, RANDOM_INIT_SEED


def build_cnn(recipe, weights_path: str | None):
    """A Keras model from ``(batch, size, size, 3)`` preprocessed pixels to the recipe's vectors.

    Args:
        recipe: a ``FeatureRecipe`` of a ``keras.applications`` backbone.
        weights_path: a *local* copy of ``recipe.weights`` when it is a file.
    """
    import keras

    spec = recipe.spec
    constructor = getattr(keras.applications, spec.constructor)
    weights = IMAGENET if recipe.weights == IMAGENET else None
    if recipe.weights == NONE:
        keras.utils.set_random_seed(RANDOM_INIT_SEED)
    if recipe.layer:
        base = constructor(include_top=True, weights=weights)
        outputs = TowerOutputs(layer=base.get_layer(recipe.layer).output)
        name = f"{spec.name}_{recipe.layer}"
    else:
        size = recipe.image_size
        base = constructor(include_top=False, weights=weights, input_shape=(size, size, 3))
        outputs = TowerOutputs(feature_map=base.output)
        name = f"{spec.name}_{recipe.pooling}"
    startup.mark("model build")
    if recipe.weights_file is not None:
        _load_file_weights(base, weights_path)
        startup.mark("weights load")
    return keras.Model(base.input, read_out(recipe, outputs), name=name)


def _load_file_weights(model, path: str | None) -> None:
    """Loads a weights file, or the weights of a saved model, into ``model``."""
    import keras

    if path is None:
        raise ValueError("a weights file path is required")
    if path.endswith(".keras"):
        saved = keras.models.load_model(path, compile=False)
        model.set_weights(_matching_weights(model, saved))
        return
    try:
        model.load_weights(path)
    except ValueError as mismatch:
        # A full saved model in legacy .h5 format, or weights saved with a top: match by shape.
        try:
            saved = keras.models.load_model(path, compile=False)
        except Exception:  # not a saved model either: the weights' own mismatch says why
            raise mismatch from None
        model.set_weights(_matching_weights(model, saved))


def _matching_weights(model, saved) -> list:
    """The weights of ``saved`` (or of a nested backbone inside it) that fit ``model``.

    Headless Keras applications hold exactly the leading weights of the full classifier, so a
    saved classifier (or a fine-tuned model wrapping a backbone) matches on its leading tensors.
    """
    candidates = [saved] + [layer for layer in saved.layers if hasattr(layer, "layers")]
    shapes = [tuple(w.shape) for w in model.weights]
    for candidate in candidates:
        values = candidate.get_weights()[: len(shapes)]
        if [tuple(v.shape) for v in values] == shapes:
            return values
    found = [tuple(v.shape) for v in saved.get_weights()]
    first = next(
        (i for i, (a, b) in enumerate(zip(shapes, found, strict=False)) if a != b),
        min(len(shapes), len(found)),
    )
    expected = f"{model.weights[first].path} {shapes[first]}" if first < len(shapes) else "nothing"
    holds = found[first] if first < len(found) else "nothing"
    raise ValueError(
        f"no part of the saved model {saved.name!r} has weights matching {model.name!r} "
        f"({len(shapes)} tensors): tensor {first} should be {expected}, the file holds {holds}"
    )
