"""The one backbone registry: every backbone the pipeline can run, as data.

The ``keras.applications`` CNNs (constructor, default input size, ``preprocess_input`` module,
feature width, named layers such as VGG16's 4096-d ``fc2``, parameter count), then the KerasHub
presets (DINOv2 with and without registers, DINOv3, ViT, SigLIP / SigLIP 2, CLIP, MetaCLIP 2).
Each KerasHub entry carries its preset's architecture (what the preset's ``config.json`` states),
because ``--weights none`` must build the same network offline on every worker and the widths must
be known before anything is downloaded; the *weights* and the *preprocessing* are read from the
preset itself whenever there is one (``transforms.models.weights.checkpoints``).

Nothing here imports Keras. :func:`get_backbone` is the one lookup; unknown names fail with the
closest valid ones.
"""

from __future__ import annotations

import difflib

from transforms.models.specs import PREDICTIONS, BackboneSpec, HubSpec

# --- keras.applications -------------------------------------------------------------------------


def _spec(name, constructor, module, input_size, feature_dim, layers=None, **kw) -> BackboneSpec:
    layers = {**(layers or {}), PREDICTIONS: 1000}
    return BackboneSpec(name, constructor, module, input_size, feature_dim, layers=layers, **kw)


_VGG_LAYERS = {"fc1": 4096, "fc2": 4096}

_SPECS = [
    _spec("vgg16", "VGG16", "vgg16", 224, 512, layers=_VGG_LAYERS, params_m=138.4),
    _spec("vgg19", "VGG19", "vgg19", 224, 512, layers=_VGG_LAYERS, params_m=143.7),
    _spec("resnet50", "ResNet50", "resnet", 224, 2048, params_m=25.6),
    _spec("resnet101", "ResNet101", "resnet", 224, 2048, params_m=44.7),
    _spec("resnet152", "ResNet152", "resnet", 224, 2048, params_m=60.4),
    _spec("resnet50_v2", "ResNet50V2", "resnet_v2", 224, 2048, params_m=25.6),
    _spec("resnet101_v2", "ResNet101V2", "resnet_v2", 224, 2048, params_m=44.7),
    _spec("resnet152_v2", "ResNet152V2", "resnet_v2", 224, 2048, params_m=60.4),
    _spec("inception_v3", "InceptionV3", "inception_v3", 299, 2048, min_size=75, params_m=23.9),
    _spec(
        "inception_resnet_v2",
        "InceptionResNetV2",
        "inception_resnet_v2",
        299,
        1536,
        min_size=75,
        params_m=55.9,
    ),
    _spec("xception", "Xception", "xception", 299, 2048, min_size=71, params_m=22.9),
    _spec("mobilenet", "MobileNet", "mobilenet", 224, 1024, params_m=4.3),
    _spec("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, 1280, params_m=3.5),
    _spec("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, 576, params_m=2.6),
    _spec("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, 960, params_m=5.5),
    _spec("efficientnet_b0", "EfficientNetB0", "efficientnet", 224, 1280, params_m=5.3),
    _spec("efficientnet_b1", "EfficientNetB1", "efficientnet", 240, 1280, params_m=7.9),
    _spec("efficientnet_b2", "EfficientNetB2", "efficientnet", 260, 1408, params_m=9.2),
    _spec("efficientnet_b3", "EfficientNetB3", "efficientnet", 300, 1536, params_m=12.3),
    _spec("efficientnet_b4", "EfficientNetB4", "efficientnet", 380, 1792, params_m=19.5),
    _spec("efficientnet_b5", "EfficientNetB5", "efficientnet", 456, 2048, params_m=30.6),
    _spec("efficientnet_b6", "EfficientNetB6", "efficientnet", 528, 2304, params_m=43.3),
    _spec("efficientnet_b7", "EfficientNetB7", "efficientnet", 600, 2560, params_m=66.7),
    _spec("efficientnet_v2_b0", "EfficientNetV2B0", "efficientnet_v2", 224, 1280, params_m=7.2),
    _spec("efficientnet_v2_b1", "EfficientNetV2B1", "efficientnet_v2", 240, 1280, params_m=8.2),
    _spec("efficientnet_v2_b2", "EfficientNetV2B2", "efficientnet_v2", 260, 1408, params_m=10.2),
    _spec("efficientnet_v2_b3", "EfficientNetV2B3", "efficientnet_v2", 300, 1536, params_m=14.5),
    _spec("efficientnet_v2_s", "EfficientNetV2S", "efficientnet_v2", 384, 1280, params_m=21.6),
    _spec("efficientnet_v2_m", "EfficientNetV2M", "efficientnet_v2", 480, 1280, params_m=54.4),
    _spec("efficientnet_v2_l", "EfficientNetV2L", "efficientnet_v2", 480, 1280, params_m=119.0),
    _spec("densenet121", "DenseNet121", "densenet", 224, 1024, params_m=8.1),
    _spec("densenet169", "DenseNet169", "densenet", 224, 1664, params_m=14.3),
    _spec("densenet201", "DenseNet201", "densenet", 224, 1920, params_m=20.2),
    _spec("convnext_tiny", "ConvNeXtTiny", "convnext", 224, 768, params_m=28.6),
    _spec("convnext_small", "ConvNeXtSmall", "convnext", 224, 768, params_m=50.2),
    _spec("convnext_base", "ConvNeXtBase", "convnext", 224, 1024, params_m=88.5),
    _spec("convnext_large", "ConvNeXtLarge", "convnext", 224, 1536, params_m=197.7),
    _spec("convnext_xlarge", "ConvNeXtXLarge", "convnext", 224, 2048, params_m=350.1),
]

# --- KerasHub presets -----------------------------------------------------------------------------
# Architectures as the presets' config.json state them (needed for --weights none offline and for
# the widths); the weights and preprocessing always come from the preset when there is one.


def _dinov2(name, hidden, layers, heads, *, registers=0, swiglu=False):
    config = {
        "patch_size": 14,
        "num_layers": layers,
        "hidden_dim": hidden,
        "num_heads": heads,
        "intermediate_dim": hidden * 4,
        "num_register_tokens": registers,
        "use_swiglu_ffn": swiglu,
        "position_embedding_shape": (518, 518),
        "antialias_in_interpolation": registers > 0,
    }
    return HubSpec(name, "dinov2", 224, 14, config)


def _dinov3(name, hidden, layers, heads, intermediate, *, gated=False):
    config = {
        "patch_size": 16,
        "num_layers": layers,
        "hidden_dim": hidden,
        "num_heads": heads,
        "intermediate_dim": intermediate,
        "num_register_tokens": 4,
        "use_gated_mlp": gated,
        "hidden_activation": "silu" if gated else "gelu",
        "use_key_bias": False,
    }
    return HubSpec(name, "dinov3", 224, 16, config)


def _vit(name, size, patch, hidden, layers, heads):
    config = {
        "patch_size": patch,
        "num_layers": layers,
        "hidden_dim": hidden,
        "num_heads": heads,
        "mlp_dim": hidden * 4,
    }
    return HubSpec(name, "vit", size, patch, config)


_SIGLIP_TOWERS = {  # hidden, layers, heads, intermediate (the same for both towers)
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "so400m": (1152, 27, 16, 4304),
}


def _siglip(name, size, patch, tower, *, vocabulary):
    hidden, layers, heads, intermediate = _SIGLIP_TOWERS[tower]
    common = {
        "hidden_dim": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "intermediate_dim": intermediate,
    }
    text = {**common, "vocabulary_size": vocabulary, "embedding_dim": hidden}
    config = {"vision": {**common, "patch_size": patch}, "text": text, "projection_dim": None}
    return HubSpec(name, "siglip", size, patch, config)


def _clip(name, size, patch, vision, text, projection, *, family="clip", activation="quick_gelu"):
    (v_hidden, v_layers, v_heads), (t_hidden, t_layers, t_heads, vocabulary) = vision, text
    config = {
        "vision": {
            "patch_size": patch,
            "hidden_dim": v_hidden,
            "num_layers": v_layers,
            "num_heads": v_heads,
            "intermediate_dim": v_hidden * 4,
            "intermediate_activation": activation,
        },
        "text": {
            "vocabulary_size": vocabulary,
            "embedding_dim": t_hidden,
            "hidden_dim": t_hidden,
            "num_layers": t_layers,
            "num_heads": t_heads,
            "intermediate_dim": t_hidden * 4,
            "intermediate_activation": activation,
        },
        "projection_dim": projection,
    }
    return HubSpec(name, family, size, patch, config)


_CLIP_VOCAB = 49408
_METACLIP_2_VOCAB = 901629

HUB_SPECS = [
    _dinov2("dinov2_small", 384, 12, 6),
    _dinov2("dinov2_base", 768, 12, 12),
    _dinov2("dinov2_large", 1024, 24, 16),
    _dinov2("dinov2_giant", 1536, 40, 24, swiglu=True),
    _dinov2("dinov2_with_registers_small", 384, 12, 6, registers=4),
    _dinov2("dinov2_with_registers_base", 768, 12, 12, registers=4),
    _dinov2("dinov2_with_registers_large", 1024, 24, 16, registers=4),
    _dinov2("dinov2_with_registers_giant", 1536, 40, 24, registers=4, swiglu=True),
    _dinov3("dinov3_vit_small_lvd1689m", 384, 12, 6, 1536),
    _dinov3("dinov3_vit_small_plus_lvd1689m", 384, 12, 6, 1536, gated=True),
    _dinov3("dinov3_vit_base_lvd1689m", 768, 12, 12, 3072),
    _dinov3("dinov3_vit_large_lvd1689m", 1024, 24, 16, 4096),
    _dinov3("dinov3_vit_huge_plus_lvd1689m", 1280, 32, 20, 5120, gated=True),
    _dinov3("dinov3_vit_large_sat493m", 1024, 24, 16, 4096),
    _vit("vit_base_patch16_224_imagenet", 224, 16, 768, 12, 12),
    _vit("vit_base_patch16_384_imagenet", 384, 16, 768, 12, 12),
    _vit("vit_base_patch32_384_imagenet", 384, 32, 768, 12, 12),
    _vit("vit_large_patch16_224_imagenet", 224, 16, 1024, 24, 16),
    _vit("vit_large_patch16_384_imagenet", 384, 16, 1024, 24, 16),
    _vit("vit_large_patch32_384_imagenet", 384, 32, 1024, 24, 16),
    _vit("vit_base_patch16_224_imagenet21k", 224, 16, 768, 12, 12),
    _vit("vit_base_patch32_224_imagenet21k", 224, 32, 768, 12, 12),
    _vit("vit_large_patch16_224_imagenet21k", 224, 16, 1024, 24, 16),
    _vit("vit_large_patch32_224_imagenet21k", 224, 32, 1024, 24, 16),
    _vit("vit_huge_patch14_224_imagenet21k", 224, 14, 1280, 32, 16),
    *(
        _siglip(f"siglip_base_patch16_{s}", s, 16, "base", vocabulary=32000)
        for s in (224, 256, 384, 512)
    ),
    *(_siglip(f"siglip_large_patch16_{s}", s, 16, "large", vocabulary=32000) for s in (256, 384)),
    *(_siglip(f"siglip_so400m_patch14_{s}", s, 14, "so400m", vocabulary=32000) for s in (224, 384)),
    *(
        _siglip(f"siglip2_base_patch16_{s}", s, 16, "base", vocabulary=256000)
        for s in (224, 256, 384)
    ),
    _siglip("siglip2_base_patch32_256", 256, 32, "base", vocabulary=256000),
    *(
        _siglip(f"siglip2_large_patch16_{s}", s, 16, "large", vocabulary=256000)
        for s in (256, 384, 512)
    ),
    *(
        _siglip(f"siglip2_so400m_patch14_{s}", s, 14, "so400m", vocabulary=256000)
        for s in (224, 384)
    ),
    *(
        _siglip(f"siglip2_so400m_patch16_{s}", s, 16, "so400m", vocabulary=256000)
        for s in (256, 384, 512)
    ),
    _clip("clip_vit_base_patch16", 224, 16, (768, 12, 12), (512, 12, 8, _CLIP_VOCAB), 512),
    _clip("clip_vit_base_patch32", 224, 32, (768, 12, 12), (512, 12, 8, _CLIP_VOCAB), 512),
    _clip("clip_vit_large_patch14", 224, 14, (1024, 24, 16), (768, 12, 12, _CLIP_VOCAB), 768),
    _clip("clip_vit_large_patch14_336", 336, 14, (1024, 24, 16), (768, 12, 12, _CLIP_VOCAB), 768),
    _clip(
        "clip_vit_b_32_laion2b_s34b_b79k",
        224,
        32,
        (768, 12, 12),
        (512, 12, 8, _CLIP_VOCAB),
        512,
        activation="gelu",
    ),
    _clip(
        "clip_vit_h_14_laion2b_s32b_b79k",
        224,
        14,
        (1280, 32, 16),
        (1024, 24, 16, _CLIP_VOCAB),
        1024,
        activation="gelu",
    ),
    *(
        _clip(
            f"metaclip_2_vit_huge_patch14_{s}",
            s,
            14,
            (1280, 32, 16),
            (1024, 24, 16, _METACLIP_2_VOCAB),
            1024,
            family="metaclip_2",
            activation="gelu",
        )
        for s in (224, 378)
    ),
]


#: Every backbone: the ``keras.applications`` CNNs above, then the KerasHub presets
#: (DINOv2/v3, ViT, SigLIP/SigLIP 2, CLIP, MetaCLIP 2).
BACKBONES: dict[str, BackboneSpec | HubSpec] = {spec.name: spec for spec in [*_SPECS, *HUB_SPECS]}


def get_backbone(name: str) -> BackboneSpec | HubSpec:
    """Looks a backbone up by name (case-insensitive; ``-`` and ``_`` are equivalent).

    Raises:
        ValueError: unknown name, naming up to three close ones and the command that lists
            all (`featurebeam backbones`).
    """
    key = name.strip().lower().replace("-", "_")
    if key not in BACKBONES:
        close = difflib.get_close_matches(key, BACKBONES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}{hint}; featurebeam backbones lists all {len(BACKBONES)}"
        )
    return BACKBONES[key]
