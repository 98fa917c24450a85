"""transforms/embed/model_cache.py: one model per worker process, loaded in the background, kept
for later bundles, a failed load handed to the caller and tried again."""

from __future__ import annotations

import threading

import pytest
from fakes import MeanColorHandler

from transforms.embed import model_cache


class CountingHandler(MeanColorHandler):
    def __init__(self, name: str, *, fail: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.name, self.loads, self.fail = name, 0, fail
        self.loaded_in: list[str] = []

    def table_metadata(self):
        return {**super().table_metadata(), "backbone": self.name}

    def load_model(self):
        self.loads += 1
        self.loaded_in.append(threading.current_thread().name)
        if self.loads <= self.fail:
            raise OSError(f"{self.name}: weights not readable")
        return super().load_model()


@pytest.fixture(autouse=True)
def _empty_cache(monkeypatch):
    monkeypatch.setattr(model_cache, "_MODELS", {})


def test_a_model_is_loaded_once_in_the_loader_thread_and_shared():
    handler = CountingHandler("a")
    first = model_cache.load_model_async(handler)
    again = model_cache.load_model_async(CountingHandler("a"))  # an equal handler: same model
    assert again is first
    assert callable(first.result(timeout=30))
    assert handler.loads == 1 and handler.loaded_in == ["load-model"]


def test_a_failed_load_is_raised_to_the_caller_and_tried_again():
    handler = CountingHandler("b", fail=1)
    with pytest.raises(OSError, match="weights not readable"):
        model_cache.load_model_async(handler).result(timeout=30)
    assert callable(model_cache.load_model_async(handler).result(timeout=30))
    assert handler.loads == 2


def test_the_last_two_models_are_kept_and_a_run_of_more_keeps_them_all():
    handlers = [CountingHandler(n) for n in "cde"]
    for h in handlers:
        model_cache.load_model_async(h).result(timeout=30)
    assert len(model_cache._MODELS) == 2  # c was evicted for e
    model_cache.load_model_async(handlers[0]).result(timeout=30)
    assert handlers[0].loads == 2
    for h in handlers:
        model_cache.load_model_async(h, keep=3).result(timeout=30)
    assert len(model_cache._MODELS) == 3
    loads = [h.loads for h in handlers]
    for h in handlers:
        model_cache.load_model_async(h, keep=3).result(timeout=30)
    assert [h.loads for h in handlers] == loads  # a run of 3 backbones never swaps one out
