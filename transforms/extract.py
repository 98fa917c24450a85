"""ExtractFeatures: the whole chain from a planned run to a committed feature table.

The run is planned *before* the graph is built (``transforms.plan``: list, compare with the existing
table, cut what must be embedded into chunks) and the plan file is written when the job is
submitted; ``ExtractFeatures.expand()`` only wires. The graph is::

    Create -> RemoveStaleRows ---------(side input)--------+
    Create(chunk numbers) -> Reshuffle -> EmbedChunk <-----+-> GroupByKey -> Finalize

- ``RemoveStaleRows`` runs first: it removes the stale copies the plan names (changed files,
  retried errors, pruned images); ``EmbedChunk`` takes its result as a side input, so no chunk
  starts before it ends;
- ``EmbedChunk`` reads, decodes and embeds one chunk and commits its shard files atomically.
  Decoding runs in a small thread pool, ``prefetch`` batches ahead of the model, so Pillow
  (which releases the GIL) works while TensorFlow runs the previous batch. The model is loaded once
  per worker process (``embed.load_model_async``), in the background when the first chunk
  arrives, and images keep decoding while it loads; a run with nothing to embed never loads it.
  It renews the table's lease as it goes and checks it before committing;
- ``Finalize`` runs once, after every chunk: it writes ``_SUMMARY.json``, removes the plan and
  gives the lease back.

We do not use ``RunInference`` here because a chunk must be embedded *and committed* by one worker
for runs to be resumable: ``RunInference`` followed by a grouped write puts a shuffle between the
model and the files, so a killed run loses everything; and in a fused Beam stage decoding and
inference run one after the other in one thread, while the chunk's decode pool overlaps them (see
``pipeline.bench``). ``embed.BackboneModelHandler`` is still a Beam ``ModelHandler``, for pipelines
that compose their own graph with ``RunInference``.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from transforms import plan as plans
from transforms import storage, table
from transforms.embed import (
    NAMESPACE,
    Decoded,
    FeatureModelHandler,
    Progress,
    error_row,
    feature_row,
    load_model_async,
    read_and_decode,
)
from transforms.images import DEFAULT_MAX_PIXELS
from transforms.lease import Lease

_LOG = logging.getLogger(__name__)
MODES = ("full", "incremental")
DEFAULT_CHUNK_SIZE = 1000
DEFAULT_DECODE_THREADS = 2


def tool_version() -> str:
    """The installed package's version (``pyproject.toml`` is the one place it is written)."""
    from importlib import metadata

    try:
        return metadata.version("featurebeam")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def run_metadata(
    handler: FeatureModelHandler, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The table metadata of a run: the handler's recipe, the tool version, and ``extra``."""
    return {**handler.table_metadata(), "tool_version": tool_version(), **(extra or {})}


#: Decoded pixels a worker thread may hold while its model loads (then two batches).
PREFETCH_BYTES = 256 << 20


class _EmbedChunk(beam.DoFn):
    """Embeds one planned chunk and commits its feature (and error) shard; yields its counts."""

    def __init__(
        self,
        run: plans.RunPlan,
        handler: FeatureModelHandler,
        *,
        max_pixels: int,
        decode_threads: int,
        schema: pa.Schema,
        to_row: Callable[[dict[str, Any]], dict[str, Any]] | None,
        lease: Lease | None,
    ):
        self._run = run
        self._handler = handler
        self._lease = lease
        self._max_pixels = max_pixels
        self._decode_threads = max(1, decode_threads)
        self._schema = schema
        self._to_row = to_row
        self._embedded = beam.metrics.Metrics.counter(NAMESPACE, "images_embedded")
        self._failed = beam.metrics.Metrics.counter(NAMESPACE, "image_errors")

    def setup(self):
        self._pool = ThreadPoolExecutor(self._decode_threads, thread_name_prefix="decode")

    def teardown(self):
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _decoded_batches(
        self, refs, errors, model: Future
    ) -> Iterator[list[tuple[Decoded, np.ndarray]]]:
        """Decoded images in batches, decoding two batches ahead of the consumer, and as far as
        ``PREFETCH_BYTES`` allows while the model is still loading."""
        batch_size = self._handler.batch_size
        size = self._handler.input_size
        resize = self._handler.resize
        interpolation = self._handler.interpolation
        ahead_loading = max(2 * batch_size, PREFETCH_BYTES // (3 * size[0] * size[1]))
        pending: collections.deque = collections.deque()
        refs_left = iter(refs)

        def fill():
            limit = 2 * batch_size if model.done() else ahead_loading
            while len(pending) < limit:
                ref = next(refs_left, None)
                if ref is None:
                    return
                pending.append(
                    self._pool.submit(
                        read_and_decode, ref, size, resize, self._max_pixels, interpolation
                    )
                )

        fill()
        batch: list[tuple[Decoded, np.ndarray]] = []
        while pending:
            result = pending.popleft().result()
            fill()
            if isinstance(result, dict):
                errors.append(result)
                continue
            batch.append(result)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def process(self, chunk: int, stale_removed: dict[str, int]):
        # ``stale_removed`` (a side input) is only waited for: no chunk starts before the stale
        # rows are gone.
        refs = plans.read_chunk(self._run.plan_uri, chunk)
        rows: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        # Start loading the model (once per process) now; images decode while it loads.
        model_future = load_model_async(self._handler) if refs else None
        for batch in self._decoded_batches(refs, errors, model_future):
            model = model_future.result()  # a model that cannot load fails the run
            if self._lease is not None:
                self._lease.renew_if_due()
            try:
                vectors = self._handler.run_inference([pixels for _, pixels in batch], model)
            except Exception as exc:  # a batch the model rejects: one error row per image
                reason = f"{type(exc).__name__}: {exc}"
                errors.extend(error_row(key.ref, "embed", reason) for key, _ in batch)
                continue
            for (key, _), vector in zip(batch, vectors, strict=True):
                row = feature_row(key.ref, key.width, key.height, vector)
                rows.append(self._to_row(row) if self._to_row else row)
        if self._lease is not None:
            self._lease.check()  # never commit next to a run that took the table over
        files = []
        if rows:
            uri = self._run.shard_uri(table.FEATURES, chunk)
            table.write_parquet(uri, table.to_arrow(rows, self._schema))
            files.append(uri)
        if errors:
            uri = self._run.shard_uri(table.ERRORS, chunk)
            table.write_parquet(uri, table.to_arrow(errors, table.ERROR_SCHEMA))
            files.append(uri)
        self._embedded.inc(len(rows))
        self._failed.inc(len(errors))
        Progress.add(errors=len(errors))
        yield {
            "chunk": chunk,
            "rows": len(rows),
            "errors": len(errors),
            "files": files,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        }


def _shards_or_empty_one(run: plans.RunPlan, prefix: str, schema: pa.Schema) -> list[str]:
    """The table's shards of ``prefix``; when there are none, writes an empty one first, because
    readers (pyarrow, DuckDB, pandas) need at least one file to know the schema."""
    files = table.shard_files(run.output_dir, prefix)
    if files:
        return files
    uri = storage.join(
        table.table_dir_for(run.output_dir, prefix),
        table.shard_name(prefix, 0, 1, run_id=run.run_id),
    )
    table.write_parquet(uri, table.to_arrow([], schema))
    return [uri]


def _remove_stale(_, *, run: plans.RunPlan, lease: Lease | None) -> dict[str, int]:
    """Removes the plan's stale copies (idempotent: a runner may run it more than once)."""
    if lease is not None:
        lease.check()
    removed = plans.remove_stale_rows(run)
    if removed:
        _LOG.info("removed %d stale rows before embedding", removed)
    return {"removed": removed}


def _finalize(
    element,
    *,
    run: plans.RunPlan,
    schema: pa.Schema,
    metadata: dict[str, str],
    lease: Lease | None,
):
    _, results = element
    results = [r for r in results if "chunk" in r]
    new_rows = sum(r["rows"] for r in results)
    new_errors = sum(r["errors"] for r in results)
    feature_files = _shards_or_empty_one(run, table.FEATURES, schema)
    error_files = _shards_or_empty_one(run, table.ERRORS, table.ERROR_SCHEMA)
    rows = run.kept_rows + new_rows
    unlisted_kept = 0 if run.pruned else run.unlisted_rows
    summary = {
        "inputs": run.listed,
        "rows": rows,
        "errors": run.kept_errors + new_errors,
        "skipped": run.skipped,
        "skipped_examples": list(run.skipped_examples),
        "table_rows": rows + unlisted_kept,
        "feature_files": feature_files,
        "error_files": error_files,
        "metadata": metadata,
        "run": {
            "run_id": run.run_id,
            "chunks": run.num_chunks,
            "embedded": run.to_embed,
            "new_images": run.new,
            "changed_images": run.changed,
            "new_rows": new_rows,
            "new_errors": new_errors,
            "kept_rows": run.kept_rows,
            "kept_errors": run.kept_errors,
            "stale_rows_removed": run.stale_rows,
            "unlisted_rows_kept": unlisted_kept,
            "unlisted_rows_removed": run.unlisted_rows if run.pruned else 0,
            "unlisted_errors_removed": run.unlisted_errors if run.pruned else 0,
            "workers": sorted({r["worker"] for r in results}),
        },
    }
    table.write_summary(run.output_dir, summary)
    plans.delete_plan(run)
    if lease is not None:
        lease.release()
    return summary


class ExtractFeatures(beam.PTransform):
    """Embeds a planned run's chunks and commits the table (see the module docstring).

    Feature rows go to ``features-RUN-NNNNN-of-MMMMM.parquet``, failures (with their stage and
    reason) to ``_errors/errors-RUN-...parquet``, and ``_SUMMARY.json`` records ``inputs``,
    ``rows`` and ``errors`` (``inputs == rows + errors``) and ``skipped`` once every chunk is
    committed.

    Args:
        run: the planned run (``transforms.plan.plan_run(...).run``); its plan file must be
            written (``plan.write_plan``) before the pipeline runs.
        model_handler: ``BackboneModelHandler`` in production; it says the input size, resize and
            metadata.
        metadata: the table metadata (:func:`run_metadata`).
        decode_threads: decoding threads per worker process.
        max_pixels: decompression-bomb guard.
        to_row: maps each feature row to the row actually written (e.g. top-k predictions).
        schema: the schema of ``to_row``'s rows (metadata is added); default: feature rows.
        lease: the table's lease, renewed and checked by the workers and released at the end.

    Returns:
        A PCollection with the one summary dict.
    """

    def __init__(
        self,
        run: plans.RunPlan,
        *,
        model_handler: FeatureModelHandler,
        metadata: dict[str, str],
        decode_threads: int = DEFAULT_DECODE_THREADS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        to_row: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        schema: pa.Schema | None = None,
        lease: Lease | None = None,
    ):
        super().__init__()
        self._run = run
        self._handler = model_handler
        self._decode_threads = decode_threads
        self._max_pixels = max_pixels
        self._to_row = to_row
        self._lease = lease
        self._metadata = dict(metadata)
        schema_ = table.feature_schema(model_handler.feature_dim, self._metadata)
        self._schema = schema_ if schema is None else schema.with_metadata(schema_.metadata)

    def expand(self, pbegin):
        run, lease = self._run, self._lease
        embed = _EmbedChunk(
            run,
            self._handler,
            max_pixels=self._max_pixels,
            decode_threads=self._decode_threads,
            schema=self._schema,
            to_row=self._to_row,
            lease=lease,
        )
        # Always one element, so Finalize runs (after it) even when there is nothing to embed.
        removed = (
            pbegin
            | "Start" >> beam.Create([None])
            | "RemoveStaleRows" >> beam.Map(_remove_stale, run=run, lease=lease)
        )
        results = (
            pbegin
            # One element per chunk: runners that partition a Create (Dask) spread the chunks.
            | "Chunks" >> beam.Create(list(range(run.num_chunks)))
            | "Spread" >> beam.Reshuffle()
            | "EmbedChunk" >> beam.ParDo(embed, beam.pvalue.AsSingleton(removed))
        )
        return (
            (results, removed)
            | "AllChunks" >> beam.Flatten()
            | "OneKey" >> beam.Map(lambda r: (None, r))
            | "Together" >> beam.GroupByKey()
            | "Finalize"
            >> beam.Map(
                _finalize, run=run, schema=self._schema, metadata=self._metadata, lease=lease
            )
        )
