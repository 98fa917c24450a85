"""What a worker process has to work with: its cores and whether its model runs on a GPU, and the
decode pool size that follows (``--decode-threads auto``).

On a CPU worker the model and the decoding share the cores: the pool gets the process's share of
cores, and since decoding runs at most two batches ahead of the model (``transforms.extract``),
threads that are not needed sit idle instead of taking cores from the model. On a GPU worker the
model needs one host thread and decoding is the ceiling (clip-retrieval reports being "resizing
bottlenecked" at 2,500 images/s per A100): every other core decodes.
"""

import os

#: Decode threads when a count is asked for and nothing is known (``--decode-threads`` default
#: before ``auto``).
FALLBACK_DECODE_THREADS = 2


def cores_available() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a
    container, a Kubernetes pod)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def visible_gpus() -> int:
    """NVIDIA GPUs this process could use, without importing TensorFlow: the driver's device
    list, narrowed by ``CUDA_VISIBLE_DEVICES``. (TensorFlow's own view is checked once the model
    is loaded, by :func:`tensorflow_gpus`.)"""
    try:
        found = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found
    ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    return min(found, len(ids))


def tensorflow_gpus() -> int:
    """GPUs TensorFlow sees (imports TensorFlow)."""
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def auto_decode_threads(*, processes_per_machine: int = 1, gpu: bool | None = None) -> int:
    """Decode threads for one of ``processes_per_machine`` worker processes on this machine:
    its share of the cores, less one for the model's host thread when the model runs on a GPU
    (``gpu=None``: :func:`visible_gpus` decides)."""
    share = max(1, cores_available() // max(1, processes_per_machine))
    if gpu is None:
        gpu = visible_gpus() > 0
    return max(1, share - 1) if gpu else share
