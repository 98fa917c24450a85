"""Beam model handlers: what the extraction needs of a model, and the one for a FeatureRecipe."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from transforms import devices, startup, storage
from transforms.embed.embedder import Embedder, frozen_graph_name
from transforms.images import DEFAULT_INTERPOLATION
from transforms.models.recipe import DEFAULT_BATCH_SIZE, FeatureRecipe
from transforms.models.weights.cache import cache_dir as default_cache_dir

_LOG = logging.getLogger(__name__)
#: Beam metrics namespace of our counters.
NAMESPACE = "featurebeam"


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
        cache_dir: where remote weight and head files are copied on the worker (default: the
            cache folder's ``weights/``, ``transforms.models.weights.cache``).
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
            from transforms.models.zero_shot import check_zero_shot

            check_zero_shot(recipe)
        self._cache_dir = cache_dir or default_cache_dir("weights")

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
            import transforms.models.preprocessing  # noqa: F401  (registers Preprocess)

            head = storage.local_copy(self._head, self._cache_dir)
        devices.set_tf_threads(self._intra_op_threads)
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
        return list(vectors)

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE
