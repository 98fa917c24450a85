"""Building and updating a table's index (``transforms.index_files``): built once, then updated
after each incremental run by adding the table's new rows and removing its stale and pruned ones,
rebuilt when the table's recipe changed, its faiss index retrained when it drifted. numpy,
pyarrow and faiss; nothing here imports Beam or Keras.

Row identity. An image's id is a hash of its URI, so an image replaced in place keeps its id; what
says a row changed is its change signal (``file_size``, ``file_version``) and the shard it lives
in. An incremental run adds shards of its own (named with its run id) and rewrites older shards
without their stale rows (``transforms.plan_files.remove_rows``). So an update compares each shard's
name, size and version with what the index read: an unchanged shard is not read at all; a
rewritten one is read for its id columns only (its rows that are gone are removed); a new one is
read whole and its rows added; a missing one has its rows removed.

The table is listed again at the end of an update; if it changed meanwhile (an extraction
writing it), the update starts over, and after a few tries refuses with a message saying so.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transforms import index_files, neighbors, storage
from transforms import table as tables
from transforms.index_files import ROW_COLUMNS, ROWS_SCHEMA
from transforms.models.recipe import first_difference, table_fingerprint

KINDS = neighbors.INDEXES
#: The faiss index is retrained once the rows added and removed since it was trained exceed this
#: fraction of the rows it was trained on, or the table doubled or halved since.
DRIFT_FRACTION = 0.5
#: Fewer rows than this are searched exactly whatever kind was asked for: the 4-bit product
#: quantiser's k-means wants 16 points per centroid to train on (faiss warns below 39).
MIN_FAISS_ROWS = 256
#: How many times an update starts over when the table changed while it read it.
DEFAULT_RETRIES = 3
_COPY_ROWS = 65_536
_HISTORY = 50


class TableChanged(ValueError):
    """The table changed while the index read it, every time it tried."""


@dataclasses.dataclass(frozen=True)
class IndexUpdate:
    """What :func:`build_or_update` did.

    Attributes:
        action: ``built`` (no index before), ``updated`` (rows added and removed in place),
            ``unchanged``, or ``rebuilt`` (from the whole table; ``reason`` says why).
        added, removed: rows added to and removed from the index.
        rows: rows in the index now.
        kind: ``exact`` or ``faiss``.
        reason: why it was rebuilt or retrained ('' when neither).
        seconds: how long it took.
        index_dir: where it is.
    """

    action: str
    added: int
    removed: int
    rows: int
    kind: str
    reason: str
    seconds: float
    index_dir: str


@dataclasses.dataclass(frozen=True)
class _Shard:
    name: str
    uri: str
    size: int
    version: str

    @property
    def signal(self) -> dict[str, Any]:
        """What ``index.json`` records of the shard, to tell later whether it changed."""
        return {"size": self.size, "version": self.version}


def _unchanged(shards: list[_Shard], known: dict[str, Any]) -> set[str]:
    """The names of the shards the index read as they are now."""
    return {s.name for s in shards if known.get(s.name) == s.signal}


def _shard_files(features_dir: str) -> list[str]:
    files = tables.shard_files(features_dir)
    if not files:
        raise FileNotFoundError(f"{features_dir}: no feature table here (no features-*.parquet)")
    return files


def _table_state(features_dir: str) -> tuple[list[_Shard], dict[str, str], int]:
    """The table's row shards (name, size, version), its recipe metadata and vector width."""
    files = _shard_files(features_dir)
    shards = []
    for uri in files:
        info = storage.file_info(uri)
        shards.append(_Shard(uri.rstrip("/").rsplit("/", 1)[-1], uri, info.size, info.version))
    fs, path = storage.filesystem(files[0])
    with tables.reading(files[0]):
        schema = pq.read_schema(path, filesystem=fs)
    if "feature" not in schema.names or not pa.types.is_fixed_size_list(
        schema.field("feature").type
    ):
        raise ValueError(f"{features_dir}: its rows have no feature vectors to index")
    return shards, tables.table_metadata(schema), schema.field("feature").type.list_size


def _read_shard(shard: _Shard, columns: list[str]) -> pa.Table:
    fs, path = storage.filesystem(shard.uri)
    with tables.reading(shard.uri):
        t = pq.read_table(path, filesystem=fs, columns=columns)
    for name in ROW_COLUMNS:
        if name not in t.column_names and name in columns:
            t = t.append_column(name, pa.nulls(t.num_rows, pa.string()))
    return t


def _shard_columns(shard: _Shard, *, with_vectors: bool) -> pa.Table:
    """A shard's rows as the rows file wants them (``key`` still unset), and its vectors."""
    fs, path = storage.filesystem(shard.uri)
    with tables.reading(shard.uri):
        names = pq.read_schema(path, filesystem=fs).names
    wanted = [c for c in (*ROW_COLUMNS, "file_size", "file_version") if c in names]
    t = _read_shard(shard, wanted + (["feature"] if with_vectors else []))
    for field in tables.SOURCE_FIELDS:
        if field.name not in t.column_names:
            t = t.append_column(field.name, pa.nulls(t.num_rows, field.type))
    return t.append_column("shard", pa.array([shard.name] * t.num_rows, pa.string()))


class _Writer:
    """A new generation's vectors, written row block by row block into a memory-mapped ``.npy``."""

    def __init__(self, path: str, rows: int, dim: int):
        self.path = path
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
        self.at = 0

    def put(self, vectors: np.ndarray) -> None:
        self.array[self.at : self.at + len(vectors)] = vectors
        self.at += len(vectors)

    def close(self) -> None:
        assert self.at == len(self.array), (self.at, len(self.array))
        self.array.flush()
        del self.array


def _feature_vectors(t: pa.Table) -> np.ndarray:
    if t.num_rows == 0:
        return np.zeros((0, t.schema.field("feature").type.list_size), np.float32)
    return neighbors.normalize(tables.features_matrix(t))


def behind(features_dir: str, index_dir: str) -> str:
    """What the table holds that the index has not read ('' when it holds the table): for a
    server told not to update the index, which then says so."""
    manifest = index_files.read_manifest(index_dir)
    if manifest is None:
        return ""
    try:
        shards, metadata, dim = _table_state(features_dir)
    except FileNotFoundError:
        return f"{features_dir} holds no feature table now"
    reason = _rebuild_reason(index_dir, manifest, metadata, dim, None, False)
    if reason:
        return f"the index needs a rebuild: {reason}"
    unchanged = _unchanged(shards, manifest["shards"])
    changed = len(shards) - len(unchanged)
    gone = sum(1 for name in manifest["shards"] if name not in {s.name for s in shards})
    if not changed and not gone:
        return ""
    own = os.path.normpath(index_dir) == os.path.normpath(index_files.default_dir(features_dir))
    command = f"featurebeam index --features {features_dir}" + (
        "" if own else f" --index {index_dir}"
    )
    return (
        f"the table changed since the index was updated ({changed} shard(s) new or rewritten, "
        f"{gone} gone); run `{command}`"
    )


def build_or_update(
    features_dir: str,
    index_dir: str | None = None,
    *,
    kind: str | None = None,
    rebuild: bool = False,
    retries: int = DEFAULT_RETRIES,
) -> IndexUpdate:
    """Brings the index of a table up to date: builds it when there is none, rebuilds it when the
    table's recipe changed (or ``rebuild``, or another ``kind`` is asked for), and otherwise adds
    the table's new rows and removes the ones no longer in it, reading only the shards that
    changed.

    Args:
        features_dir: the feature table folder.
        index_dir: the index folder (a local one); default :func:`index_files.default_dir`.
        kind: ``exact``, ``faiss``, or ``auto`` (faiss past ``neighbors.AUTO_INDEX_ROWS`` rows,
            switching when an update crosses that size); None: the existing index's choice
            (``auto`` for a new one). Another choice than the index's rebuilds it.
        rebuild: build from the whole table whatever is there.
        retries: times to start over when the table changes during the update.

    Raises:
        FileNotFoundError: no feature table in ``features_dir``.
        ValueError: ``kind`` unknown, or ``index_dir`` not a local folder.
        TableChanged: the table kept changing while it was read.
        index_files.IndexBusy: another process is updating this index.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    index_dir = index_dir or index_files.default_dir(features_dir)
    if not storage.is_local(index_dir):
        raise ValueError(
            f"the index folder must be on a local disk, not {index_dir}; pass --index LOCAL_DIR"
        )
    index_dir = index_dir.removeprefix("file://")
    if os.path.exists(index_dir) and not os.path.isdir(index_dir):
        raise ValueError(f"{index_dir} is a file; the index is a folder (pass --index DIR)")
    start = time.monotonic()
    _shard_files(features_dir)  # no table: refused before the index folder or its lock is made
    os.makedirs(index_dir, exist_ok=True)
    with index_files.locked(index_dir):
        for _ in range(max(1, retries)):
            before = _table_state(features_dir)
            old = index_files.read_manifest(index_dir)
            result = _bring_up_to_date(features_dir, index_dir, before, old, kind, rebuild)
            if _table_state(features_dir)[0] == before[0]:
                if result is None:  # nothing to do
                    return IndexUpdate(
                        "unchanged", 0, 0, int(old["rows"]), old["kind"], "",
                        time.monotonic() - start, index_dir,
                    )  # fmt: skip
                manifest, action, added, removed, reason = result
                index_files.commit(index_dir, manifest)
                return IndexUpdate(
                    action, added, removed, int(manifest["rows"]), manifest["kind"], reason,
                    time.monotonic() - start, index_dir,
                )  # fmt: skip
            if result is not None:
                index_files.discard_generation(index_dir, result[0])
    raise TableChanged(
        f"{features_dir} changed while its index was being updated, {retries} times (is an "
        "extraction writing it?); run `featurebeam index` again once the run has finished"
    )


def _rebuild_reason(index_dir, old, metadata, dim, kind, rebuild) -> str | None:
    """Why the index must be built from the whole table, or None."""
    if old is None:
        return ""
    if rebuild:
        return "asked to rebuild (--rebuild)"
    missing = [n for n in old["files"].values() if not os.path.exists(os.path.join(index_dir, n))]
    if missing:
        return f"the index's {', '.join(sorted(missing))} went missing"
    key = first_difference(old["metadata"], metadata)
    if key is not None or old["fingerprint"] != table_fingerprint(metadata):
        key = key or "the recipe"
        return (
            f"the table's recipe changed ({key} was {old['metadata'].get(key)!r}, now "
            f"{metadata.get(key)!r}): every vector is new"
        )
    if int(old["dim"]) != dim:
        return f"the vectors are {dim}-d now, {old['dim']}-d before"
    if kind is not None and kind != old.get("requested", old["kind"]):
        return f"asked for --kind {kind}; this index was built with --kind {old.get('requested', old['kind'])}"
    return None


def _bring_up_to_date(features_dir, index_dir, state, old, kind, rebuild):
    """Writes a new generation's files and returns ``(manifest, action, added, removed, reason)``
    for it, or None when the index already holds the table."""
    shards, metadata, dim = state
    reason = _rebuild_reason(index_dir, old, metadata, dim, kind, rebuild)
    if reason is not None:
        return _build(index_dir, shards, metadata, dim, kind, old, reason)
    return _update(index_dir, shards, old)


def _new_manifest(old, *, metadata, dim, kind, shards, rows, next_key) -> dict[str, Any]:
    generation = (int(old["generation"]) + 1) if old else 1
    tag = f"{generation:06d}-{uuid.uuid4().hex[:6]}"
    now = index_files.now()
    return {
        "format": index_files.FORMAT,
        "kind": kind,
        "generation": generation,
        "dim": dim,
        "metadata": dict(metadata),
        "fingerprint": table_fingerprint(metadata),
        "rows": rows,
        "next_key": next_key,
        "shards": {s.name: s.signal for s in shards},
        "files": {"rows": f"rows-{tag}.parquet", "vectors": f"vectors-{tag}.npy"},
        "built_at": old["built_at"] if old else now,
        "updated_at": now,
        "trained": None,
        "history": list(old.get("history", [])) if old else [],
    }


def _build(index_dir, shards, metadata, dim, kind, old, reason):
    counts = []
    for s in shards:
        fs, path = storage.filesystem(s.uri)
        with tables.reading(s.uri), fs.open(path, "rb") as f:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
    total = sum(counts)
    requested = kind or (old.get("requested", "auto") if old else "auto")
    manifest = _new_manifest(
        old,
        metadata=metadata,
        dim=dim,
        kind=_kind_for(requested, total),
        shards=shards,
        rows=total,
        next_key=total,
    )
    manifest["requested"] = requested
    if requested == "faiss" and manifest["kind"] == "exact":
        few = (
            f"{total:,} rows are too few to train a faiss index on: exact below {MIN_FAISS_ROWS:,}"
        )
        reason = f"{reason}; {few}" if reason else few
    writer = _Writer(os.path.join(index_dir, manifest["files"]["vectors"]), total, dim)
    parts = []
    for s in shards:
        t = _shard_columns(s, with_vectors=True)
        writer.put(_feature_vectors(t))
        parts.append(t.drop_columns(["feature"]))
    writer.close()
    rows = _with_keys(pa.concat_tables(parts) if parts else ROWS_SCHEMA.empty_table(), 0)
    _check_unique(rows)
    index_files.write_rows(index_dir, manifest, rows)
    if manifest["kind"] == "faiss":
        _train_faiss(index_dir, manifest, rows, reason="built" if old is None else "rebuilt")
    action = "built" if old is None else "rebuilt"
    _record(manifest, action, added=total, removed=int(old["rows"]) if old else 0, reason=reason)
    return manifest, action, total, int(old["rows"]) if old else 0, reason


def _update(index_dir, shards, old):
    files = old["files"]
    old_rows = pq.read_table(os.path.join(index_dir, files["rows"]))
    known = old["shards"]
    current = {s.name: s for s in shards}
    unchanged = _unchanged(shards, known)
    if len(unchanged) == len(current) == len(known):
        return None
    # Rows kept: those of unchanged shards, and those of rewritten shards still there unchanged.
    keep = pc.is_in(old_rows.column("shard"), pa.array(sorted(unchanged), pa.string()))
    keep = keep.to_numpy(zero_copy_only=False).copy()
    added_parts = []
    for name, s in sorted(current.items()):
        if name in unchanged:
            continue
        if name in known:  # rewritten (rows removed, or replaced): compare the change signals
            now = _shard_columns(s, with_vectors=False)
            mine = np.flatnonzero(
                pc.equal(old_rows.column("shard"), name).to_numpy(zero_copy_only=False)
            )
            still = _signal_in(old_rows.take(mine), now)
            keep[mine[still]] = True
            fresh = ~_signal_in(now, old_rows.take(mine[still]))
            if fresh.any():
                full = _shard_columns(s, with_vectors=True)
                added_parts.append(full.filter(pa.array(fresh)))
        else:
            added_parts.append(_shard_columns(s, with_vectors=True))
    kept_positions = np.flatnonzero(keep)
    added = sum(p.num_rows for p in added_parts)
    removed = old_rows.num_rows - len(kept_positions)
    total = len(kept_positions) + added
    manifest = _new_manifest(
        old,
        metadata=old["metadata"],
        dim=int(old["dim"]),
        kind=old["kind"],
        shards=shards,
        rows=total,
        next_key=int(old["next_key"]) + added,
    )
    manifest["requested"] = old.get("requested", old["kind"])
    manifest["trained"] = old.get("trained")
    if added == 0 and removed == 0:  # shards rewritten without a change to their rows
        manifest["files"] = dict(files)
        manifest["history"] = list(old.get("history", []))
        manifest["generation"] = int(old["generation"])
        return manifest, "unchanged", 0, 0, ""
    vectors = np.load(os.path.join(index_dir, files["vectors"]), mmap_mode="r")
    writer = _Writer(os.path.join(index_dir, manifest["files"]["vectors"]), total, manifest["dim"])
    for i in range(0, len(kept_positions), _COPY_ROWS):
        writer.put(vectors[kept_positions[i : i + _COPY_ROWS]])
    new_rows = []
    for part in added_parts:
        writer.put(_feature_vectors(part))
        new_rows.append(part.drop_columns(["feature"]))
    writer.close()
    kept_rows = old_rows.take(kept_positions).select(ROWS_SCHEMA.names)
    fresh_rows = _with_keys(
        pa.concat_tables(new_rows) if new_rows else ROWS_SCHEMA.empty_table(),
        int(old["next_key"]),
    )
    rows = pa.concat_tables([kept_rows, fresh_rows.select(ROWS_SCHEMA.names)])
    _check_unique(rows)
    index_files.write_rows(index_dir, manifest, rows)
    removed_keys = np.setdiff1d(
        old_rows.column("key").to_numpy(), kept_rows.column("key").to_numpy()
    )
    reason = _refit(index_dir, old, manifest, rows, removed_keys, added)
    _record(manifest, "updated", added=added, removed=removed, reason=reason)
    return manifest, "updated", added, removed, reason


def _kind_for(requested: str, rows: int) -> str:
    """The kind an index of ``rows`` rows is: ``requested`` (``auto`` picked by size), exact
    below :data:`MIN_FAISS_ROWS`."""
    kind = neighbors.choose_index(requested, rows)
    return "exact" if rows < MIN_FAISS_ROWS else kind


def _train_faiss(index_dir, manifest, rows, *, reason: str) -> None:
    """Trains a new inverted file on a sample of the stored vectors (39 per cell, as
    ``neighbors.FaissIndex``) and adds every row under its key; records when and why."""
    import faiss

    start = time.monotonic()
    vectors = index_files.vectors_of(index_dir, manifest)
    n, dim = vectors.shape
    cells = neighbors.cells_for(n)
    index = faiss.index_factory(
        dim, f"IVF{cells},PQ{neighbors.pq_parts(dim)}x4fs", faiss.METRIC_INNER_PRODUCT
    )
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = 10
    ivf.cp.seed = 0
    sample = np.sort(np.random.default_rng(0).choice(n, size=min(39 * cells, n), replace=False))
    index.train(np.ascontiguousarray(vectors[sample]))
    keys = rows.column("key").to_numpy()
    for i in range(0, n, _COPY_ROWS):
        index.add_with_ids(
            np.ascontiguousarray(vectors[i : i + _COPY_ROWS]), keys[i : i + _COPY_ROWS]
        )
    manifest["files"]["faiss"] = f"faiss-{index_files.generation_tag(manifest)}.index"
    index_files.write_faiss(index_dir, manifest, index)
    manifest["trained"] = {
        "at": index_files.now(),
        "reason": reason,
        "rows": n,
        "training_rows": len(sample),
        "cells": cells,
        "changed": 0,
        "seconds": round(time.monotonic() - start, 3),
    }


def _drift(trained: dict[str, Any], rows: int, changed: int) -> str | None:
    """Why an inverted file trained on ``trained["rows"]`` rows no longer fits, or None."""
    then = int(trained["rows"])
    if rows > 2 * then:
        return f"the table more than doubled since training ({then:,} rows then, {rows:,} now)"
    if rows * 2 < then:
        return (
            f"the table shrank to less than half since training ({then:,} rows then, {rows:,} now)"
        )
    if changed > DRIFT_FRACTION * then:
        return (
            f"{changed:,} rows were added or removed since training, more than "
            f"{DRIFT_FRACTION:.0%} of the {then:,} it was trained on"
        )
    return None


def _refit(index_dir, old, manifest, rows, removed_keys: np.ndarray, added: int) -> str:
    """After an update: the kind ``auto`` picks for the new size, and the faiss index updated in
    place (its removed keys removed, the new rows added), or retrained when it drifted. Returns
    why it was (re)trained or changed kind ('' when neither)."""
    import faiss

    total = manifest["rows"]
    manifest["kind"] = _kind_for(manifest["requested"], total)
    limit = neighbors.AUTO_INDEX_ROWS if manifest["requested"] == "auto" else MIN_FAISS_ROWS
    if manifest["kind"] == "exact":
        manifest["trained"] = None
        if old["kind"] == "exact":
            return ""
        return f"the table shrank to {total:,} rows: exact search below {limit:,}"
    if old["kind"] != "faiss":
        reason = f"the table grew past {limit:,} rows ({total:,}): a faiss index now"
        _train_faiss(index_dir, manifest, rows, reason=reason)
        return reason
    trained = dict(old["trained"])
    changed = int(trained.get("changed", 0)) + len(removed_keys) + added
    drift = _drift(trained, total, changed)
    if drift is not None:
        _train_faiss(index_dir, manifest, rows, reason=drift)
        return f"retrained: {drift}"
    index = faiss.read_index(os.path.join(index_dir, old["files"]["faiss"]))
    if len(removed_keys):
        index.remove_ids(faiss.IDSelectorBatch(removed_keys.astype(np.int64)))
    if added:
        vectors = index_files.vectors_of(index_dir, manifest)
        keys = rows.column("key").to_numpy()
        for i in range(total - added, total, _COPY_ROWS):
            j = min(i + _COPY_ROWS, total)
            index.add_with_ids(np.ascontiguousarray(vectors[i:j]), keys[i:j])
    manifest["files"]["faiss"] = f"faiss-{index_files.generation_tag(manifest)}.index"
    index_files.write_faiss(index_dir, manifest, index)
    manifest["trained"] = {**trained, "changed": changed}
    return ""


def _signal_in(rows: pa.Table, among: pa.Table) -> np.ndarray:
    """Which of ``rows`` have their id and change signal among ``among``'s rows."""

    def keys(t):
        return pc.binary_join_element_wise(
            t.column("image_id"),
            pc.cast(pc.fill_null(t.column("file_size"), -1), pa.string()),
            pc.fill_null(t.column("file_version"), ""),
            "\x00",
        )

    return pc.is_in(keys(rows), keys(among)).to_numpy(zero_copy_only=False)


def _with_keys(rows: pa.Table, first: int) -> pa.Table:
    keys = pa.array(np.arange(first, first + rows.num_rows, dtype=np.int64))
    if "key" in rows.column_names:
        rows = rows.drop_columns(["key"])
    rows = rows.append_column("key", keys)
    return rows.select(ROWS_SCHEMA.names).cast(ROWS_SCHEMA)


def _check_unique(rows: pa.Table) -> None:
    ids = rows.column("image_id")
    if pc.count_distinct(ids).as_py() != rows.num_rows:
        counts = pc.value_counts(ids)
        twice = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
        raise TableChanged(
            f"image {twice} is in the table more than once (is an --overwrite run swapping its "
            "shards?); run `featurebeam index` again once the run has finished"
        )


def _record(manifest, action, *, added, removed, reason) -> None:
    entry = {"at": manifest["updated_at"], "action": action, "added": added, "removed": removed}
    entry["rows"] = manifest["rows"]
    if reason:
        entry["reason"] = reason
    manifest["history"] = [*manifest["history"], entry][-_HISTORY:]
