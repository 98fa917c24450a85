"""The Embedder: a loaded backbone (optionally followed by a head) behind one compiled function,
and the frozen graph of the ``keras.applications`` backbones with its cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from importlib import metadata as packages

import numpy as np

from transforms import startup
from transforms.models.build import build_model, build_zero_shot
from transforms.models.recipe import DEFAULT_PRECISION, FeatureRecipe
from transforms.models.registry import BACKBONES

_LOG = logging.getLogger(__name__)


class Embedder:
    """A loaded backbone (optionally followed by a trained head) behind one compiled function:
    uint8 batch in, float32 vectors (or class probabilities) out.

    ``frozen_graph``: a cache file for the function with its weights folded in as constants
    (Keras applications backbones without a head; see :func:`frozen_graph_name`). When it
    exists, it is loaded instead of building the Keras model and loading its weights; when it
    does not, the function is frozen after tracing and written there. Folding lets TensorFlow's
    graph optimiser fuse the batch norms into the convolutions: MobileNetV2 ran 1.1-1.2x faster,
    with the same vectors (largest difference 5e-18), and a cached graph starts in about 1.9 s
    instead of 4.2 s for building, loading weights and tracing (2-core AVX2 CPU).
    """

    def __init__(
        self,
        recipe: FeatureRecipe,
        weights_path: str | None,
        head_path: str | None = None,
        *,
        prompts: Sequence[str] | None = None,
        frozen_graph: str | None = None,
    ):
        import keras
        import tensorflow as tf

        startup.mark("tensorflow import")
        self.recipe = recipe
        self.head = None
        size = recipe.image_size
        sample = np.zeros((1, size, size, 3), np.uint8)
        if frozen_graph and os.path.exists(frozen_graph):
            try:
                self._embed = _load_frozen(frozen_graph)
                startup.mark("cached graph load")
                self(sample)
                startup.mark("trace")
                return
            except Exception as exc:  # a damaged or foreign file: rebuild and rewrite it
                _LOG.warning("cannot use the cached graph %s (%s); rebuilding", frozen_graph, exc)
        if prompts:  # zero-shot: the head scores the image embedding against each prompt
            self.model, self.head = build_zero_shot(recipe, prompts, weights_path=weights_path)
        else:
            self.model = build_model(recipe, weights_path=weights_path)
        if head_path is not None:
            self.head = keras.models.load_model(head_path, compile=False)
        from transforms.models.preprocessing import preprocess, preprocess_fn

        spec = recipe.spec
        preprocess_fn(spec)  # import the preprocessing module now, not while tracing

        # XLA fuses the transformers' attention and MLP blocks: measured 1.56x (DINOv2-small) and
        # 1.22x (SigLIP-base) model-only on a 2-core AVX2 CPU (benchmarks, "modern
        # backbones"). The CNNs stay on TensorFlow's kernels (depthwise convolutions lost).
        @tf.function(
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
            autograph=False,
            jit_compile=recipe.is_hub,
        )
        def embed(pixels):
            features = tf.cast(self.model(preprocess(spec, pixels), training=False), tf.float32)
            return features if self.head is None else self.head(features, training=False)

        self._embed = embed
        if frozen_graph:
            self._embed = _freeze(embed, frozen_graph)
        # Trace now (one trace serves every batch size), so that a model loaded in the background
        # is ready to run at full speed.
        self(sample)
        startup.mark("trace")

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self._embed(pixels).numpy().astype(np.float32, copy=False)


#: Bumped when the frozen graph's inputs, outputs or folding change.
_FROZEN_FORMAT = "1"


def frozen_graph_name(metadata: dict[str, str]) -> str | None:
    """The cache file name of a recipe's frozen function (its table metadata, which fingerprints
    the weights, and TensorFlow's version), or None where freezing does not apply: KerasHub
    towers (compiled with XLA instead), heads, zero-shot prompts and bfloat16."""
    spec = BACKBONES.get(metadata.get("backbone", ""))
    if metadata.get("head") or spec is None or spec.is_hub:
        return None
    if metadata.get("precision", DEFAULT_PRECISION) != DEFAULT_PRECISION:
        # Folded into bfloat16 arithmetic, the batch norms round differently: the vectors would
        # no longer match the model's (a served head would see other features).
        return None
    key = json.dumps(
        [metadata, packages.version("tensorflow"), _FROZEN_FORMAT], sort_keys=True
    ).encode()
    return f"{metadata['backbone']}-{hashlib.sha256(key).hexdigest()[:24]}.pb"


def _freeze(function, path: str):
    """``function`` with its variables folded into constants, saved to ``path`` (atomically;
    a failed write only costs the next process a rebuild)."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    frozen = convert_variables_to_constants_v2(function.get_concrete_function())
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(frozen.graph.as_graph_def().SerializeToString())
        os.replace(tmp, path)
    except OSError as exc:
        _LOG.warning("cannot cache the frozen graph at %s: %s", path, exc)
    return _single_output(frozen)


def _load_frozen(path: str):
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    with open(path, "rb") as f:
        graph_def.ParseFromString(f.read())
    inputs = [n.name for n in graph_def.node if n.op == "Placeholder"]
    if len(inputs) != 1:
        raise ValueError(f"expected one input, found {inputs}")
    wrapped = tf.compat.v1.wrap_function(
        lambda: tf.compat.v1.import_graph_def(graph_def, name=""), []
    )
    consumed = {name.split(":")[0].lstrip("^") for n in graph_def.node for name in n.input}
    outputs = [n.name for n in graph_def.node if n.name not in consumed and n.op == "Identity"]
    if len(outputs) != 1:
        raise ValueError(f"expected one output, found {outputs}")
    output = outputs[0]
    function = wrapped.prune(
        wrapped.graph.as_graph_element(f"{inputs[0]}:0"),
        wrapped.graph.as_graph_element(f"{output}:0"),
    )
    return _single_output(function)


def _single_output(function):
    import tensorflow as tf

    def call(pixels):
        out = function(tf.convert_to_tensor(pixels, tf.uint8))
        return out[0] if isinstance(out, (list, tuple)) else out

    return call
