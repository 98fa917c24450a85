"""The KerasHub builder: a vision transformer's image tower, its preprocessing, the readout.

The preset's scale and offset (``recipe.preprocessing_spec``, read from the checkpoint) are applied
inside the model, then the tower; its pooled vector and patch tokens go to the shared readout
(``transforms.models.readout``). ``--weights none`` builds a seeded random tower of the registry
entry's architecture; everything else loads through KerasHub's ``from_preset``.
"""

from __future__ import annotations

from transforms import startup
from transforms.models.readout import TowerOutputs, read_out
from transforms.models.specs import NONE, RANDOM_INIT_SEED, HubSpec
from transforms.models.weights.checkpoints import preset_source


def build_image_model(recipe, *, local_dir: str | None = None):
    """A Keras model: float pixels 0-255 ``(batch, size, size, 3)`` -> the recipe's vectors.

    Called in the worker, under the recipe's dtype policy.
    """
    backbone = load_backbone(recipe.spec, recipe.weights, recipe.image_size, local_dir)
    model = image_model(recipe, backbone)
    startup.mark("model build + weights")
    return model


def image_model(recipe, backbone):
    """The recipe's image model around a loaded KerasHub backbone (or random image tower)."""
    import keras

    spec: HubSpec = recipe.spec
    size = recipe.image_size
    prep = recipe.preprocessing_spec
    pixels = keras.Input((size, size, 3), name="pixels")
    x = pixels * keras.ops.convert_to_tensor(prep.scale, "float32") + keras.ops.convert_to_tensor(
        prep.offset, "float32"
    )
    cls, patches = _tokens(spec, backbone, x)
    features = read_out(recipe, TowerOutputs(cls=cls, patches=patches))
    return keras.Model(pixels, features, name=f"{spec.name}_{recipe.pooling}")


def _tokens(spec: HubSpec, backbone, x):
    """``(pooled "cls" vector, patch tokens)`` of the image tower for input tensor ``x``."""
    import keras

    family = spec.family
    if family in ("dinov2", "dinov3", "vit"):
        key = spec.fam.input_key
        tokens = backbone({key: x} if key else x)
        prefix = 1 + int(getattr(backbone, "num_register_tokens", 0) or 0)
        return tokens[:, 0], tokens[:, prefix:]
    encoder = backbone.vision_encoder
    if family == "siglip":
        # The post-norm tokens feed the attention-pooling head; read both in one pass.
        both = keras.Model(encoder.inputs, [encoder.post_layer_norm.output, encoder.output])
        tokens, pooled = both({"images": x})
        return pooled, tokens
    tokens = encoder({"images": x})  # CLIP / MetaCLIP 2: final layer norm over all tokens
    return backbone.vision_projection(tokens[:, 0]), tokens[:, 1:]


def load_backbone(spec: HubSpec, weights: str, size: int, local_dir: str | None):
    import keras
    import keras_hub

    cls = getattr(keras_hub.models, spec.fam.backbone_class)
    shape = {"image_shape": (size, size, 3)} if spec.fam.resizable else {}
    if weights == NONE:
        keras.utils.set_random_seed(RANDOM_INIT_SEED)
        return _random_image_tower(spec, size)
    return cls.from_preset(preset_source(spec, weights, local_dir), **shape)


def _random_image_tower(spec: HubSpec, size: int):
    """A seeded random image tower of the entry's architecture. Two-tower families get their
    vision encoder (and CLIP's projection) only: a random text tower embeds no image, and
    SigLIP 2's alone holds 256,000 x 768 token embeddings."""
    import types

    import keras
    import keras_hub

    models = keras_hub.models
    config = dict(spec.config)
    shape = (size, size, 3)
    family = spec.family
    if family == "dinov2":
        return models.DINOV2Backbone(**config, image_shape=shape)
    if family == "dinov3":
        return models.DINOV3Backbone(**config, image_shape=shape)
    if family == "vit":
        return models.ViTBackbone(**config, image_shape=shape)
    vision = {**config["vision"], "image_shape": shape}
    encoder_cls = {
        "siglip": models.SigLIPVisionEncoder,
        "clip": models.CLIPVisionEncoder,
        "metaclip_2": models.MetaCLIP2VisionEncoder,
    }[family]
    tower = types.SimpleNamespace(vision_encoder=encoder_cls(**vision))
    if config.get("projection_dim"):
        tower.vision_projection = keras.layers.Dense(
            config["projection_dim"], use_bias=False, name="vision_projection"
        )
    return tower
