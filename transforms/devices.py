"""What a worker process has to work with: its cores and whether its model runs on a GPU, and the
decode pool size that follows (``--decode-threads auto``).

On a CPU worker the model and the decoding share the cores: the pool gets the process's share of
cores, and since decoding runs at most two batches ahead of the model (``transforms.extract``),
threads that are not needed sit idle instead of taking cores from the model. On a GPU worker the
model needs one host thread and decoding is the ceiling (clip-retrieval reports being "resizing
bottlenecked" at 2,500 images/s per A100): every other core decodes.

It also sizes the model side: TensorFlow's threads per worker process (:func:`set_tf_threads`) and
whether a multi-backbone run's models fit in a worker's memory (:func:`check_models_fit`).
"""

import logging
import os
from collections.abc import Sequence

_LOG = logging.getLogger(__name__)

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


#: Set to ``1`` to let a worker that sees a GPU TensorFlow cannot use run on its CPU anyway.
ALLOW_CPU_ENV = "FEATUREBEAM_ALLOW_CPU_FALLBACK"


class GpuUnusable(RuntimeError):
    """The machine has an NVIDIA GPU and TensorFlow cannot use it."""


def check_gpu_usable() -> None:
    """Fails fast when the driver lists a GPU for this process (:func:`visible_gpus`) but
    TensorFlow sees none: the job would otherwise run on the CPU, many times slower, on a GPU
    machine paid for. The usual cause is TensorFlow without its CUDA libraries (install
    ``tensorflow[and-cuda]``, as deploy/dataflow/Dockerfile does) or libraries that do not match
    the driver. ``FEATUREBEAM_ALLOW_CPU_FALLBACK=1`` runs on the CPU anyway.

    Raises:
        GpuUnusable: with the cause and the opt-out.
    """
    gpus = visible_gpus()
    if not gpus or os.environ.get(ALLOW_CPU_ENV) == "1" or tensorflow_gpus():
        return
    raise GpuUnusable(
        f"this worker has {gpus} NVIDIA GPU(s) but TensorFlow sees none, so the model would run "
        "on the CPU: TensorFlow's CUDA libraries are missing or do not match the driver (install "
        f"tensorflow[and-cuda] at the pinned version); set {ALLOW_CPU_ENV}=1 to run on the CPU"
    )


def auto_decode_threads(*, processes_per_machine: int = 1, gpu: bool | None = None) -> int:
    """Decode threads for one of ``processes_per_machine`` worker processes on this machine:
    its share of the cores, less one for the model's host thread when the model runs on a GPU
    (``gpu=None``: :func:`visible_gpus` decides)."""
    share = max(1, cores_available() // max(1, processes_per_machine))
    if gpu is None:
        gpu = visible_gpus() > 0
    return max(1, share - 1) if gpu else share


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
    recipes: Sequence,
    *,
    processes_per_machine: int = 1,
    memory_bytes: int | None = None,
) -> None:
    """Refuses a multi-backbone run whose models cannot all stay loaded in each worker process
    (every model is loaded once per process and kept; none is swapped out).

    Args:
        recipes: the run's ``FeatureRecipe`` objects (their ``weight_bytes()``).
        processes_per_machine: worker processes sharing one machine's memory.
        memory_bytes: the machine's memory (default: :func:`machine_memory_bytes`).

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
