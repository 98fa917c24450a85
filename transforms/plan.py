"""Planning a run: which images to embed, in which chunks, and what an existing table keeps.

A run lists its inputs once, on the launching machine, and compares them with the table already in
the output folder (if any) by ``image_id`` and a cheap change signal (file size and the storage's
version: generation/etag on object stores, mtime on local disks):

- an image with a row (or an error row) whose signal matches is **kept** and not embedded again;
- a new image, or one whose file changed, is **embedded**; its stale copies are removed first;
- a row whose image is no longer listed is kept (the table only grows unless ``--overwrite``).

The images to embed are cut into chunks of ``chunk_size`` consecutive image ids. A chunk is the
unit of work and of commit: one worker decodes and embeds it and writes its shard files atomically,
so a run killed midway leaves only whole shards, and the next incremental run embeds just what is
still missing (that is how a killed run is resumed). The chunk list is written to a small Parquet
plan file in ``_plans/`` that workers read their chunk from, so the pipeline graph stays tiny
however many images there are.

Stale copies are removed (their shards rewritten in place, atomically) *before* any new row is
written, so at every moment each image is in the table at most once.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transforms import storage, table
from transforms.listing import ImageRef, list_sources

_LOG = logging.getLogger(__name__)

PLANS_DIR = "_plans"
_PLAN_SCHEMA = pa.schema(
    [
        pa.field("chunk", pa.int32(), nullable=False),
        *(f for f in table.IMAGE_FIELDS if f.name in ("image_id", "uri", "label", "split")),
        *table.SOURCE_FIELDS,
    ]
)


class IncompatibleTableError(ValueError):
    """The existing table was made with other model or preprocessing settings."""


def new_run_id() -> str:
    """A sortable, unique run id: UTC time to the second plus 4 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + secrets.token_hex(2)


@dataclasses.dataclass(frozen=True)
class Copy:
    """One existing row of an image: which file holds it and the change signal it was made from."""

    file: str
    kind: str  # table.FEATURES or table.ERRORS
    size: int
    version: str


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What one run will do. ``kept_rows``/``kept_errors`` are the existing rows it keeps."""

    run_id: str
    output_dir: str
    plan_uri: str | None
    num_chunks: int
    listed: int
    to_embed: int
    kept_rows: int
    kept_errors: int
    removed: int
    unlisted_rows: int

    def shard_uri(self, prefix: str, chunk: int) -> str:
        name = table.shard_name(prefix, chunk, self.num_chunks, run_id=self.run_id)
        return storage.join(table.table_dir_for(self.output_dir, prefix), name)


def _signal_matches(ref: ImageRef, copy: Copy) -> bool:
    # An unknown signal on either side (manifests give none; tables written before the columns
    # existed have none) cannot prove a change, so it counts as a match.
    if not ref.version or not copy.version:
        return not ref.size or not copy.size or ref.size == copy.size
    return ref.size == copy.size and ref.version == copy.version


def read_copies(output_dir: str) -> dict[str, list[Copy]]:
    """Every existing row of the table in ``output_dir``, by image id (feature rows first)."""
    files = [(f, table.FEATURES) for f in table.shard_files(output_dir, table.FEATURES)]
    files += [(f, table.ERRORS) for f in table.shard_files(output_dir, table.ERRORS)]

    def read(item):
        uri, kind = item
        fs, path = storage.filesystem(uri)
        names = pq.read_schema(path, filesystem=fs).names
        columns = [c for c in ("image_id", "file_size", "file_version") if c in names]
        return uri, kind, pq.read_table(path, filesystem=fs, columns=columns)

    copies: dict[str, list[Copy]] = {}
    with ThreadPoolExecutor(8) as pool:
        for uri, kind, t in pool.map(read, files):
            ids = t.column("image_id").to_pylist()
            n = len(ids)
            sizes = t.column("file_size").to_pylist() if "file_size" in t.column_names else [0] * n
            versions = (
                t.column("file_version").to_pylist()
                if "file_version" in t.column_names
                else [""] * n
            )
            for image_id, size, version in zip(ids, sizes, versions, strict=True):
                copies.setdefault(image_id, []).append(Copy(uri, kind, size or 0, version or ""))
    return copies


def check_compatible(output_dir: str, metadata: Mapping[str, str]) -> None:
    """Refuses to add rows made by a different model/preprocessing to an existing table.

    Raises:
        IncompatibleTableError: naming the first setting that differs.
    """
    files = table.shard_files(output_dir, table.FEATURES)
    if not files:
        return
    fs, path = storage.filesystem(files[0])
    existing = table.table_metadata(pq.read_schema(path, filesystem=fs))
    key = table.first_difference({k: str(v) for k, v in metadata.items()}, existing)
    if key is not None:
        ours, theirs = str(metadata.get(key, "")), existing.get(key, "")
        raise IncompatibleTableError(
            f"{output_dir} holds a table made with {key}={theirs!r}, this run would add rows "
            f"with {key}={ours!r}; use another --output, or --overwrite to start over"
        )


def _decide(
    refs: Iterable[ImageRef], copies: Mapping[str, list[Copy]], retry_errors: bool
) -> tuple[list[ImageRef], dict[str, set[str]], int, int]:
    """Splits listed refs into (to embed, {file: ids to remove}, kept rows, kept errors)."""
    todo: list[ImageRef] = []
    remove: dict[str, set[str]] = {}
    kept_rows = kept_errors = 0
    for ref in refs:
        existing = copies.get(ref.image_id, [])
        matching = [c for c in existing if _signal_matches(ref, c)]
        keep = next((c for c in matching if c.kind == table.FEATURES), None)
        if keep is None and not retry_errors:
            keep = next((c for c in matching if c.kind == table.ERRORS), None)
        if keep is None:
            todo.append(ref)
        elif keep.kind == table.FEATURES:
            kept_rows += 1
        else:
            kept_errors += 1
        for c in existing:  # stale or duplicate copies (a copy is kept at most once)
            if c is not keep:
                remove.setdefault(c.file, set()).add(ref.image_id)
    return todo, remove, kept_rows, kept_errors


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
        t = pq.read_table(path, filesystem=fs)
        kept = t.filter(pc.invert(pc.is_in(t.column("image_id"), pa.array(sorted(ids)))))
        removed += t.num_rows - kept.num_rows
        is_errors = path.rsplit("/", 1)[-1].startswith(table.ERRORS)
        if kept.num_rows == 0 and (is_errors or feature_shards > 1):
            fs.rm(path)
            if not is_errors:
                feature_shards -= 1
        else:
            table.write_parquet(uri, kept)
    return removed


def _chunks(refs: Sequence[ImageRef], chunk_size: int) -> list[list[ImageRef]]:
    ordered = sorted(refs, key=lambda r: r.image_id)
    return [ordered[i : i + chunk_size] for i in range(0, len(ordered), chunk_size)]


def write_plan(uri: str, chunks: Sequence[Sequence[ImageRef]]) -> None:
    rows = [
        {
            "chunk": i,
            "image_id": r.image_id,
            "uri": r.uri,
            "label": r.label,
            "split": r.split,
            "file_size": r.size,
            "file_version": r.version,
        }
        for i, chunk in enumerate(chunks)
        for r in chunk
    ]
    plan = pa.Table.from_pylist(rows, schema=_PLAN_SCHEMA)
    # One row group per chunk, so each worker reads only its own.
    chunk_size = max((len(c) for c in chunks), default=1)
    buffer = pa.BufferOutputStream()
    pq.write_table(plan, buffer, row_group_size=chunk_size, compression="zstd")
    data = buffer.getvalue().to_pybytes()
    storage.write_atomically(uri, lambda f: f.write(data))


def read_chunk(plan_uri: str, chunk: int) -> list[ImageRef]:
    """The refs of one chunk of a plan file."""
    fs, path = storage.filesystem(plan_uri)
    t = pq.read_table(path, filesystem=fs, filters=[("chunk", "=", chunk)])
    return [
        ImageRef(r["uri"], r["image_id"], r["label"], r["split"], r["file_size"], r["file_version"])
        for r in t.to_pylist()
    ]


def plan_run(
    sources: Sequence[str],
    output_dir: str,
    *,
    metadata: Mapping[str, str],
    incremental: bool,
    chunk_size: int,
    retry_errors: bool = False,
    run_id: str | None = None,
) -> RunPlan:
    """Lists the inputs, compares them with the existing table, and writes the plan file.

    Raises:
        FileExistsError: not ``incremental`` and the output already holds a table.
        IncompatibleTableError: the existing table was made with other settings.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    run_id = run_id or new_run_id()
    copies = read_copies(output_dir)
    if copies and not incremental:
        raise FileExistsError(
            f"{output_dir} already holds a feature table; pass --overwrite to replace it, "
            "--mode incremental to add new images to it, or choose another --output"
        )
    check_compatible(output_dir, metadata)
    refs = list(list_sources(sources))
    todo, remove, kept_rows, kept_errors = _decide(refs, copies, retry_errors)
    listed_ids = {r.image_id for r in refs}
    unlisted = sum(
        1
        for image_id, cs in copies.items()
        if image_id not in listed_ids and any(c.kind == table.FEATURES for c in cs)
    )
    removed = remove_rows(output_dir, remove)
    chunks = _chunks(todo, chunk_size)
    plan_uri = None
    if chunks:
        plan_uri = storage.join(output_dir, PLANS_DIR, f"plan-{run_id}.parquet")
        storage.makedirs(storage.join(output_dir, PLANS_DIR))
        write_plan(plan_uri, chunks)
    plan = RunPlan(
        run_id=run_id,
        output_dir=output_dir,
        plan_uri=plan_uri,
        num_chunks=len(chunks),
        listed=len(refs),
        to_embed=len(todo),
        kept_rows=kept_rows,
        kept_errors=kept_errors,
        removed=removed,
        unlisted_rows=unlisted,
    )
    _LOG.info(
        "run %s: %d images listed, %d to embed in %d chunks, %d rows and %d errors kept, "
        "%d stale rows removed",
        run_id,
        plan.listed,
        plan.to_embed,
        plan.num_chunks,
        kept_rows,
        kept_errors,
        removed,
    )
    return plan
