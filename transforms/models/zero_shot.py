"""Zero-shot classification by text prompts, for the two-tower KerasHub families (CLIP, SigLIP).

The prompts are tokenized by the preset's own preprocessor and embedded once by its text tower;
the head scores an image's ``cls`` embedding against each, as the backbone was trained to.
"""

from __future__ import annotations

from transforms.models.hub import image_model, load_backbone
from transforms.models.specs import NONE, HubSpec
from transforms.models.weights.checkpoints import preset_source

#: Zero-shot classification per two-tower family: KerasHub's text preprocessor, the backbone's
#: head (cosine similarity times its learnt scale, plus SigLIP's bias) and how logits become
#: probabilities (CLIP was trained with a softmax over captions, SigLIP with a per-pair sigmoid).
ZERO_SHOT = {
    "clip": ("CLIPPreprocessor", "clip_head", "softmax"),
    "siglip": ("SigLIPPreprocessor", "siglip_head", "sigmoid"),
}
DEFAULT_PROMPT = "a photo of {}."


def check_zero_shot(recipe) -> None:
    """Raises ValueError unless ``recipe`` can classify images by text labels."""
    spec = recipe.spec
    if not spec.is_hub or spec.family not in ZERO_SHOT:
        families = ", ".join(ZERO_SHOT)
        raise ValueError(
            f"{spec.name} has no text tower: zero-shot --labels needs a backbone of a "
            f"text-image family ({families}), e.g. siglip2_base_patch16_224"
        )
    if recipe.weights == NONE:
        raise ValueError(
            "zero-shot --labels needs a preset's text tower and tokenizer: --weights none has "
            "neither"
        )


def prompts_for(labels: list[str], template: str) -> list[str]:
    """One text per label: ``template`` with ``{}`` replaced by the label."""
    if "{}" not in template:
        raise ValueError(f"--prompt must contain {{}} where the label goes, got {template!r}")
    return [template.replace("{}", label) for label in labels]


def build_zero_shot(recipe, prompts: list[str], *, local_dir: str | None = None):
    """``(image model, head)`` from one loaded two-tower preset: the image model gives the
    ``cls`` embedding, the head maps it to one probability per prompt.

    The prompts are tokenized by the preset's own preprocessor and embedded once, here.
    """
    import keras
    import keras_hub

    check_zero_shot(recipe)
    spec: HubSpec = recipe.spec
    preprocessor_class, head_name, activation = ZERO_SHOT[spec.family]
    source = preset_source(spec, recipe.weights, local_dir)
    backbone = load_backbone(spec, recipe.weights, recipe.image_size, local_dir)
    preprocessor = getattr(keras_hub.models, preprocessor_class).from_preset(source)
    tokens = preprocessor({"prompts": list(prompts), "images": None})["token_ids"]
    text = keras.ops.convert_to_tensor(backbone.get_text_embeddings(tokens))
    images = image_model(recipe, backbone)
    features = keras.Input((images.output.shape[-1],), name="image_embedding")
    logits, _ = getattr(backbone, head_name)(features, text)
    probabilities = keras.layers.Activation(activation, dtype="float32")(logits)
    return images, keras.Model(features, probabilities, name=f"{spec.name}_zero_shot")


def text_encoder(recipe, *, local_dir: str | None = None):
    """``encode(texts) -> (n, dim) float32``: the preset's text tower, tokenized by its own
    preprocessor, giving vectors in the space of the image tower's ``cls`` embedding (what a
    ``--pooling cls`` table holds), for searching a table by words."""
    import keras
    import keras_hub

    check_zero_shot(recipe)
    spec: HubSpec = recipe.spec
    preprocessor_class = ZERO_SHOT[spec.family][0]
    source = preset_source(spec, recipe.weights, local_dir)
    backbone = load_backbone(spec, recipe.weights, recipe.image_size, local_dir)
    preprocessor = getattr(keras_hub.models, preprocessor_class).from_preset(source)

    def encode(texts):
        tokens = preprocessor({"prompts": list(texts), "images": None})["token_ids"]
        return keras.ops.convert_to_numpy(backbone.get_text_embeddings(tokens)).astype("float32")

    return encode
