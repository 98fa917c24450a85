"""Offline KerasHub checkpoints for tests: tiny random presets saved with KerasHub's own
``save_to_preset``, and a DINOv2 checkpoint in Transformers format written with numpy/safetensors
under the tensor names KerasHub's converter reads."""

from __future__ import annotations

import json
import pathlib

import numpy as np

#: Tiny architectures per family (registry name to file them under, backbone kwargs).
TINY = {
    "dinov2": {
        "patch_size": 14,
        "num_layers": 2,
        "hidden_dim": 32,
        "num_heads": 2,
        "intermediate_dim": 64,
        "num_register_tokens": 4,
        "image_shape": (28, 28, 3),
        "position_embedding_shape": (56, 56),
    },
    "dinov3": {
        "patch_size": 16,
        "num_layers": 2,
        "hidden_dim": 32,
        "num_heads": 2,
        "intermediate_dim": 64,
        "image_shape": (32, 32, 3),
    },
    "vit": {
        "image_shape": (32, 32, 3),
        "patch_size": 16,
        "num_layers": 2,
        "num_heads": 2,
        "hidden_dim": 32,
        "mlp_dim": 64,
    },
}

_TOWER = {"hidden_dim": 32, "num_layers": 2, "num_heads": 2, "intermediate_dim": 64}


def tiny_backbone(family: str, *, seed: int = 0, vocabulary: int = 64):
    """A small random KerasHub backbone of ``family`` (two-tower families with a ``vocabulary``
    -token text tower)."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    models = keras_hub.models
    if family == "dinov2":
        return models.DINOV2Backbone(**TINY["dinov2"])
    if family == "dinov3":
        return models.DINOV3Backbone(**TINY["dinov3"])
    if family == "vit":
        return models.ViTBackbone(**TINY["vit"])
    vision = {**_TOWER, "patch_size": 16, "image_shape": (32, 32, 3)}
    text = {**_TOWER, "vocabulary_size": vocabulary, "embedding_dim": 32}
    if family == "siglip":
        return models.SigLIPBackbone(
            models.SigLIPVisionEncoder(**vision),
            models.SigLIPTextEncoder(**text, max_sequence_length=16),
        )
    if family == "clip":
        return models.CLIPBackbone(
            models.CLIPVisionEncoder(**vision),
            models.CLIPTextEncoder(**text, max_sequence_length=16),
            projection_dim=24,
        )
    if family == "metaclip_2":
        return models.MetaCLIP2Backbone(
            models.MetaCLIP2VisionEncoder(**vision),
            models.MetaCLIP2TextEncoder(**text, max_sequence_length=16),
            projection_dim=24,
        )
    raise ValueError(family)


#: An unusual converter, so a test can tell it was read from the preset.
CONVERTER = {"scale": [0.01, 0.02, 0.03], "offset": [-1.0, -0.5, 0.25], "interpolation": "bicubic"}


def write_keras_hub_preset(
    directory: pathlib.Path, family: str, *, seed: int = 0, converter: dict | None = None
) -> pathlib.Path:
    """``save_to_preset`` of a tiny random backbone and its family's image converter."""
    import keras_hub

    backbone = tiny_backbone(family, seed=seed)
    backbone.save_to_preset(str(directory))
    converter_cls = {
        "dinov2": keras_hub.layers.DINOV2ImageConverter,
        "dinov3": keras_hub.layers.DINOV3ImageConverter,
        "vit": keras_hub.layers.ViTImageConverter,
        "siglip": keras_hub.layers.SigLIPImageConverter,
        "clip": keras_hub.layers.CLIPImageConverter,
        "metaclip_2": keras_hub.layers.MetaCLIP2ImageConverter,
    }[family]
    size = backbone.image_shape[0] if hasattr(backbone, "image_shape") else 32
    converter_cls(image_size=(size, size), **(converter or CONVERTER)).save_to_preset(
        str(directory)
    )
    return directory


def write_transformers_dinov2(
    directory: pathlib.Path,
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    registers: int = 0,
    image_size: int = 56,
    patch: int = 14,
    preprocessor: dict | None = None,
) -> pathlib.Path:
    """A Transformers-format DINOv2 checkpoint (``config.json`` + ``model.safetensors``, and a
    ``preprocessor_config.json`` unless ``preprocessor`` is ``{}``), random but seeded."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    mlp = hidden * 4
    grid = (image_size // patch) ** 2

    def t(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = {
        "embeddings.cls_token": t(1, 1, hidden),
        "embeddings.mask_token": t(1, hidden),
        "embeddings.position_embeddings": t(1, grid + 1, hidden),
        "embeddings.patch_embeddings.projection.weight": t(hidden, 3, patch, patch),
        "embeddings.patch_embeddings.projection.bias": t(hidden),
        "layernorm.weight": 1 + t(hidden),
        "layernorm.bias": t(hidden),
    }
    if registers:
        tensors["embeddings.register_tokens"] = t(1, registers, hidden)
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            tensors[f"{p}.attention.attention.{name}.weight"] = t(hidden, hidden)
            tensors[f"{p}.attention.attention.{name}.bias"] = t(hidden)
        tensors[f"{p}.attention.output.dense.weight"] = t(hidden, hidden)
        tensors[f"{p}.attention.output.dense.bias"] = t(hidden)
        for norm in ("norm1", "norm2"):
            tensors[f"{p}.{norm}.weight"] = 1 + t(hidden)
            tensors[f"{p}.{norm}.bias"] = t(hidden)
        tensors[f"{p}.layer_scale1.lambda1"] = 1 + t(hidden)
        tensors[f"{p}.layer_scale2.lambda1"] = 1 + t(hidden)
        tensors[f"{p}.mlp.fc1.weight"] = t(mlp, hidden)
        tensors[f"{p}.mlp.fc1.bias"] = t(mlp)
        tensors[f"{p}.mlp.fc2.weight"] = t(hidden, mlp)
        tensors[f"{p}.mlp.fc2.bias"] = t(hidden)
    save_file(tensors, str(directory / "model.safetensors"))
    config = {
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "architectures": ["Dinov2Model"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "mlp_ratio": 4,
        "patch_size": patch,
        "image_size": image_size,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
        "hidden_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "qkv_bias": True,
        "num_channels": 3,
    }
    if registers:
        config["num_register_tokens"] = registers
    (directory / "config.json").write_text(json.dumps(config))
    if preprocessor is None:
        preprocessor = {
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
            "rescale_factor": 1 / 255,
            "resample": 3,
            "crop_size": {"height": 224, "width": 224},
        }
    if preprocessor:
        (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory


def tiny_clip_tokenizer_vocabulary() -> tuple[dict[str, int], list[str]]:
    """A character-level CLIP BPE vocabulary (plus two merges) for prompts in lower-case ASCII."""
    chars = "abcdefghijklmnopqrstuvwxyz.,'"
    tokens = [*chars, *(c + "</w>" for c in chars), "an", "be", "<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, ["a n", "b e"]


def write_clip_preset_with_tokenizer(directory: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """A tiny CLIP preset with a tiny tokenizer and its text preprocessor: zero-shot offline."""
    import keras_hub

    vocabulary, merges = tiny_clip_tokenizer_vocabulary()
    backbone = tiny_backbone("clip", seed=seed, vocabulary=len(vocabulary))
    backbone.save_to_preset(str(directory))
    converter = keras_hub.layers.CLIPImageConverter(image_size=(32, 32), **CONVERTER)
    tokenizer = keras_hub.models.CLIPTokenizer(vocabulary=vocabulary, merges=merges)
    keras_hub.models.CLIPPreprocessor(
        tokenizer=tokenizer, image_converter=converter, sequence_length=16
    ).save_to_preset(str(directory))
    return directory
