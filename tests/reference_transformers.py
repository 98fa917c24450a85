"""Reference vectors from Hugging Face Transformers (PyTorch) for ``test_hub``.

Run with a Python that has ``torch`` and ``transformers`` (not project dependencies):

    python tests/reference_transformers.py CHECKPOINT_DIR PIXELS.npy OUT.json

It normalises the uint8 pixels with the checkpoint's ``preprocessor_config.json`` (no resize: the
pixels already have the model's input size) and writes the ``cls``, ``avg`` and ``cls_avg``
vectors as the model card defines them: the class token of ``last_hidden_state`` (after the final
layer norm) and the mean of its patch tokens (after the class and register tokens).
"""

import json
import sys

import numpy as np
import torch
from transformers import AutoConfig, AutoModel


def main(checkpoint: str, pixels_path: str, out: str) -> None:
    config = AutoConfig.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint).eval()
    with open(f"{checkpoint}/preprocessor_config.json") as f:
        prep = json.load(f)
    pixels = np.load(pixels_path).astype(np.float32) * prep.get("rescale_factor", 1 / 255)
    pixels = (pixels - np.float32(prep["image_mean"])) / np.float32(prep["image_std"])
    with torch.no_grad():
        tokens = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state
    tokens = tokens.numpy()
    first_patch = 1 + getattr(config, "num_register_tokens", 0)
    cls, avg = tokens[:, 0], tokens[:, first_patch:].mean(axis=1)
    vectors = {"cls": cls, "avg": avg, "cls_avg": np.concatenate([cls, avg], axis=1)}
    with open(out, "w") as f:
        json.dump({k: v.tolist() for k, v in vectors.items()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
