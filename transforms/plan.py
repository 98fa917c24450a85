"""Planning a run: which images to embed, in which chunks, and what an existing table keeps.

A run lists its inputs once, on the launching machine, and compares them with the table already in
the output folder (if any) by ``image_id`` and a cheap change signal (file size and the storage's
version: generation/etag on object stores, mtime on local disks, or what a manifest states):

- an image with a row (or an error row) whose signal matches is **kept** and not embedded again;
- a new image, or one whose file changed, is **embedded**; its stale copies are removed first;
- a row whose image is no longer listed is kept, unless ``prune`` removes it.

The comparison is columnar (``transforms.table_diff``): the listing and the existing table's
``image_id``/``file_size``/``file_version`` columns are Arrow arrays compared by 16-byte key, so a
10-million-row table is diffed without a Python object per row. This module cuts what it decides
into chunks; ``transforms.plan_files`` writes and reads them.

:func:`plan_run` only reads. What it decides is a :class:`Plan`: the small :class:`RunPlan` that the
pipeline carries, and the work table (the chunks to embed, and the stale copies to remove) that
``plan_files.write_plan`` writes to ``_plans/plan-RUN.parquet`` when the run is submitted, not
before: a ``--plan-only`` run, a dry run or a graph translation changes nothing in the output
folder.

The images to embed are cut into chunks of ``chunk_size`` consecutive image ids. A chunk is the
unit of work and of commit: one worker decodes and embeds it and writes its shard files atomically,
so a run killed midway leaves only whole shards, and the next incremental run embeds just what is
still missing (that is how a killed run is resumed). Stale copies are removed by the pipeline's
first step (``plan_files.remove_stale_rows``), *before* any chunk can start, so at every moment
each image is in the table at most once.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transforms import storage, table, table_diff
from transforms.image_rows import hex_ids, key_view
from transforms.listing import Listing, describe_skipped
from transforms.models.recipe import first_difference

_LOG = logging.getLogger(__name__)

PLANS_DIR = "_plans"
#: Where an ``--overwrite`` run writes its new table (``_staging/RUN/``) until it is complete; the
#: old table stays whole and readable beside it, and is replaced only then (``plan_files``).
STAGING_DIR = "_staging"
#: The chunk number of plan rows that name a stale copy to remove (``stale_file``).
REMOVAL = -1
PLAN_SCHEMA = pa.schema(
    [
        pa.field("chunk", pa.int32(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("label", pa.string()),
        pa.field("split", pa.string()),
        *table.SOURCE_FIELDS,
        pa.field("stale_file", pa.string()),
    ]
)


class IncompatibleTableError(ValueError):
    """The existing table was made with other model or preprocessing settings."""


def new_run_id() -> str:
    """A unique run id: UTC time to the second plus 4 random hex digits. Ids of runs started in
    the same second do not sort by time; order records by their ``started`` field."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + secrets.token_hex(2)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What one run does, in numbers; small enough to travel with the pipeline graph.

    Attributes:
        listed: images listed (``inputs``); ``skipped`` files were not images.
        to_embed: images this run embeds (``new`` ones and ``changed`` or retried ones).
        kept_rows / kept_errors: existing rows of listed images that stay as they are.
        stale_rows: existing copies of listed images that this run removes (changed files,
            retried errors, duplicates).
        unlisted_rows / unlisted_errors: rows of images no longer listed; kept, or removed when
            ``pruned``.
        pass_images: images the whole pass embeds: ``to_embed``, or for the tables of a
            multi-backbone run (:func:`align_chunks`), the images any of them embeds.
    """

    run_id: str
    output_dir: str
    plan_uri: str | None
    num_chunks: int
    chunk_size: int
    listed: int
    to_embed: int
    new: int = 0
    changed: int = 0
    kept_rows: int = 0
    kept_errors: int = 0
    stale_rows: int = 0
    unlisted_rows: int = 0
    unlisted_errors: int = 0
    pruned: bool = False
    skipped: int = 0
    skipped_examples: tuple[str, ...] = ()
    #: ``(reason, count)`` pairs: not an image, not a regular file (``transforms.listing``).
    skipped_reasons: tuple[tuple[str, int], ...] = ()
    label_conflicts: int = 0
    label_conflict_examples: tuple[str, ...] = ()
    pass_images: int = 0
    #: ``--overwrite``: the folder the new table is written to, swapped in when it is complete.
    staging_dir: str | None = None

    @property
    def write_dir(self) -> str:
        """Where this run's shards go: the table, or its staging folder (``--overwrite``)."""
        return self.staging_dir or self.output_dir

    def shard_uri(self, prefix: str, chunk: int) -> str:
        name = table.shard_name(prefix, chunk, self.num_chunks, run_id=self.run_id)
        return storage.join(table.table_dir_for(self.write_dir, prefix), name)

    def describe(self) -> str:
        """What the run would do, in words (``--plan-only``)."""
        unlisted = "removed (--prune)" if self.pruned else "kept"
        lines = [
            f"listed {self.listed} images ({self.skipped} files skipped: "
            + describe_skipped(self.skipped_reasons)
            + (f", e.g. {self.skipped_examples[0]}" if self.skipped_examples else "")
            + ")",
            f"to embed: {self.to_embed} in {self.num_chunks} chunk(s) "
            f"({self.new} new, {self.changed} changed or retried)",
            f"kept: {self.kept_rows} rows, {self.kept_errors} error rows",
            f"stale copies to remove first: {self.stale_rows}",
            f"unlisted: {self.unlisted_rows} rows, {self.unlisted_errors} error rows, {unlisted}",
        ]
        if self.label_conflicts:
            lines.append(
                f"listed with conflicting labels: {self.label_conflicts} URIs (each keeps its "
                f"first label), e.g. {self.label_conflict_examples[0]}"
            )
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A :class:`RunPlan` plus its work table (:data:`PLAN_SCHEMA`), which stays on the launcher
    until ``plan_files.write_plan``."""

    run: RunPlan
    work: pa.Table


# --- checking the existing table ---


def check_compatible(output_dir: str, metadata: Mapping[str, str]) -> None:
    """Refuses to add rows made by a different recipe to an existing table.

    Raises:
        IncompatibleTableError: naming the first setting that differs.
    """
    files = table.shard_files(output_dir, table.FEATURES)
    if not files:
        return
    fs, path = storage.filesystem(files[0])
    with table.reading(files[0]):
        existing = table.table_metadata(pq.read_schema(path, filesystem=fs))
    key = first_difference(metadata, existing)
    if key is not None:
        ours, theirs = str(metadata.get(key, "")), existing.get(key, "")
        raise IncompatibleTableError(
            f"{output_dir} holds a table made with {key}={theirs!r}, this run would add rows "
            f"with {key}={ours!r}; use another --output, or --overwrite to start over"
        )


# --- deciding ---


def _return_free_memory() -> None:
    """Hands memory freed by the listing back to the OS (Arrow's pool, then glibc's heap), so the
    planner's peak is its arrays, not the listing's leftovers: about 250 MB at 10M images."""
    pa.default_memory_pool().release_unused()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def plan_run(
    listing: Listing,
    output_dir: str,
    *,
    metadata: Mapping[str, str],
    incremental: bool,
    chunk_size: int,
    overwrite: bool = False,
    retry_errors: bool = False,
    prune: bool = False,
    run_id: str | None = None,
) -> Plan:
    """Compares the listing with the table in ``output_dir``; reads, writes nothing.

    Args:
        listing: the inputs (``transforms.listing.list_inputs``).
        output_dir: the table folder.
        metadata: the run's table metadata (its recipe); an existing table must agree.
        incremental: add to an existing table; otherwise the folder must hold none, unless
            ``overwrite``: then it is ignored here, the new table is written to a staging folder
            (``_staging/RUN/``) and replaces the old one only once it is complete.
        chunk_size: images per chunk.
        retry_errors: embed again images whose earlier attempt is an error row.
        prune: remove the rows and error rows of images no longer listed.

    Raises:
        FileExistsError: not ``incremental`` and the output already holds a table.
        IncompatibleTableError: the existing table was made with another recipe.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if prune and not incremental:
        raise ValueError("--prune removes rows of an existing table: it needs --mode incremental")
    run_id = run_id or new_run_id()
    copies, files = (
        table_diff.read_copies(output_dir) if not overwrite else (table_diff.no_copies(), [])
    )
    if copies.num_rows and not incremental:
        raise FileExistsError(
            f"{output_dir} already holds a feature table; pass --overwrite to replace it, "
            "--mode incremental to add new images to it, or choose another --output"
        )
    if incremental:
        check_compatible(output_dir, metadata)
    images = listing.images
    _return_free_memory()  # the listing's temporaries, before the big arrays are made
    counts: dict[str, Any] = {}
    removal_keys = np.empty(0, "S16")
    removal_files = np.empty(0, np.int32)
    todo = images
    if copies.num_rows:
        keys = key_view(copies["key"])  # one contiguous copy of the table's keys
        copies = copies.drop_columns(["key"])
        decided = table_diff.diff(images, keys, copies, retry_errors=retry_errors, prune=prune)
        del keys, copies
        todo, counts = decided.todo, decided.counts
        removal_keys, removal_files = decided.removal_keys, decided.removal_files
    todo = todo.sort_by("image_id")
    n = todo.num_rows
    chunk = pa.array(np.arange(n, dtype=np.int64) // chunk_size, pa.int32())
    work = pa.table(
        {
            "chunk": chunk,
            **{
                c: todo[c]
                for c in ("image_id", "uri", "label", "split", "file_size", "file_version")
            },
            "stale_file": pa.nulls(n, pa.string()),
        },
        schema=PLAN_SCHEMA,
    )
    if len(removal_keys):
        n_removed = len(removal_keys)
        removal_keys = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(16), n_removed, [None, pa.py_buffer(removal_keys.tobytes())]
        )
        stale_files = pc.take(pa.array(files, pa.string()), pa.array(removal_files))
        work = pa.concat_tables(
            [
                work,
                pa.table(
                    {
                        "chunk": pa.array(np.full(n_removed, REMOVAL, np.int32)),
                        "image_id": hex_ids(removal_keys),
                        "uri": pa.nulls(n_removed, pa.string()),
                        "label": pa.nulls(n_removed, pa.string()),
                        "split": pa.nulls(n_removed, pa.string()),
                        "file_size": pa.nulls(n_removed, pa.int64()),
                        "file_version": pa.nulls(n_removed, pa.string()),
                        "stale_file": stale_files,
                    },
                    schema=PLAN_SCHEMA,
                ),
            ]
        )
    num_chunks = -(-n // chunk_size)
    run = RunPlan(
        run_id=run_id,
        output_dir=output_dir,
        plan_uri=storage.join(output_dir, PLANS_DIR, f"plan-{run_id}.parquet")
        if work.num_rows
        else None,
        num_chunks=num_chunks,
        chunk_size=chunk_size,
        listed=images.num_rows,
        to_embed=n,
        new=n - counts.get("changed", 0),
        pruned=prune,
        skipped=listing.skipped,
        skipped_examples=listing.skipped_examples,
        skipped_reasons=listing.skipped_reasons,
        label_conflicts=listing.label_conflicts,
        label_conflict_examples=listing.label_conflict_examples,
        pass_images=n,
        staging_dir=storage.join(output_dir, STAGING_DIR, run_id) if overwrite else None,
        **counts,
    )
    return Plan(run, work)


def align_chunks(planned: Sequence[Plan]) -> list[Plan]:
    """Several tables' plans over one listing (one multi-backbone run), re-cut into the *same*
    chunks: chunk ``c`` of every table holds its share of one set of images, so a worker reads
    and decodes each image once for all the tables that need it. Each table keeps its own plan
    (what it embeds, keeps and removes); an image only some tables need is embedded only for
    those.
    """
    if len(planned) < 2:
        return list(planned)
    chunk_size = planned[0].run.chunk_size
    embedded = [p.work.filter(pc.not_equal(p.work["chunk"], REMOVAL)) for p in planned]
    union = pc.unique(pa.chunked_array([w["image_id"] for w in embedded], pa.string()))
    num_chunks = -(-len(union) // chunk_size)
    aligned = []
    for p, work in zip(planned, embedded, strict=True):
        position = pc.index_in(work["image_id"], value_set=union)
        chunk = pc.cast(pc.divide(pc.cast(position, pa.int64()), chunk_size), pa.int32())
        removals = p.work.filter(pc.equal(p.work["chunk"], REMOVAL))
        work = work.set_column(0, PLAN_SCHEMA.field("chunk"), chunk)
        work = pa.concat_tables([work.sort_by("chunk"), removals])
        run = dataclasses.replace(p.run, num_chunks=num_chunks, pass_images=len(union))
        aligned.append(Plan(run, work))
    return aligned
