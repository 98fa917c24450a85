"""transforms/devices.py: how many decode threads a worker takes, visible GPUs, whether several
models fit in memory together (the ``--decode-threads`` flag is in test_config.py)."""

import os

import pytest

from transforms import devices
from transforms.devices import check_models_fit
from transforms.models.recipe import FeatureRecipe


def test_auto_decode_threads_follow_cores_and_the_device(monkeypatch):
    monkeypatch.setattr(devices, "cores_available", lambda: 16)
    assert devices.auto_decode_threads(gpu=False) == 16
    assert devices.auto_decode_threads(gpu=True) == 15  # one core drives the GPU
    assert devices.auto_decode_threads(processes_per_machine=4, gpu=False) == 4
    assert devices.auto_decode_threads(processes_per_machine=4, gpu=True) == 3
    monkeypatch.setattr(devices, "cores_available", lambda: 1)
    assert devices.auto_decode_threads(gpu=True) == 1


def test_visible_gpus_respects_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(os, "listdir", lambda path: ["0000:00:04.0", "0000:00:05.0"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.visible_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert devices.visible_gpus() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert devices.visible_gpus() == 0


def test_models_that_do_not_fit_together_are_refused():
    recipes = [
        FeatureRecipe.from_flags(backbone=name, weights="none")
        for name in ("dinov2_giant", "vgg19")
    ]
    with pytest.raises(MemoryError, match=r"dinov2_giant 4\.\d+ GiB, vgg19 0\.5\d GiB"):
        check_models_fit(recipes, memory_bytes=8 << 30)
    check_models_fit(recipes, memory_bytes=64 << 30)


def test_a_gpu_tensorflow_cannot_use_fails_the_model_load(monkeypatch):
    """A worker whose driver lists a GPU while TensorFlow sees none (no CUDA libraries: this
    machine's TensorFlow, with a GPU faked in) fails at model load, naming the cause and the
    opt-out, instead of embedding on the CPU."""
    from fakes import MeanColorHandler

    from transforms.embed import model_cache

    monkeypatch.delenv(devices.ALLOW_CPU_ENV, raising=False)
    monkeypatch.setattr(devices, "visible_gpus", lambda: 1)
    assert devices.tensorflow_gpus() == 0
    with pytest.raises(devices.GpuUnusable, match=r"tensorflow\[and-cuda\].*ALLOW_CPU_FALLBACK=1"):
        model_cache.load_model_async(MeanColorHandler(size=5)).result(timeout=60)

    monkeypatch.setenv(devices.ALLOW_CPU_ENV, "1")  # the opt-out
    devices.check_gpu_usable()
    monkeypatch.delenv(devices.ALLOW_CPU_ENV)
    monkeypatch.setattr(devices, "visible_gpus", lambda: 0)  # a CPU worker: nothing to check
    devices.check_gpu_usable()
    assert model_cache.load_model_async(MeanColorHandler(size=6)).result(timeout=60) is not None
