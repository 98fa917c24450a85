"""Saving and loading ``.keras`` models at local or remote (``gs://``) URIs.

Keras reads and writes ``.keras`` files on local paths only; remote URIs go through a temporary
local copy and ``storage.write_atomically``, so readers never see a partial file.
"""

from __future__ import annotations

import os
import tempfile

from transforms import storage


def save_keras(model, uri: str) -> None:
    """Saves ``model`` as a ``.keras`` file at ``uri``; readers never see a partial file."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(uri))
        model.save(local)
        with open(local, "rb") as f:
            data = f.read()
    storage.write_atomically(uri, lambda f: f.write(data))


def load_keras(uri: str):
    """Loads a ``.keras`` file (our custom layers registered first), without compiling it."""
    import keras

    import transforms.models.preprocessing  # noqa: F401  (registers Preprocess for load_model)

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(uri))
        with open(local, "wb") as f:
            f.write(storage.read_bytes(uri))
        return keras.models.load_model(local, compile=False)
