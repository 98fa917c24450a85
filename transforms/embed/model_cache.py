"""One model per worker process, loaded in the background and shared by all its threads."""

from __future__ import annotations

import json
import queue
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

from transforms import devices

if TYPE_CHECKING:
    from transforms.embed.handler import FeatureModelHandler


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
    (``benchmarks``, several backbones in one pass).
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
            devices.check_gpu_usable()  # never a silent CPU run on a GPU worker
            future.set_result(handler.load_model())
        except BaseException as exc:  # handed to whoever waits for the model
            future.set_exception(exc)
