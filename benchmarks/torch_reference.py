"""The PyTorch row of the bench's hub section (``benchmarks.bench``), run by a Python that has
torch and transformers (not project dependencies), by file path; never imported by the project:

    python benchmarks/torch_reference.py BACKBONE BATCH_SIZE BATCHES

Builds the same architecture as our registry entry in Hugging Face Transformers (random init:
speed does not depend on the weights), and prints one JSON line with the model-only images/s
over ``BATCHES`` batches after one warm-up batch, under ``torch.inference_mode`` with
Transformers' default attention (SDPA) and PyTorch's default threads (one per core).
"""

import json
import sys
import time

import torch
import transformers

#: Registry name -> (config class, model class, config kwargs, input side).
ARCHITECTURES = {
    "dinov2_small": (
        "Dinov2Config",
        "Dinov2Model",
        dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4),
        224,
    ),
    "siglip_base_patch16_224": (
        "SiglipVisionConfig",
        "SiglipVisionModel",
        dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
        ),
        224,
    ),
}


def main(backbone: str, batch_size: int, batches: int) -> None:
    config_name, model_name, kwargs, size = ARCHITECTURES[backbone]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**kwargs)
    model = getattr(transformers, model_name)(config).eval()
    pixels = torch.randn(batch_size, 3, size, size)
    with torch.inference_mode():
        model(pixel_values=pixels)
        started = time.perf_counter()
        for _ in range(batches):
            model(pixel_values=pixels)
        seconds = time.perf_counter() - started
    result = {
        "per_s": batch_size * batches / seconds,
        "threads": torch.get_num_threads(),
        "version": f"torch {torch.__version__} + transformers {transformers.__version__}",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
