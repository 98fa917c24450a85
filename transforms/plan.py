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
into chunks and plan files.

:func:`plan_run` only reads. What it decides is a :class:`Plan`: the small :class:`RunPlan` that the
pipeline carries, and the work table (the chunks to embed, and the stale copies to remove) that
:func:`write_plan` writes to ``_plans/plan-RUN.parquet`` when the run is submitted, not before: a
``--plan-only`` run, a dry run or a graph translation changes nothing in the output folder.

The images to embed are cut into chunks of ``chunk_size`` consecutive image ids. A chunk is the
unit of work and of commit: one worker decodes and embeds it and writes its shard files atomically,
so a run killed midway leaves only whole shards, and the next incremental run embeds just what is
still missing (that is how a killed run is resumed). Stale copies are removed by the pipeline's
first step (:func:`remove_stale_rows`), *before* any chunk can start, so at every moment each image
is in the table at most once.
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
from transforms.image_rows import ImageRef, hex_ids, key_view, refs_from_table
from transforms.listing import Listing, describe_skipped
from transforms.models.recipe import first_difference

_LOG = logging.getLogger(__name__)

PLANS_DIR = "_plans"
#: Where an ``--overwrite`` run writes its new table (``_staging/RUN/``) until it is complete; the
#: old table stays whole and readable beside it, and is replaced only then (:func:`commit_staged`).
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
    """A sortable, unique run id: UTC time to the second plus 4 random hex digits."""
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
    until :func:`write_plan`."""

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


# --- what happens when the run is submitted and when it runs ---


def plan_files(output_dir: str) -> list[str]:
    folder = storage.join(output_dir, PLANS_DIR)
    fs, path = storage.filesystem(folder)
    if not fs.exists(path):
        return []
    return [storage.to_uri(fs, p) for p in fs.ls(path, detail=False) if p.endswith(".parquet")]


def staging_dirs(output_dir: str) -> list[str]:
    """The staging folders of ``--overwrite`` runs in the table's folder."""
    folder = storage.join(output_dir, STAGING_DIR)
    fs, path = storage.filesystem(folder)
    if not fs.exists(path):
        return []
    return [storage.to_uri(fs, p) for p in fs.ls(path, detail=False)]


def write_plan(plan: Plan) -> None:
    """Writes the plan file; removes plan files and staging folders of earlier runs, which died
    (the caller holds the table's lease, so no other run is live)."""
    for dead in plan_files(plan.run.output_dir):
        _LOG.warning("removing the plan of a run that did not finish: %s", dead)
        fs, path = storage.filesystem(dead)
        fs.rm(path)
    for dead in staging_dirs(plan.run.output_dir):
        _LOG.warning("removing the unfinished new table of an --overwrite run that died: %s", dead)
        fs, path = storage.filesystem(dead)
        fs.rm(path, recursive=True)
    if plan.run.plan_uri is None:
        return
    # One row group per chunk (the removals follow the last one), so each worker reads only its own.
    rows_per_group = max(1, min(plan.work.num_rows, plan.run.chunk_size))
    buffer = pa.BufferOutputStream()
    pq.write_table(plan.work, buffer, row_group_size=rows_per_group, compression="zstd")
    data = buffer.getvalue().to_pybytes()
    storage.makedirs(storage.join(plan.run.output_dir, PLANS_DIR))
    storage.write_atomically(plan.run.plan_uri, lambda f: f.write(data))


def read_chunk(plan_uri: str | None, chunk: int) -> list[ImageRef]:
    """The refs of one chunk of a plan file (none for a run with nothing to embed)."""
    if plan_uri is None:
        return []
    fs, path = storage.filesystem(plan_uri)
    t = pq.read_table(path, filesystem=fs, filters=[("chunk", "=", chunk)])
    return refs_from_table(t)


def remove_stale_rows(run: RunPlan) -> int:
    """Removes the stale copies the plan names (the pipeline's first step); returns rows removed."""
    if run.plan_uri is None:
        return 0
    fs, path = storage.filesystem(run.plan_uri)
    t = pq.read_table(path, filesystem=fs, filters=[("chunk", "=", REMOVAL)])
    by_file: dict[str, set[str]] = {}
    for image_id, stale_file in zip(
        t["image_id"].to_pylist(), t["stale_file"].to_pylist(), strict=True
    ):
        by_file.setdefault(stale_file, set()).add(image_id)
    return remove_rows(run.output_dir, by_file)


def remove_rows(output_dir: str, files_and_ids: Mapping[str, set[str]]) -> int:
    """Rewrites each shard of the table in ``output_dir`` in place, atomically, without the given
    image ids; returns rows removed.

    A shard left with no rows is deleted, unless it is the table's only feature shard (readers need
    one file to know the schema).
    """
    removed = 0
    feature_shards = len(table.shard_files(output_dir, table.FEATURES))
    for uri, ids in sorted(files_and_ids.items()):
        fs, path = storage.filesystem(uri)
        if not fs.exists(path):  # already rewritten away by an earlier attempt of this step
            continue
        t = pq.read_table(path, filesystem=fs)
        kept = t.filter(pc.invert(pc.is_in(t.column("image_id"), pa.array(sorted(ids)))))
        removed += t.num_rows - kept.num_rows
        is_errors = path.rsplit("/", 1)[-1].startswith(table.ERRORS)
        if kept.num_rows == 0 and (is_errors or feature_shards > 1):
            fs.rm(path)
            if not is_errors:
                feature_shards -= 1
        elif kept.num_rows < t.num_rows:
            table.write_parquet(uri, kept)
    return removed


def delete_plan(run: RunPlan) -> None:
    """Removes the run's plan file (and the plans folder when it is empty)."""
    if run.plan_uri is None:
        return
    fs, path = storage.filesystem(run.plan_uri)
    if fs.exists(path):
        fs.rm(path)
    folder = path.rsplit("/", 1)[0]
    if storage.is_local(run.plan_uri) and fs.exists(folder) and not fs.ls(folder):
        fs.rmdir(folder)


def commit_staged(run: RunPlan) -> None:
    """``--overwrite``, once every chunk is committed: the staged table replaces the old one. The
    new shards are moved into the table's folder first, and only then are the old shards (rows
    and errors of other runs) removed, so the old table is complete until the new one is
    (``storage.swap_in``). Idempotent: a runner that retries the step, even after a swap that
    was cut short, finishes it and never removes this run's own shards."""
    if run.staging_dir is None:
        return
    old = [
        f
        for p in (table.FEATURES, table.ERRORS)
        for f in table.shard_files(run.output_dir, p)
        if table.shard_run(f) != run.run_id
    ]
    storage.swap_in(run.output_dir, run.staging_dir, replaces=old)
    _remove_empty_folder(storage.join(run.output_dir, STAGING_DIR))


def discard(run: RunPlan) -> None:
    """What a run that failed or was stopped leaves behind, removed: its plan file and its
    staging folder (an ``--overwrite`` run's unfinished table). Shards it committed to the table
    itself stay (an incremental run's, whole ones: the next run keeps them)."""
    delete_plan(run)
    if run.staging_dir is None:
        return
    fs, path = storage.filesystem(run.staging_dir)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    _remove_empty_folder(storage.join(run.output_dir, STAGING_DIR))


def _remove_empty_folder(uri: str) -> None:
    """Object stores have no empty folders; a local one is removed so the table looks as before."""
    fs, path = storage.filesystem(uri)
    if storage.is_local(uri) and fs.exists(path) and not fs.ls(path):
        fs.rmdir(path)
