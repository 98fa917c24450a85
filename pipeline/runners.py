"""Runner choice for our jobs.

Since Beam 2.68 the plain ``DirectRunner`` first tries the Prism runner, which downloads a Prism
binary from the internet on every run (with no timeout) before falling back. Offline, that stalls.
When the user names no runner, or names ``DirectRunner``, we run Beam's in-process ``FnApiRunner``
directly, exactly as the ``DirectRunner`` does after that fallback; it honours
``--direct_num_workers`` and ``--direct_running_mode`` (``in_memory``, ``multi_threading``,
``multi_processing``). Any other ``--runner`` (``PrismRunner``, ``DataflowRunner``, ``FlinkRunner``,
...) is left to Beam.

Multi-process mode talks gRPC over loopback; a proxy configured in the environment must not
capture those connections, so loopback is added to ``NO_PROXY`` when a proxy is set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineRunner

_LOCAL_NAMES = ("", "directrunner", "direct")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


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


def configure_logging() -> None:
    """The jobs' log format: time, level, logger, message, at INFO."""
    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


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


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    return PipelineOptions(list(beam_args))


def choose_runner(options: PipelineOptions) -> PipelineRunner | None:
    """Our in-process runner for local runs, or None to let Beam create the named runner."""
    name = options.view_as(StandardOptions).runner or ""
    name = name if isinstance(name, str) else ""
    if name.lower() in _LOCAL_NAMES:
        keep_loopback_unproxied()
        return LocalRunner()
    return None


def run_graph(
    build: Callable[[beam.Pipeline], object],
    beam_args: Sequence[str],
    test_pipeline: beam.Pipeline | None = None,
) -> None:
    """Builds a graph with ``build(pipeline)`` on our runner choice and runs it to completion."""
    if test_pipeline is not None:
        pipeline = test_pipeline
    else:
        options = pipeline_options(beam_args)
        pipeline = beam.Pipeline(runner=choose_runner(options), options=options)
    with pipeline:
        build(pipeline)
