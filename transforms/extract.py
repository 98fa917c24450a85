"""ExtractFeatures: the whole chain from image URIs to a committed feature table.

The graph is ``Create(chunk numbers) -> Reshuffle -> EmbedChunk -> GroupByKey -> Finalize``:

- the run is planned on the launching machine (``transforms.plan``): list, compare with the existing
  table, cut what must be embedded into chunks;
- ``EmbedChunk`` reads, decodes and embeds one chunk and commits its shard files atomically.
  Decoding runs in a small thread pool, ``prefetch`` batches ahead of the model, so Pillow
  (which releases the GIL) works while TensorFlow runs the previous batch. The model is loaded once
  per worker process (``embed.load_model_async``), in the background when the first chunk
  arrives, and images keep decoding while it loads; a run with nothing to embed never loads it;
- ``Finalize`` runs once, after every chunk: it writes ``_SUMMARY.json`` and removes the plan.

We do not use ``RunInference`` here (``EmbedImages`` does, for pipelines that compose their own
graph) because a chunk must be embedded *and committed* by one worker for runs to be resumable:
``RunInference`` followed by a grouped write puts a shuffle between the model and the files, so a
killed run loses everything; and in a fused Beam stage decoding and inference run one after the
other in one thread, while the chunk's decode pool overlaps them (see ``pipeline.bench``).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
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
    _Progress,
    error_row,
    feature_row,
    load_model_async,
    read_and_decode,
)
from transforms.images import DEFAULT_MAX_PIXELS

_LOG = logging.getLogger(__name__)
TOOL_VERSION = "0.2.0"
MODES = ("full", "incremental")
DEFAULT_CHUNK_SIZE = 1000
#: Decoded pixels a worker thread may hold while its model loads (then two batches).
PREFETCH_BYTES = 256 << 20


class _EmbedChunk(beam.DoFn):
    """Embeds one planned chunk and commits its feature (and error) shard; yields its counts."""

    def __init__(
        self,
        run: plans.RunPlan,
        handler: FeatureModelHandler,
        *,
        resize: str,
        max_pixels: int,
        decode_threads: int,
        schema: pa.Schema,
        to_row: Callable[[dict[str, Any]], dict[str, Any]] | None,
    ):
        self._run = run
        self._handler = handler
        self._resize = resize
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
        batch_size = self._handler.batch_elements_kwargs().get("max_batch_size", 32)
        size = self._handler.input_size
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
                    self._pool.submit(read_and_decode, ref, size, self._resize, self._max_pixels)
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

    def process(self, chunk: int):
        refs = plans.read_chunk(self._run.plan_uri, chunk)
        rows: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        # Start loading the model (once per process) now; images decode while it loads.
        model_future = load_model_async(self._handler) if refs else None
        for batch in self._decoded_batches(refs, errors, model_future):
            model = model_future.result()  # a model that cannot load fails the run
            try:
                vectors = self._handler.run_inference([pixels for _, pixels in batch], model)
            except Exception as exc:  # a batch the model rejects: one error row per image
                reason = f"{type(exc).__name__}: {exc}"
                errors.extend(error_row(key.ref, "embed", reason) for key, _ in batch)
                continue
            for (key, _), vector in zip(batch, vectors, strict=True):
                row = feature_row(key.ref, key.width, key.height, vector)
                rows.append(self._to_row(row) if self._to_row else row)
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
        _Progress.add(errors=len(errors))
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


def _finalize(element, *, run: plans.RunPlan, schema: pa.Schema, metadata: dict[str, str]):
    _, results = element
    results = [r for r in results if r is not None]
    new_rows = sum(r["rows"] for r in results)
    new_errors = sum(r["errors"] for r in results)
    out = run.output_dir
    feature_files = _shards_or_empty_one(run, table.FEATURES, schema)
    error_files = _shards_or_empty_one(run, table.ERRORS, table.ERROR_SCHEMA)
    summary = {
        "inputs": run.listed,
        "rows": run.kept_rows + new_rows,
        "errors": run.kept_errors + new_errors,
        "table_rows": run.kept_rows + new_rows + run.unlisted_rows,
        "feature_files": feature_files,
        "error_files": error_files,
        "metadata": metadata,
        "run": {
            "run_id": run.run_id,
            "chunks": run.num_chunks,
            "embedded": run.to_embed,
            "new_rows": new_rows,
            "new_errors": new_errors,
            "kept_rows": run.kept_rows,
            "kept_errors": run.kept_errors,
            "stale_rows_removed": run.removed,
            "workers": sorted({r["worker"] for r in results}),
        },
    }
    table.write_summary(out, summary)
    if run.plan_uri is not None:
        fs, path = storage.filesystem(run.plan_uri)
        fs.rm(path)
        folder = path.rsplit("/", 1)[0]
        if storage.is_local(run.plan_uri) and not fs.ls(folder):
            fs.rmdir(folder)
    return summary


class ExtractFeatures(beam.PTransform):
    """Plans a run, embeds its chunks and commits the table (see the module docstring).

    Feature rows go to ``features-RUN-NNNNN-of-MMMMM.parquet``, failures (with their stage and
    reason) to ``_errors/errors-RUN-...parquet``, and ``_SUMMARY.json`` records ``inputs``,
    ``rows`` and ``errors`` (``inputs == rows + errors``) once every chunk is committed.

    Planning happens when the transform is applied (on the launching machine): it lists the inputs
    and, in ``incremental`` mode, removes stale rows from the existing table.

    Args:
        sources: folders, globs, manifests or files, local or ``gs://``.
        output_dir: where the table is written.
        model_handler: ``BackboneModelHandler`` in production.
        mode: ``full`` (the output must hold no table) or ``incremental`` (embed only images that
            are not in the table yet or whose file changed; also resumes a killed run).
        chunk_size: images per work unit and per shard.
        decode_threads: decoding threads per worker process.
        retry_errors: in ``incremental`` mode, also retry images that failed before.
        resize: ``squash`` or ``crop`` (see ``transforms.images.load_image``).
        max_pixels: decompression-bomb guard.
        extra_metadata: more key-values for the table metadata (e.g. the job's options).
        to_row: maps each feature row to the row actually written (e.g. top-k predictions).
        schema: the schema of ``to_row``'s rows (metadata is added); default: feature rows.

    Returns:
        A PCollection with the one summary dict.
    """

    def __init__(
        self,
        sources: str | Sequence[str],
        output_dir: str,
        *,
        model_handler: FeatureModelHandler,
        mode: str = "full",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        decode_threads: int = 2,
        retry_errors: bool = False,
        resize: str = "squash",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        extra_metadata: dict[str, str] | None = None,
        to_row: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        schema: pa.Schema | None = None,
        run_id: str | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._sources = [sources] if isinstance(sources, str) else list(sources)
        self._output_dir = output_dir
        self._handler = model_handler
        self._mode = mode
        self._chunk_size = chunk_size
        self._decode_threads = decode_threads
        self._retry_errors = retry_errors
        self._resize = resize
        self._max_pixels = max_pixels
        self._to_row = to_row
        self._run_id = run_id
        self._metadata = {
            **model_handler.table_metadata(),
            "resize": resize,
            "tool_version": TOOL_VERSION,
            **(extra_metadata or {}),
        }
        schema_ = table.feature_schema(model_handler.feature_dim, self._metadata)
        self._schema = schema_ if schema is None else schema.with_metadata(schema_.metadata)
        self.plan: plans.RunPlan | None = None

    def expand(self, pbegin):
        self.plan = run = plans.plan_run(
            self._sources,
            self._output_dir,
            metadata=self._metadata,
            incremental=self._mode == "incremental",
            chunk_size=self._chunk_size,
            retry_errors=self._retry_errors,
            run_id=self._run_id,
        )
        embed = _EmbedChunk(
            run,
            self._handler,
            resize=self._resize,
            max_pixels=self._max_pixels,
            decode_threads=self._decode_threads,
            schema=self._schema,
            to_row=self._to_row,
        )
        results = (
            pbegin
            | "Chunks" >> beam.Create(list(range(run.num_chunks)))
            | "Spread" >> beam.Reshuffle()
            | "EmbedChunk" >> beam.ParDo(embed)
        )
        # One always-present element, so Finalize runs even when there is nothing to embed.
        start = pbegin | "Start" >> beam.Create([None])
        return (
            (results, start)
            | "AllChunks" >> beam.Flatten()
            | "OneKey" >> beam.Map(lambda r: (None, r))
            | "Together" >> beam.GroupByKey()
            | "Finalize"
            >> beam.Map(_finalize, run=run, schema=self._schema, metadata=self._metadata)
        )
