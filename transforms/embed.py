"""Embedding images: the per-worker model and its handler, row builders, and progress.

:class:`BackboneModelHandler` is a Beam ``ModelHandler`` for a :class:`~transforms.recipe.FeatureRecipe`
(usable with Beam's own ``RunInference`` in pipelines that compose their own graph). Its model is an
:class:`Embedder`: the backbone (optionally followed by a trained head) behind one compiled
``tf.function`` that also casts and applies the backbone's ``preprocess_input``, so uint8 pixels
travel to the model (4x less memory than float32). :func:`load_model_async` loads it once per worker
process, in the background. ``transforms.extract`` drives it chunk by chunk.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from transforms import startup, storage
from transforms.backbones import (
    BACKBONES,
    build_model,
    build_zero_shot,
    preprocess,
    preprocess_fn,
)
from transforms.images import DEFAULT_INTERPOLATION, ImageError, Target, load_images
from transforms.listing import ImageRef
from transforms.recipe import DEFAULT_BATCH_SIZE, FeatureRecipe

_LOG = logging.getLogger(__name__)
NAMESPACE = "featurebeam"


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
    ref: ImageRef, targets: Sequence[Target], max_pixels: int
) -> list[tuple[Decoded, np.ndarray]] | dict[str, Any]:
    """The file read once and decoded for every target: ``(Decoded, uint8 pixels)`` per target,
    or the image's error row."""
    try:
        data = storage.read_bytes(ref.uri)
    except Exception as exc:  # missing, permission, network: all become error rows
        return error_row(ref, "read", f"{type(exc).__name__}: {exc}")
    try:
        images = load_images(data, targets, max_pixels=max_pixels)
    except ImageError as exc:
        return error_row(ref, exc.stage, exc.reason)
    return [(Decoded(ref, image.width, image.height), image.pixels) for image in images]


class Progress:
    """This process's embedding progress: a tqdm bar on a terminal (images done out of the
    total, images/s, errors, ETA), else a log line every ``every_s`` seconds.

    The launching process calls :meth:`start` with the run's total; worker processes of other
    runners (which never see it) log their own counts.
    """

    _lock = threading.Lock()
    _state: dict[str, Any] = {}

    @classmethod
    def start(cls, total: int, *, bar: bool, every_s: float = 10.0) -> None:
        """A new run of ``total`` images (summed over the tables of a multi-backbone run)."""
        with cls._lock:
            cls._close_bar()
            cls._state = cls._fresh(total, every_s)
            if bar and total:
                from tqdm import tqdm

                cls._state["bar"] = tqdm(
                    total=total, unit="img", desc="embedding", dynamic_ncols=True, leave=True
                )

    @staticmethod
    def _fresh(total: int = 0, every_s: float = 10.0) -> dict[str, Any]:
        now = time.monotonic()
        return dict(start=now, last=now, done=0, errors=0, total=total, every_s=every_s)

    @classmethod
    def finish(cls) -> None:
        with cls._lock:
            cls._close_bar()
            cls._state = {}

    @classmethod
    def _close_bar(cls) -> None:
        bar = cls._state.pop("bar", None)
        if bar is not None:
            bar.close()

    @classmethod
    def add(cls, *, done: int = 0, errors: int = 0) -> None:
        """``done`` images embedded and ``errors`` images failed (both advance the bar)."""
        with cls._lock:
            state = cls._state
            if not state:  # a worker process that never saw the run's start
                state.update(cls._fresh())
            now = time.monotonic()
            state["done"] += done
            state["errors"] += errors
            bar = state.get("bar")
            if bar is not None:
                if errors:
                    bar.set_postfix(errors=state["errors"], refresh=False)
                bar.update(done + errors)
                return
            if now - state["last"] < state["every_s"]:
                return
            state["last"] = now
            finished = state["done"] + state["errors"]
            rate = finished / max(now - state["start"], 1e-9)
            of = ""
            if state["total"]:
                eta = (state["total"] - finished) / rate if rate else float("inf")
                of = f" of {state['total']} ({finished / state['total']:.0%}, ETA {eta:.0f} s)"
            _LOG.info(
                "progress (pid %d): %d images%s, %.1f images/s, %d errors",
                os.getpid(),
                finished,
                of,
                rate,
                state["errors"],
            )


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
        spec = recipe.spec
        preprocess_fn(spec)  # import the preprocessing module now, not while tracing

        # XLA fuses the transformers' attention and MLP blocks: measured 1.56x (DINOv2-small) and
        # 1.22x (SigLIP-base) model-only on a 2-core AVX2 CPU (pipeline.bench, "modern
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
    import hashlib

    spec = BACKBONES.get(metadata.get("backbone", ""))
    if metadata.get("head") or spec is None or spec.kind != "keras_applications":
        return None
    if metadata.get("precision", "float32") != "float32":
        # Folded into bfloat16 arithmetic, the batch norms round differently: the vectors would
        # no longer match the model's (a served head would see other features).
        return None
    from importlib import metadata as packages

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


#: Share of a worker's memory the weights of a multi-backbone run may take; the rest is left for
#: traced graphs, activations, decoded images and Beam.
MODEL_MEMORY_SHARE = 0.4


def machine_memory_bytes() -> int:
    """This machine's memory, or its cgroup limit when lower (a container, a Dataflow VM)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def check_models_fit(
    recipes: Sequence[FeatureRecipe],
    *,
    processes_per_machine: int = 1,
    memory_bytes: int | None = None,
) -> None:
    """Refuses a multi-backbone run whose models cannot all stay loaded in each worker process
    (every model is loaded once per process and kept; none is swapped out).

    Raises:
        MemoryError: naming each model's weight size and the budget.
    """
    memory = memory_bytes or machine_memory_bytes()
    budget = memory * MODEL_MEMORY_SHARE / max(1, processes_per_machine)
    sizes = {r.backbone: r.weight_bytes() for r in recipes}
    if sum(sizes.values()) > budget:
        listed = ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in sizes.items())
        raise MemoryError(
            f"these backbones' weights ({listed}; {sum(sizes.values()) / 2**30:.2f} GiB) do not "
            f"fit together in {budget / 2**30:.2f} GiB, {MODEL_MEMORY_SHARE:.0%} of "
            f"{memory / 2**30:.1f} GiB per worker process x {processes_per_machine}; run them "
            "separately or on larger workers"
        )


_MODELS: dict[str, Future] = {}
_MODELS_LOCK = threading.Lock()
_MAX_CACHED_MODELS = 2


def model_cache_key(handler: FeatureModelHandler) -> str:
    return f"{type(handler).__qualname__}:{json.dumps(handler.table_metadata(), sort_keys=True)}"


def load_model_async(handler: FeatureModelHandler, *, keep: int = 1) -> Future:
    """The handler's model, loaded once per worker process (in a background thread) and shared
    by all its threads; ``.result()`` waits for it and re-raises a failed load.

    Beam's ``Shared`` (what ``RunInference`` uses) frees a model when the last DoFn holding it is
    torn down; runners that set DoFns up per bundle (the DaskRunner does, per partition) would then
    reload the backbone for every bundle. This cache keeps the last two models for the life of
    the process; a run of ``keep`` backbones keeps them all (never swapping one out for another).
    Loading in the background lets the caller decode images meanwhile: building a
    Keras model is mostly single-threaded Python, so another core is free. Models load one after
    another, in the order asked for, in one loader thread: loads hold the GIL, so two at once
    would both finish late, while in turn the first model embeds while the next one loads
    (``pipeline.bench``, several backbones in one pass).
    """
    key = model_cache_key(handler)
    with _MODELS_LOCK:
        future = _MODELS.get(key)
        if future is None or (future.done() and future.exception() is not None):
            while len(_MODELS) >= max(_MAX_CACHED_MODELS, keep):
                _MODELS.pop(next(iter(_MODELS)))
            future = Future()
            _MODELS[key] = future

            _submit_load(handler, future)
        return future


_LOADS: queue.Queue = queue.Queue()
_LOADER: list[threading.Thread] = []


def _submit_load(handler: FeatureModelHandler, future: Future) -> None:
    """Queues a load for this process's one loader thread (started on first use; a daemon, so a
    hung load never blocks the process from exiting)."""
    if not _LOADER or not _LOADER[0].is_alive():
        _LOADER[:] = [threading.Thread(target=_load_forever, name="load-model", daemon=True)]
        _LOADER[0].start()
    _LOADS.put((handler, future))


def _load_forever() -> None:
    while True:
        handler, future = _LOADS.get()
        try:
            future.set_result(handler.load_model())
        except BaseException as exc:  # handed to whoever waits for the model
            future.set_exception(exc)


class FeatureModelHandler(ModelHandler[np.ndarray, np.ndarray, Any]):
    """A RunInference handler that also says what its vectors are.

    ``ExtractFeatures`` needs the input size and resize mode (to decode), the vector width (for
    the schema) and the metadata to record; any handler that provides these can embed images
    (tests use a fake).
    """

    @property
    def input_size(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def resize(self) -> str:
        raise NotImplementedError

    @property
    def interpolation(self) -> str:
        return DEFAULT_INTERPOLATION

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        return self.batch_elements_kwargs().get("max_batch_size", DEFAULT_BATCH_SIZE)

    def table_metadata(self) -> dict[str, str]:
        raise NotImplementedError


class BackboneModelHandler(FeatureModelHandler):
    """RunInference handler for a :class:`FeatureRecipe` (see the module docstring).

    Args:
        recipe: what makes the vectors (backbone, weights, pooling/layer, size, resize, precision).
        batch_size: images per model call (every batch but a bundle's last is this size).
        cache_dir: where remote weight and head files are copied on the worker.
        head: a trained head (``head.keras``, local or remote) applied to the features; the
            outputs are then class probabilities, ``head_classes`` wide.
        head_classes: the head's output width.
        prompts: zero-shot classification: one text per class, scored against each image by
            the backbone's text tower (two-tower KerasHub backbones); the outputs are then one
            probability per prompt.
        intra_op_threads: TensorFlow's intra-op threads in each worker process (0: its default,
            every core). Worker processes sharing a machine should each get their share.
    """

    def __init__(
        self,
        recipe: FeatureRecipe,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        cache_dir: str | None = None,
        head: str | None = None,
        head_classes: int = 0,
        prompts: Sequence[str] | None = None,
        intra_op_threads: int = 0,
    ):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self.recipe = recipe
        # Read here, where the job is launched: a KerasHub preset's converter is read with
        # KerasHub, and importing it (and TensorFlow) from a decode thread of a worker while the
        # model loads in another thread races on TensorFlow's module initialisation.
        self._interpolation = recipe.interpolation
        self._metadata: dict[str, str] | None = None
        self._intra_op_threads = intra_op_threads
        self._head = head
        self._head_classes = head_classes
        self._prompts = tuple(prompts or ())
        if self._prompts:
            from transforms.hub import check_zero_shot

            check_zero_shot(recipe)
        self._cache_dir = cache_dir or os.path.join(
            os.path.expanduser("~"), ".cache", "featurebeam", "weights"
        )

    @property
    def input_size(self) -> tuple[int, int]:
        return self.recipe.size

    @property
    def resize(self) -> str:
        return self.recipe.resize

    @property
    def interpolation(self) -> str:
        return self._interpolation

    @property
    def feature_dim(self) -> int:
        if self._prompts:
            return len(self._prompts)
        return self._head_classes if self._head else self.recipe.feature_dim

    def table_metadata(self) -> dict[str, str]:
        if self._metadata is None:  # the fingerprint hashes the weights: do it once
            head = "zero-shot" if self._prompts else self._head or ""
            self._metadata = {**self.recipe.to_metadata(), "head": head}
            if self._prompts:
                self._metadata["prompts"] = json.dumps(self._prompts)
        return dict(self._metadata)

    def load_model(self) -> Embedder:
        recipe = self.recipe
        path = None
        if recipe.weights_file is not None:
            path = storage.local_copy(recipe.weights_file, self._cache_dir)  # file or folder
        head = None
        if self._head is not None:
            import transforms.keras_layers  # noqa: F401  (registers our layers for load_model)

            head = storage.local_copy(self._head, self._cache_dir)
        set_tf_threads(self._intra_op_threads)
        started = time.monotonic()
        name = frozen_graph_name(self.table_metadata())
        frozen = os.path.join(self._cache_dir, "graphs", name) if name else None
        embedder = Embedder(recipe, path, head, prompts=self._prompts, frozen_graph=frozen)
        _LOG.info(
            "loaded %s (%s, weights=%s, %s) in %.1fs in pid %d",
            recipe.backbone,
            recipe.output_name,
            recipe.weights,
            recipe.precision,
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
        if startup.mark("first batch"):
            _LOG.info("first batch embedded %s", startup.describe())
        Progress.add(done=len(batch))
        return list(vectors)

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE
