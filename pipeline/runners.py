"""Runner choice for our jobs.

Since Beam 2.68 the plain ``DirectRunner`` first tries the Prism runner, which downloads a Prism
binary from the internet on every run (with no timeout) before falling back. Offline, that stalls.
When the user names no runner, or names ``DirectRunner``, we run Beam's in-process ``FnApiRunner``
directly, exactly as the ``DirectRunner`` does after that fallback; it honours
``--direct_num_workers`` and ``--direct_running_mode`` (``in_memory``, ``multi_threading``,
``multi_processing``).

``--runner dask`` (or ``DaskRunner``, or its full class name) runs on a ``dask.distributed``
cluster: the one at ``--dask_client_address``, or, when none is given, a local cluster of
``--dask_local_workers`` worker processes (default: one per core) started for the run and stopped
after it. Unless ``--dask_npartitions``/``--dask_partition_size`` say otherwise, every element of a
``Create`` becomes its own Dask partition (``--dask_partition_size 1``): our graphs create one
element per chunk of work, and the DaskRunner maps each Beam transform over partitions, so that is
what spreads the chunks over the workers.

Any other ``--runner`` (``PrismRunner``, ``DataflowRunner``, ``FlinkRunner``, ...) is left to Beam.

Multi-process mode talks gRPC over loopback; a proxy configured in the environment must not
capture those connections, so loopback is added to ``NO_PROXY`` when a proxy is set.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Callable, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineRunner

_LOCAL_NAMES = ("", "directrunner", "direct")
_DASK_NAMES = ("dask", "daskrunner", "apache_beam.runners.dask.dask_runner.daskrunner")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")
_DASK_LOCAL_WORKERS = "--dask_local_workers"


class LocalRunner(PipelineRunner):
    """Beam's ``FnApiRunner`` as the ``DirectRunner`` configures it, without the Prism attempt."""

    def run_pipeline(self, pipeline, options):
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle

        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        provision = fn_runner.ExtendedProvisionInfo(
            beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
        )
        return fn_runner.FnApiRunner(provision_info=provision).run_pipeline(pipeline, options)


def keep_loopback_unproxied() -> None:
    """Adds loopback hosts to ``NO_PROXY``/``no_proxy`` when any proxy variable is set."""
    if not any(
        os.environ.get(v)
        for v in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy")
    ):
        return
    for name in ("NO_PROXY", "no_proxy"):
        current = [h.strip() for h in os.environ.get(name, "").split(",") if h.strip()]
        missing = [h for h in _LOOPBACK if h not in current]
        if missing:
            os.environ[name] = ",".join(current + missing)


def _pop_flag(args: list[str], flag: str) -> str | None:
    """Removes ``flag VALUE`` or ``flag=VALUE`` from ``args``; returns the value."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if arg.startswith(flag + "="):
            del args[i]
            return arg.split("=", 1)[1]
    return None


def beam_parser() -> argparse.ArgumentParser:
    """A parser of every flag Beam and its runners know: every registered ``PipelineOptions``
    subclass (as ``PipelineOptions.get_all_options`` builds it), the DaskRunner's own options
    (registered once its module is imported), and our ``--dask_local_workers``."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    # Registers DaskOptions (--dask_client_address, ...); without dask its flags are unknown.
    with contextlib.suppress(ImportError):
        import apache_beam.runners.dask.dask_runner  # noqa: F401
    parser = _BeamArgumentParser(allow_abbrev=False)
    classes: dict[str, type] = {}
    for cls in PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)
    parser.add_argument(_DASK_LOCAL_WORKERS, type=int)
    return parser


def unknown_flags(beam_args: Sequence[str]) -> tuple[list[str], list[str]]:
    """What in ``beam_args`` no Beam or runner option knows (Beam would log "Discarding
    unparseable args" and run without them), and every flag Beam knows (for suggestions)."""
    parser = beam_parser()
    _, unknown = parser.parse_known_args(list(beam_args))
    return unknown, [o for action in parser._actions for o in action.option_strings]


def _runner_name(options: PipelineOptions) -> str:
    name = options.view_as(StandardOptions).runner or ""
    return name.lower() if isinstance(name, str) else ""


def runner_name(beam_args: Sequence[str]) -> str:
    """The runner a run's flags choose, as named there (``direct`` when they name none)."""
    name = pipeline_options(beam_flags(beam_args)).view_as(StandardOptions).runner
    return str(name or "direct")


def _split_local_workers(beam_args: Sequence[str]) -> tuple[list[str], str | None]:
    """Beam's flags without our ``--dask_local_workers`` (Beam does not know it), and its value."""
    args = list(beam_args)
    return args, _pop_flag(args, _DASK_LOCAL_WORKERS)


def beam_flags(beam_args: Sequence[str]) -> list[str]:
    """The flags Beam itself knows (ours, such as ``--dask_local_workers``, removed)."""
    return _split_local_workers(beam_args)[0]


def is_dask(beam_args: Sequence[str]) -> bool:
    args, _ = _split_local_workers(beam_args)
    return _runner_name(PipelineOptions(args)) in _DASK_NAMES


def _has_dask_flag(args: Sequence[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


def dask_local_workers(beam_args: Sequence[str]) -> int:
    """How many worker processes a local Dask cluster for these flags gets (0: none started)."""
    args, value = _split_local_workers(beam_args)
    if not is_dask(args) or _has_dask_flag(args, "--dask_client_address", "--dask_scheduler_file"):
        return 0
    workers = int(value) if value else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"{_DASK_LOCAL_WORKERS} must be >= 1, got {workers}")
    return workers


def local_processes(beam_args: Sequence[str]) -> int:
    """Worker processes that this run starts on this machine (they share its cores)."""
    args, _ = _split_local_workers(beam_args)
    options = PipelineOptions(args)
    if _runner_name(options) in _LOCAL_NAMES:
        direct = options.get_all_options()
        if direct.get("direct_running_mode") == "multi_processing":
            return max(1, direct.get("direct_num_workers") or 1)
        return 1
    return dask_local_workers(beam_args) or 1


def thread_share(processes: int) -> int:
    """TensorFlow threads for each of ``processes`` processes sharing this machine (0: default)."""
    if processes <= 1:
        return 0
    return max(1, (os.cpu_count() or 1) // processes)


def start_local_dask_cluster(workers: int):
    """A ``distributed.LocalCluster`` of ``workers`` single-threaded worker processes.

    One thread per worker: the backbone already uses the process's share of cores, and a second
    task thread would hold a second batch of images in memory for no speed-up.
    """
    # Dask logs every connection at INFO; its workers read this from the environment.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    from distributed import LocalCluster

    logging.getLogger("distributed").setLevel(os.environ["DASK_LOGGING__DISTRIBUTED"].upper())
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        host="127.0.0.1",
    )
    logging.getLogger(__name__).info(
        "started a local Dask cluster at %s with %d worker processes",
        cluster.scheduler_address,
        workers,
    )
    return cluster


class DaskClusterLost(ConnectionError):
    """The Dask cluster lost the run: its scheduler went away, or a chunk's task killed every
    worker it was tried on (``distributed``'s ``KilledWorker``)."""


_RERUN = (
    "the run's committed chunks are kept and its lease is given back; rerun with "
    "--mode incremental to embed only the images not yet written"
)


def wait_for_dask(result, address: str) -> None:
    """Waits for a DaskRunner run; a lost cluster raises :class:`DaskClusterLost`, one line.

    A worker that dies mid-run is survived: the scheduler runs its tasks again on the others
    (a chunk's shard names are fixed by the plan and written atomically, so a chunk run twice
    leaves its rows once). A scheduler that dies is not: the client tries to reconnect for
    ``distributed.comm.timeouts.connect`` (30 s by default), then closes and cancels every
    task, and Beam's DaskRunner returns as if the run had finished. That, and a task that
    killed ``distributed.scheduler.allowed-failures`` + 1 workers, end here.

    Raises:
        DaskClusterLost: naming the scheduler, what was lost, and that a rerun resumes.
    """
    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError

    try:
        result.wait_until_finish()
    except KilledWorker as exc:
        raise DaskClusterLost(
            f"a task killed every Dask worker it ran on ({exc.args[0] if exc.args else exc}; "
            f"out of memory?) on the cluster at {address}; {_RERUN}"
        ) from exc
    except (CommClosedError, OSError, TimeoutError) as exc:
        raise DaskClusterLost(
            f"lost the Dask scheduler at {address} mid-run ({type(exc).__name__}); {_RERUN}"
        ) from exc
    futures = result.futures if isinstance(result.futures, list | tuple) else [result.futures]
    unfinished = sorted({f.status for f in futures if f.status != "finished"})
    if unfinished:
        raise DaskClusterLost(
            f"lost the Dask scheduler at {address} mid-run (the run's tasks were "
            f"{'/'.join(unfinished)}); {_RERUN}"
        )


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    return PipelineOptions(list(beam_args))


def choose_runner(options: PipelineOptions) -> PipelineRunner | None:
    """Our in-process runner for local runs, the DaskRunner for ``dask``, else None (Beam's)."""
    name = _runner_name(options)
    if name in _LOCAL_NAMES:
        keep_loopback_unproxied()
        return LocalRunner()
    if name in _DASK_NAMES:
        from apache_beam.runners.dask.dask_runner import DaskRunner

        keep_loopback_unproxied()
        return DaskRunner()
    return None


def run_graph(
    build: Callable[[beam.Pipeline], object],
    beam_args: Sequence[str],
    test_pipeline: beam.Pipeline | None = None,
) -> None:
    """Builds a graph with ``build(pipeline)`` on our runner choice and runs it to completion."""
    if test_pipeline is not None:
        with test_pipeline:
            build(test_pipeline)
        return
    workers = dask_local_workers(beam_args)
    args, _ = _split_local_workers(beam_args)
    if is_dask(args) and not _has_dask_flag(args, "--dask_npartitions", "--dask_partition_size"):
        args.append("--dask_partition_size=1")
    cluster = start_local_dask_cluster(workers) if workers else None
    try:
        if cluster is not None:
            args.append(f"--dask_client_address={cluster.scheduler_address}")
        options = pipeline_options(args)
        pipeline = beam.Pipeline(runner=choose_runner(options), options=options)
        build(pipeline)
        result = pipeline.run()
        client = getattr(result, "client", None)  # the DaskRunner's; it outlives the run
        try:
            if client is None:
                result.wait_until_finish()
            else:
                wait_for_dask(result, options.get_all_options().get("address") or "?")
        finally:
            if client is not None:
                client.close()
    finally:
        if cluster is not None:
            cluster.close()
