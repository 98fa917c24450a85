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
  per worker process (``embed.model_cache.load_model_async``), in the background when the first chunk
  arrives, and images keep decoding while it loads; a run with nothing to embed never loads it.
  It renews the table's lease as it goes and checks it before committing;
- ``Finalize`` runs once, after every chunk (``transforms.finalize``): an ``--overwrite`` run's
  table, written to its staging folder, moves in beside the old one; then it writes
  ``_SUMMARY.json``, the old shards go, and it removes the plan and gives the lease back.

We do not use ``RunInference`` here because a chunk must be embedded *and committed* by one worker
for runs to be resumable: ``RunInference`` followed by a grouped write puts a shuffle between the
model and the files, so a killed run loses everything; and in a fused Beam stage decoding and
inference run one after the other in one thread, while the chunk's decode pool overlaps them (see
``benchmarks``). ``embed.handler.BackboneModelHandler`` is still a Beam ``ModelHandler``, for pipelines
that compose their own graph with ``RunInference``.
"""

import collections
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import apache_beam as beam
import pyarrow as pa

from transforms import devices, plan_files, table
from transforms import plan as plans
from transforms.embed.decode import DEFAULT_READ_TIMEOUT_S, read_and_decode
from transforms.embed.handler import NAMESPACE, FeatureModelHandler
from transforms.embed.model_cache import load_model_async
from transforms.embed.progress import Progress
from transforms.finalize import finalize, remove_stale
from transforms.images import DEFAULT_MAX_PIXELS, Target
from transforms.lease import Lease
from transforms.table_job import TableJob, table_job

_LOG = logging.getLogger(__name__)
MODES = ("full", "incremental")
DEFAULT_CHUNK_SIZE = 1000
#: ``--decode-threads auto``: sized per worker process by ``devices.auto_decode_threads``.
AUTO_DECODE_THREADS = 0
DEFAULT_DECODE_THREADS = AUTO_DECODE_THREADS


#: Decoded pixels a worker thread may hold while its model loads (then two batches).
PREFETCH_BYTES = 256 << 20


class _EmbedChunk(beam.DoFn):
    """Embeds one planned chunk for every table and commits each table's feature (and error)
    shard; yields one count record per table.

    Each image is read once and decoded once (per JPEG draft scale) for all the tables that need
    it, fitted to each distinct (input size, resize, interpolation), and embedded by each such
    table's model.
    """

    def __init__(
        self,
        jobs: Sequence[TableJob],
        *,
        max_pixels: int,
        decode_threads: int,
        processes_per_machine: int = 1,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ):
        self._jobs = list(jobs)
        self._read_timeout_s = read_timeout_s
        self._batch_size = max(job.handler.batch_size for job in self._jobs)
        self._max_pixels = max_pixels
        self._decode_threads = decode_threads
        self._processes_per_machine = processes_per_machine
        self._embedded = beam.metrics.Metrics.counter(NAMESPACE, "images_embedded")
        self._failed = beam.metrics.Metrics.counter(NAMESPACE, "image_errors")

    def setup(self):
        self._threads = self._decode_threads
        self._checked_device = self._decode_threads != AUTO_DECODE_THREADS
        if not self._checked_device:
            # A first guess without TensorFlow (which is still loading): checked once it is.
            self._gpu = devices.visible_gpus() > 0
            self._threads = devices.auto_decode_threads(
                processes_per_machine=self._processes_per_machine, gpu=self._gpu
            )
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="decode")

    def teardown(self):
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _check_device(self) -> None:
        """Once the model is loaded: sizes the pool for the device TensorFlow actually uses
        (``--decode-threads auto``), if the first guess was wrong."""
        self._checked_device = True
        gpu = devices.tensorflow_gpus() > 0
        if gpu == self._gpu:
            return
        threads = devices.auto_decode_threads(
            processes_per_machine=self._processes_per_machine, gpu=gpu
        )
        _LOG.info("the model runs on %s: %d decode threads", "a GPU" if gpu else "CPU", threads)
        old, self._pool = self._pool, ThreadPoolExecutor(threads, thread_name_prefix="decode")
        old.shutdown(wait=False)  # its queued reads still finish
        self._gpu, self._threads = gpu, threads

    def _decoded(self, refs, targets_of, model: Future) -> Iterator[tuple[Any, Any]]:
        """``(ref, result)`` in order, each image read once and decoded for all its targets
        (``targets_of(ref)``) in the pool: decoding runs two batches ahead of the consumer, and
        as far as ``PREFETCH_BYTES`` allows while ``model`` is still loading."""
        batch_size = self._batch_size
        biggest = max(job.target.size[0] * job.target.size[1] for job in self._jobs)
        ahead_loading = max(2 * batch_size, PREFETCH_BYTES // (3 * biggest))
        pending: collections.deque = collections.deque()
        refs_left = iter(refs)

        def fill():
            if model.done() and not self._checked_device and model.exception() is None:
                self._check_device()
            # Two batches ahead, and at least two images per decode thread.
            limit = max(2 * batch_size, 2 * self._threads)
            if not model.done():
                limit = max(limit, ahead_loading)
            while len(pending) < limit:
                ref = next(refs_left, None)
                if ref is None:
                    return
                future = self._pool.submit(
                    read_and_decode, ref, targets_of(ref), self._max_pixels, self._read_timeout_s
                )
                pending.append((ref, future))

        fill()
        while pending:
            ref, future = pending.popleft()
            result = future.result()
            fill()
            yield ref, result

    def _embed(self, job: TableJob, model, batch, rows, errors) -> bool:
        """Embeds ``batch`` into ``rows``, or makes one error row per image; says which."""
        if job.lease is not None:
            job.lease.renew_if_due()
        try:
            vectors = job.handler.run_inference([pixels for _, pixels in batch], model)
        except Exception as exc:  # a batch the model rejects: one error row per image
            reason = f"{type(exc).__name__}: {exc}"
            errors.extend(table.error_row(key.ref, "embed", reason) for key, _ in batch)
            return False
        for (key, _), vector in zip(batch, vectors, strict=True):
            row = table.feature_row(key.ref, key.width, key.height, vector)
            rows.append(job.to_row(row) if job.to_row else row)
        return True

    def _embed_all(self, refs, needs, rows, errors) -> None:
        """Reads and decodes each image once for every target its tables need, and embeds each
        target's batches with the models of the tables that need those images."""
        jobs = self._jobs
        # Start loading the models (once per process) now; images decode while they load.
        used = sorted({i for tables in needs.values() for i in tables})
        models = {i: load_model_async(jobs[i].handler, keep=len(jobs)) for i in used}
        targets_of = {
            image_id: list(dict.fromkeys(jobs[i].target for i in tables))
            for image_id, tables in needs.items()
        }
        batches: dict[Target, list] = {job.target: [] for job in jobs}
        # The progress counts images, not image x table pairs: an image is done once every table
        # that needs it has its row, and failed if any of them has an error row instead.
        waiting = {image_id: len(tables) for image_id, tables in needs.items()}
        failed: set[str] = set()

        def finished(image_id, ok):
            if not ok:
                failed.add(image_id)
            waiting[image_id] -= 1
            if not waiting[image_id]:
                bad = image_id in failed
                Progress.add(done=int(not bad), errors=int(bad))

        def flush(target):
            batch, batches[target] = batches[target], []
            for i in used:
                if jobs[i].target != target:
                    continue
                mine = [item for item in batch if i in needs[item[0].ref.image_id]]
                if mine:  # a model that cannot load fails the run
                    ok = self._embed(jobs[i], models[i].result(), mine, rows[i], errors[i])
                    for key, _ in mine:
                        finished(key.ref.image_id, ok)

        def targets_for(ref):
            return targets_of[ref.image_id]

        for ref, result in self._decoded(refs, targets_for, models[used[0]]):
            if isinstance(result, dict):  # unreadable: an error row in every table that needs it
                for i in needs[ref.image_id]:
                    errors[i].append(result)
                Progress.add(errors=1)
                continue
            for target, item in zip(targets_of[ref.image_id], result, strict=True):
                batches[target].append(item)
                if len(batches[target]) == self._batch_size:
                    flush(target)
        for target in batches:
            if batches[target]:
                flush(target)

    def process(self, chunk: int, stale_removed: dict[int, int]):
        # ``stale_removed`` (a side input) is only waited for: no chunk starts before the stale
        # rows are gone.
        jobs = self._jobs
        rows: list[list[dict[str, Any]]] = [[] for _ in jobs]
        errors: list[list[dict[str, Any]]] = [[] for _ in jobs]
        needs: dict[str, list[int]] = {}  # image_id -> the tables that embed it
        refs: dict[str, Any] = {}  # image_id -> ref, in plan order
        for i, job in enumerate(jobs):
            for ref in plan_files.read_chunk(job.run.plan_uri, chunk):
                needs.setdefault(ref.image_id, []).append(i)
                refs.setdefault(ref.image_id, ref)
        if refs:
            self._embed_all(list(refs.values()), needs, rows, errors)
        for job in jobs:
            if job.lease is not None:
                job.lease.check()  # never commit next to a run that took a table over
        for i, job in enumerate(jobs):
            files = []
            if rows[i]:
                uri = job.run.shard_uri(job.prefix, chunk)
                table.write_parquet(uri, table.to_arrow(rows[i], job.schema))
                files.append(uri)
            if errors[i]:
                uri = job.run.shard_uri(table.ERRORS, chunk)
                table.write_parquet(uri, table.to_arrow(errors[i], table.ERROR_SCHEMA))
                files.append(uri)
            self._embedded.inc(len(rows[i]))
            self._failed.inc(len(errors[i]))
            yield {
                "table": i,
                "chunk": chunk,
                "rows": len(rows[i]),
                "errors": len(errors[i]),
                "files": files,
                "worker": f"{socket.gethostname()}:{os.getpid()}",
            }


class ExtractFeatureTables(beam.PTransform):
    """Embeds planned runs' chunks into one or more tables and commits each (see the module
    docstring); the tables' plans must share their chunks (``plan.align_chunks``).

    Feature rows go to ``features-RUN-NNNNN-of-MMMMM.parquet``, failures (with their stage and
    reason) to ``_errors/errors-RUN-...parquet``, and ``_SUMMARY.json`` records ``inputs``,
    ``rows`` and ``errors`` (``inputs == rows + errors``) and ``skipped`` once every chunk is
    committed, in each table's folder.

    Args:
        jobs: the tables (:func:`table_job`); their plan files must be written
            (``plan_files.write_plan``) before the pipeline runs.
        decode_threads: decoding threads per worker process (:data:`AUTO_DECODE_THREADS`:
            sized from its cores and whether its model runs on a GPU, ``transforms.devices``).
        max_pixels: decompression-bomb guard.
        processes_per_machine: worker processes sharing a machine (for ``auto``).
        read_timeout_s: seconds one image's read may take; a read that takes longer becomes the
            image's error row (stage ``read``) and the run goes on.

    Returns:
        A PCollection with one summary dict per table.
    """

    def __init__(
        self,
        jobs: Sequence[TableJob],
        *,
        decode_threads: int = DEFAULT_DECODE_THREADS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        processes_per_machine: int = 1,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ):
        super().__init__()
        self._jobs = list(jobs)
        self._read_timeout_s = read_timeout_s
        self._processes_per_machine = processes_per_machine
        chunks = {job.run.num_chunks for job in self._jobs}
        if len(chunks) != 1:
            raise ValueError(f"the tables' plans must share their chunks, got {sorted(chunks)}")
        self._decode_threads = decode_threads
        self._max_pixels = max_pixels

    def expand(self, pbegin):
        jobs = self._jobs
        embed = _EmbedChunk(
            jobs,
            max_pixels=self._max_pixels,
            decode_threads=self._decode_threads,
            processes_per_machine=self._processes_per_machine,
            read_timeout_s=self._read_timeout_s,
        )
        # Always one element, so Finalize runs (after it) even when there is nothing to embed.
        removed = (
            pbegin
            | "Start" >> beam.Create([None])
            | "RemoveStaleRows" >> beam.Map(remove_stale, jobs=jobs)
        )
        results = (
            pbegin
            # One element per chunk: runners that partition a Create (Dask) spread the chunks.
            | "Chunks" >> beam.Create(list(range(jobs[0].run.num_chunks)))
            | "Spread" >> beam.Reshuffle()
            | "EmbedChunk" >> beam.ParDo(embed, beam.pvalue.AsSingleton(removed))
        )
        every_table = removed | "EveryTable" >> beam.FlatMap(
            lambda counts: [{"table": i, "removed": n} for i, n in counts.items()]
        )
        return (
            (results, every_table)
            | "AllChunks" >> beam.Flatten()
            | "ByTable" >> beam.Map(lambda r: (r["table"], r))
            | "Together" >> beam.GroupByKey()
            | "Finalize" >> beam.Map(finalize, jobs=jobs)
        )


class ExtractFeatures(beam.PTransform):
    """One planned run's table: :class:`ExtractFeatureTables` with a single table.

    Args:
        run: the planned run (``transforms.plan.plan_run(...).run``); its plan file must be
            written (``plan_files.write_plan``) before the pipeline runs.
        model_handler: ``BackboneModelHandler`` in production; it says the input size, resize and
            metadata.
        metadata: the table metadata (:func:`run_metadata`).
        decode_threads: decoding threads per worker process.
        max_pixels: decompression-bomb guard.
        read_timeout_s: seconds one image's read may take before it becomes an error row.
        to_row: maps each feature row to the row actually written (e.g. top-k predictions).
        schema: the schema of ``to_row``'s rows (metadata is added); default: feature rows.
        prefix: what the row shards are named for (default ``features``).
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
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        to_row: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        schema: pa.Schema | None = None,
        lease: Lease | None = None,
        prefix: str = table.FEATURES,
    ):
        super().__init__()
        job = table_job(
            run,
            model_handler,
            metadata,
            to_row=to_row,
            schema=schema,
            lease=lease,
            prefix=prefix,
        )
        self._tables = ExtractFeatureTables(
            [job],
            decode_threads=decode_threads,
            max_pixels=max_pixels,
            read_timeout_s=read_timeout_s,
        )

    def expand(self, pbegin):
        return pbegin | self._tables
