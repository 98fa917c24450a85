"""DecodeImages and EmbedImages: bytes -> pixels -> feature vectors, with errors as data.

``EmbedImages`` is Beam's own ``RunInference`` with our :class:`BackboneModelHandler`, so the model is
loaded once per worker process (``RunInference`` keeps it in a Beam ``Shared`` handle used by all
threads of the process), never pickled with the graph, and batches are formed by Beam's
``BatchElements``. Unlike Beam's stock TensorFlow handler, which calls the model eagerly, ours runs
each batch through one compiled ``tf.function`` that also casts and applies the backbone's
``preprocess_input``, so uint8 pixels travel to the model (4x less memory than float32).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from transforms import storage
from transforms.backbones import PRECISIONS, ModelSpec, build_model, preprocess, preprocess_fn
from transforms.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from transforms.listing import ImageRef

_LOG = logging.getLogger(__name__)
NAMESPACE = "featurebeam"
ERRORS_TAG = "errors"


class Decoded(NamedTuple):
    """The key that travels with an image's pixels through inference."""

    ref: ImageRef
    width: int
    height: int


def error_row(ref: ImageRef, stage: str, reason: str) -> dict[str, Any]:
    """One row of the errors table."""
    return {
        "image_id": ref.image_id,
        "uri": ref.uri,
        "stage": stage,
        "reason": reason[:2000],
        "file_size": ref.size,
        "file_version": ref.version,
    }


def feature_row(ref: ImageRef, width: int, height: int, vector: np.ndarray) -> dict[str, Any]:
    """One row of the feature table."""
    return {
        "image_id": ref.image_id,
        "uri": ref.uri,
        "label": ref.label,
        "split": ref.split,
        "width": width,
        "height": height,
        "file_size": ref.size,
        "file_version": ref.version,
        "feature": vector,
    }


def read_and_decode(
    ref: ImageRef, size: tuple[int, int], resize: str, max_pixels: int
) -> tuple[Decoded, np.ndarray] | dict[str, Any]:
    """``(Decoded, uint8 pixels)`` for a readable image, else its error row."""
    try:
        data = storage.read_bytes(ref.uri)
    except Exception as exc:  # missing, permission, network: all become error rows
        return error_row(ref, "read", f"{type(exc).__name__}: {exc}")
    try:
        image = load_image(data, size, resize=resize, max_pixels=max_pixels)
    except ImageError as exc:
        return error_row(ref, exc.stage, exc.reason)
    return Decoded(ref, image.width, image.height), image.pixels


class _Progress:
    """Per-process progress log: images done, images/s and errors, every few seconds."""

    _lock = threading.Lock()
    _state: dict[str, float] = {}

    @classmethod
    def add(cls, *, done: int = 0, errors: int = 0, every_s: float = 10.0) -> None:
        with cls._lock:
            now = time.monotonic()
            state = cls._state
            if not state:
                state.update(start=now, last=now, done=0, errors=0)
            state["done"] += done
            state["errors"] += errors
            if now - state["last"] >= every_s:
                state["last"] = now
                rate = state["done"] / max(now - state["start"], 1e-9)
                _LOG.info(
                    "progress (pid %d): %d images embedded, %.1f images/s, %d errors",
                    os.getpid(),
                    state["done"],
                    rate,
                    state["errors"],
                )


class _DecodeDoFn(beam.DoFn):
    def __init__(self, size: tuple[int, int], resize: str, max_pixels: int):
        self._size = size
        self._resize = resize
        self._max_pixels = max_pixels
        self._decoded = beam.metrics.Metrics.counter(NAMESPACE, "images_decoded")
        self._failed = beam.metrics.Metrics.counter(NAMESPACE, "decode_errors")

    def process(self, ref: ImageRef):
        result = read_and_decode(ref, self._size, self._resize, self._max_pixels)
        if isinstance(result, dict):
            self._failed.inc()
            _Progress.add(errors=1)
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, result)
        else:
            self._decoded.inc()
            yield result


class DecodeImages(beam.PTransform):
    """Reads and decodes each :class:`ImageRef` into ``(Decoded, uint8 pixels)``.

    Outputs: the main PCollection, and ``errors`` (error-table rows) for inputs that cannot be
    read or decoded.
    """

    def __init__(
        self, size: tuple[int, int], *, resize: str = "squash", max_pixels: int = DEFAULT_MAX_PIXELS
    ):
        super().__init__()
        self._dofn = _DecodeDoFn(size, resize, max_pixels)

    def expand(self, refs):
        return refs | "Decode" >> beam.ParDo(self._dofn).with_outputs(ERRORS_TAG, main="decoded")


class Embedder:
    """A loaded backbone (optionally followed by a trained head) behind one compiled function:
    uint8 batch in, float32 vectors (or class probabilities) out."""

    def __init__(
        self,
        model_spec: ModelSpec,
        weights_path: str | None,
        head_path: str | None = None,
        precision: str = "float32",
    ):
        import keras
        import tensorflow as tf

        self.model_spec = model_spec
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        previous = keras.mixed_precision.global_policy()
        if precision == "bfloat16":
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            self.model = build_model(model_spec, weights_path=weights_path)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        self.head = None
        if head_path is not None:
            import keras

            self.head = keras.models.load_model(head_path, compile=False)
        spec = model_spec.spec
        size = model_spec.image_size
        preprocess_fn(spec)  # import the preprocessing module now, not while tracing

        @tf.function(
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)], autograph=False
        )
        def embed(pixels):
            features = tf.cast(self.model(preprocess(spec, pixels), training=False), tf.float32)
            return features if self.head is None else self.head(features, training=False)

        self._embed = embed
        # Trace now (one trace serves every batch size), so that a model loaded in the background
        # is ready to run at full speed.
        self(np.zeros((1, size, size, 3), np.uint8))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self._embed(pixels).numpy().astype(np.float32, copy=False)


def set_tf_threads(intra_op: int) -> None:
    """Gives this process ``intra_op`` TensorFlow threads, intra- and inter-op (TensorFlow's
    default for both is every core of the machine). No-op when 0."""
    if intra_op <= 0:
        return
    import tensorflow as tf

    threading_config = tf.config.threading
    if threading_config.get_intra_op_parallelism_threads() == intra_op:
        return
    try:
        threading_config.set_intra_op_parallelism_threads(intra_op)
        threading_config.set_inter_op_parallelism_threads(intra_op)
    except RuntimeError as exc:  # TensorFlow already ran an op in this process
        _LOG.warning("cannot set TensorFlow threads to %d here: %s", intra_op, exc)


_MODELS: dict[str, Future] = {}
_MODELS_LOCK = threading.Lock()
_MAX_CACHED_MODELS = 2


def model_cache_key(handler: FeatureModelHandler) -> str:
    return f"{type(handler).__qualname__}:{json.dumps(handler.table_metadata(), sort_keys=True)}"


def load_model_async(handler: FeatureModelHandler) -> Future:
    """The handler's model, loaded once per worker process (in a background thread) and shared
    by all its threads; ``.result()`` waits for it and re-raises a failed load.

    Beam's ``Shared`` (what ``RunInference`` uses) frees a model when the last DoFn holding it is
    torn down; runners that set DoFns up per bundle (the DaskRunner does, per partition) would then
    reload the backbone for every bundle. This cache keeps the last two models for the life of
    the process. Loading in the background lets the caller decode images meanwhile: building a
    Keras model is mostly single-threaded Python, so another core is free.
    """
    key = model_cache_key(handler)
    with _MODELS_LOCK:
        future = _MODELS.get(key)
        if future is None or (future.done() and future.exception() is not None):
            while len(_MODELS) >= _MAX_CACHED_MODELS:
                _MODELS.pop(next(iter(_MODELS)))
            future = Future()
            _MODELS[key] = future

            def load():
                try:
                    future.set_result(handler.load_model())
                except BaseException as exc:  # handed to whoever waits for the model
                    future.set_exception(exc)

            threading.Thread(target=load, name="load-model", daemon=True).start()
        return future


def cached_model(handler: FeatureModelHandler) -> Any:
    """The handler's model (see :func:`load_model_async`), waiting for it if needed."""
    return load_model_async(handler).result()


class FeatureModelHandler(ModelHandler[np.ndarray, np.ndarray, Any]):
    """A RunInference handler that also says what its vectors are.

    ``ExtractFeatures`` needs the input size (to decode), the vector width (for the schema) and
    the metadata to record; any handler that provides these can embed images (tests use a fake).
    """

    @property
    def input_size(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def table_metadata(self) -> dict[str, str]:
        raise NotImplementedError


class BackboneModelHandler(FeatureModelHandler):
    """RunInference handler for a registered backbone (see the module docstring).

    Args:
        model_spec: backbone, weights, pooling/layer and input size.
        batch_size: images per model call (every batch but a bundle's last is this size).
        cache_dir: where remote weight and head files are copied on the worker.
        head: a trained head (``head.keras``, local or remote) applied to the features; the
            outputs are then class probabilities, ``head_classes`` wide.
        head_classes: the head's output width.
        precision: ``float32`` or ``bfloat16`` (mixed precision; vectors are still float32).
        intra_op_threads: TensorFlow's intra-op threads in each worker process (0: its default,
            every core). Worker processes sharing a machine should each get their share.
    """

    def __init__(
        self,
        model_spec: ModelSpec,
        *,
        batch_size: int = 32,
        cache_dir: str | None = None,
        head: str | None = None,
        head_classes: int = 0,
        precision: str = "float32",
        intra_op_threads: int = 0,
    ):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self._precision = precision
        self._metadata: dict[str, str] | None = None
        self._intra_op_threads = intra_op_threads
        self._model_spec = model_spec
        self._head = head
        self._head_classes = head_classes
        self._cache_dir = cache_dir or os.path.join(
            os.path.expanduser("~"), ".cache", "featurebeam", "weights"
        )

    @property
    def input_size(self) -> tuple[int, int]:
        return self._model_spec.size

    @property
    def feature_dim(self) -> int:
        return self._head_classes if self._head else self._model_spec.feature_dim

    def table_metadata(self) -> dict[str, str]:
        if self._metadata is None:  # the fingerprint hashes the weights: do it once
            self._metadata = self._table_metadata()
        return dict(self._metadata)

    def _table_metadata(self) -> dict[str, str]:
        spec = self._model_spec
        return {
            "backbone": spec.backbone,
            "weights": spec.weights,
            "weights_fingerprint": spec.fingerprint(),
            "input_size": str(spec.image_size),
            "pooling": "" if spec.layer else spec.pooling,
            "layer": spec.layer or "",
            "preprocessing": spec.spec.preprocessing,
            "feature_dim": str(spec.feature_dim),
            "precision": self._precision,
            "head": self._head or "",
        }

    def load_model(self) -> Embedder:
        weights = self._model_spec.weights
        path = (
            None
            if weights in ("imagenet", "none")
            else storage.local_copy(weights, self._cache_dir)
        )
        head = None
        if self._head is not None:
            import transforms.keras_layers  # noqa: F401  (registers our layers for load_model)

            head = storage.local_copy(self._head, self._cache_dir)
        set_tf_threads(self._intra_op_threads)
        started = time.monotonic()
        embedder = Embedder(self._model_spec, path, head, self._precision)
        _LOG.info(
            "loaded %s (%s, weights=%s) in %.1fs in pid %d",
            self._model_spec.backbone,
            self._model_spec.output_name,
            weights,
            time.monotonic() - started,
            os.getpid(),
        )
        return embedder

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: Embedder,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[np.ndarray]:
        vectors = model(np.stack(batch))
        _Progress.add(done=len(batch))
        return list(vectors)

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


def _feature_row(element: tuple[Decoded, np.ndarray]) -> dict[str, Any]:
    key, vector = element
    return feature_row(key.ref, key.width, key.height, vector)


def _failed_batch_rows(failure) -> Iterable[dict[str, Any]]:
    batch, exc = failure
    for key, _pixels in batch:
        yield error_row(key.ref, "embed", f"{type(exc).__name__}: {exc}")


class EmbedImages(beam.PTransform):
    """Runs the backbone over ``(Decoded, pixels)`` pairs; yields feature-table rows.

    Returns:
        ``{"rows": feature-table rows, "errors": error rows}``; a batch the model rejects gives
        one error row per image in it.
    """

    def __init__(self, model_handler: ModelHandler):
        super().__init__()
        self._handler = KeyedModelHandler(model_handler)

    def expand(self, decoded):
        results, failed = (
            decoded | "RunInference" >> RunInference(self._handler).with_exception_handling()
        )
        rows = results | "ToRows" >> beam.Map(_feature_row)
        errors = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch_rows)
        return {"rows": rows, "errors": errors}
