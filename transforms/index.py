"""A persisted search index that follows a feature table: built once, then updated after each
incremental run by adding the table's new rows and removing its stale and pruned ones. numpy,
pyarrow and faiss; nothing here imports Beam or Keras.

The index lives in a folder of its own (by default ``OUT/_index``, which every table reader skips,
as it skips ``_plans`` and ``_staging``)::

    index.json              what the index holds: the table's recipe metadata and fingerprint, each
                            shard it read (name, size, version), kind, when and why it was trained
    rows-GEN.parquet        image_id, uri, label, split of each row, position-aligned with ...
    vectors-GEN.npy         ... the rows' unit vectors, one contiguous float32 array (memory-mapped)
    faiss-GEN.index         kind "faiss": the inverted file over the rows (ids: the rows' ``key``)

Row identity. An image's id is a hash of its URI, so an image replaced in place keeps its id; what
says a row changed is its change signal (``file_size``, ``file_version``) and the shard it lives
in. An incremental run adds shards of its own (named with its run id) and rewrites older shards
without their stale rows (``transforms.plan_files.remove_rows``). So an update compares each shard's
name, size and version with what the index read: an unchanged shard is not read at all; a
rewritten one is read for its id columns only (its rows that are gone are removed); a new one is
read whole and its rows added; a missing one has its rows removed.

Updates are atomic: a new generation of files is written beside the old one, then ``index.json``
is replaced (one rename), then the old generation goes. A crash midway leaves the old
``index.json`` and its files, so the previous index still opens. The table is listed again at the
end of an update; if it changed meanwhile (an extraction writing it), the update starts over, and
after a few tries refuses with a message saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transforms import neighbors, storage
from transforms import table as tables
from transforms.models.recipe import first_difference, table_fingerprint

DEFAULT_DIRNAME = "_index"
MANIFEST = "index.json"
FORMAT = 1
KINDS = neighbors.INDEXES
#: The columns of :attr:`SearchIndex.rows`.
ROW_COLUMNS = neighbors.ID_COLUMNS
#: What the rows file holds besides :data:`ROW_COLUMNS`: the change signal and the shard of each
#: row (what an update compares), and its stable key (the faiss id).
_ROWS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("split", pa.string()),
        pa.field("key", pa.int64(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        *tables.SOURCE_FIELDS,
    ]
)
_SIGNAL = ("image_id", "file_size", "file_version")
#: Candidates faiss finds per neighbour wanted, re-ranked on the stored vectors
#: (``neighbors.FaissIndex.REFINE``, measured there).
REFINE = neighbors.FaissIndex.REFINE
#: A filter that allows at most this many rows is searched exactly among them.
EXACT_SUBSET_ROWS = 20_000
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


def default_dir(features_dir: str) -> str:
    """Where a table's index lives unless told otherwise: ``OUT/_index``."""
    return storage.join(features_dir.rstrip("/"), DEFAULT_DIRNAME)


class TableChanged(ValueError):
    """The table changed while the index read it, every time it tried."""


class IndexBusy(ValueError):
    """Another process is updating the same index."""


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


# --- reading an index ------------------------------------------------------------------------


class SearchIndex:
    """A persisted index opened for search (:meth:`open`).

    Attributes:
        kind: ``exact`` or ``faiss``.
        metadata: the table's recipe metadata (``FeatureRecipe.from_metadata`` rebuilds the model
            that made the vectors).
        rows: ``image_id``, ``uri``, ``label``, ``split`` of each position (label and split null
            where absent).
        dim: vector width.
        generation: changes with every update (a server can reopen when ``index.json``'s differs).
        manifest: ``index.json`` as read.
    """

    def __init__(self, index_dir: str, manifest: dict[str, Any], rows: pa.Table, vectors):
        self.index_dir = index_dir
        self.manifest = manifest
        self.kind: str = manifest["kind"]
        self.metadata: dict[str, str] = dict(manifest["metadata"])
        self.dim: int = int(manifest["dim"])
        self.generation: int = int(manifest["generation"])
        self.rows: pa.Table = rows.select(list(ROW_COLUMNS))
        self._keys = rows.column("key").to_numpy()
        self._vectors = vectors
        ids = np.asarray(rows.column("image_id").to_pylist(), dtype="S")
        self._id_order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._id_order]
        self._faiss = None
        if self.kind == "faiss":
            import faiss

            self._faiss = faiss.read_index(os.path.join(index_dir, manifest["files"]["faiss"]))
            ivf = faiss.extract_index_ivf(self._faiss)
            ivf.nprobe = min(neighbors.DEFAULT_NPROBE, ivf.nlist)
            self._nprobe = ivf.nprobe

    @classmethod
    def open(cls, index_dir: str) -> SearchIndex:
        """Opens an index; its vectors are memory-mapped, not read.

        Raises:
            FileNotFoundError: no index there (the message says how to build one).
            ValueError: an index of another format, or one whose files do not agree.
        """
        manifest = read_manifest(index_dir)
        if manifest is None:
            raise FileNotFoundError(
                f"{index_dir}: no index here (no {MANIFEST}); build one with "
                "`featurebeam index --features TABLE`"
            )
        files = manifest["files"]
        rows = pq.read_table(os.path.join(index_dir, files["rows"]))
        vectors = np.load(os.path.join(index_dir, files["vectors"]), mmap_mode="r")
        if vectors.shape != (rows.num_rows, int(manifest["dim"])):
            raise ValueError(
                f"{index_dir}: {files['vectors']} holds {vectors.shape} vectors for "
                f"{rows.num_rows} rows; rebuild it with `featurebeam index --rebuild`"
            )
        return cls(index_dir, manifest, rows, vectors)

    def __len__(self) -> int:
        return self.rows.num_rows

    def position_of(self, image_id: str) -> int:
        """The position of a row by its image id.

        Raises:
            KeyError: no row with that id.
        """
        wanted = image_id.encode()
        at = int(np.searchsorted(self._sorted_ids, wanted))
        if at == len(self._sorted_ids) or self._sorted_ids[at] != wanted:
            raise KeyError(image_id)
        return int(self._id_order[at])

    def vector_at(self, position: int) -> np.ndarray:
        """The stored unit vector at a position (a copy)."""
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} is outside the index's {len(self)} rows")
        return np.array(self._vectors[position], dtype=np.float32)

    def search(
        self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar rows of each query, best first.

        Args:
            queries: ``(n, dim)`` float32 (normalised here).
            k: neighbours per query (>= 1).
            allowed: a boolean mask over positions; only those rows are found.

        Returns:
            ``(similarities float32 (n, k) cosine, positions int64 (n, k))``, padded with
            ``-inf`` / ``-1`` where fewer than k rows are allowed.
        """
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries are {queries.shape[1]}-d; the index holds {self.dim}-d")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=bool)
            if allowed.shape != (len(self),):
                raise ValueError(f"allowed must be a mask of {len(self)} positions")
        queries = neighbors.normalize(queries)
        if self._faiss is None:
            return self._exact(queries, k, allowed)
        return self._approximate(queries, k, allowed)

    def _exact(self, queries, k, allowed):
        n_rows = len(self)
        if n_rows == 0 or (allowed is not None and not allowed.any()):
            return _empty(len(queries), k)

        def batches():
            for start in range(0, n_rows, neighbors.DEFAULT_BATCH_ROWS):
                yield start, np.asarray(self._vectors[start : start + neighbors.DEFAULT_BATCH_ROWS])

        positions, sims = neighbors.exact_search(queries, batches, k, allowed=allowed)
        return _padded(sims, positions)

    def _approximate(self, queries, k, allowed):
        """faiss finds ``REFINE x k`` candidates in the probed cells (only allowed ones: an
        ``IDSelectorBitmap`` over the rows' keys), re-ranked on the stored vectors, so the
        similarities are exact. A mask of few rows is searched exactly among them; a query whose
        probed cells held fewer than k candidates, exactly over all allowed rows."""
        import faiss

        if len(self) == 0:
            return _empty(len(queries), k)
        params = faiss.SearchParametersIVF(nprobe=self._nprobe)
        available = len(self)
        if allowed is not None:
            available = int(allowed.sum())
            if available <= EXACT_SUBSET_ROWS:
                return self._subset(queries, k, np.flatnonzero(allowed))
            bits = np.zeros(int(self._keys[-1]) + 1, dtype=bool)
            bits[self._keys[allowed]] = True
            bitmap = np.packbits(bits, bitorder="little")
            params.sel = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bitmap))
        want = min(k * REFINE, available)
        _, keys = self._faiss.search(np.ascontiguousarray(queries), want, params=params)
        sims, positions = _empty(len(queries), k)
        short = []
        for i, row in enumerate(keys):
            found = self._positions_of(row[row >= 0])
            if len(found) < min(k, available):
                short.append(i)
                continue
            top_sims, top = _top(np.asarray(self._vectors[found]) @ queries[i], k)
            sims[i, : len(top)], positions[i, : len(top)] = top_sims, found[top]
        if short:
            sims[short], positions[short] = self._exact(queries[short], k, allowed)
        return sims, positions

    def _positions_of(self, keys: np.ndarray) -> np.ndarray:
        """The positions of the rows with these keys (sorted; keys of no row are left out)."""
        at = np.minimum(np.searchsorted(self._keys, keys), max(len(self._keys) - 1, 0))
        return np.sort(at[self._keys[at] == keys])

    def _subset(self, queries, k, positions):
        if len(positions) == 0:
            return _empty(len(queries), k)
        vectors = np.asarray(self._vectors[positions])
        sims, out = _empty(len(queries), k)
        for i, q in enumerate(queries):
            top_sims, top = _top(vectors @ q, k)
            sims[i, : len(top)], out[i, : len(top)] = top_sims, positions[top]
        return sims, out


def _top(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of one query's similarities, best first (ties: the earlier row first)."""
    part = np.argpartition(-sims, k - 1)[:k] if len(sims) > k else np.arange(len(sims))
    order = np.lexsort((part, -sims[part]))
    return sims[part[order]], part[order]


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)


def _padded(sims: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Results where a slot held no allowed row: ``-inf`` / ``-1``."""
    sims = sims.astype(np.float32, copy=False)
    positions = positions.astype(np.int64, copy=True)
    positions[~np.isfinite(sims)] = -1
    sims = np.where(positions < 0, -np.inf, sims).astype(np.float32)
    return sims, positions


def read_manifest(index_dir: str) -> dict[str, Any] | None:
    """An index's ``index.json``, or None when there is none.

    Raises:
        ValueError: it is not an index this version reads.
    """
    path = os.path.join(index_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); rebuild with `featurebeam index --rebuild`"
        ) from exc
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path} is an index of format {manifest.get('format')!r}, not {FORMAT}; "
            "rebuild with `featurebeam index --rebuild`"
        )
    return manifest


# --- building and updating -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Shard:
    name: str
    uri: str
    size: int
    version: str


def _table_state(features_dir: str) -> tuple[list[_Shard], dict[str, str], int]:
    """The table's row shards (name, size, version), its recipe metadata and vector width."""
    files = tables.shard_files(features_dir)
    if not files:
        raise FileNotFoundError(f"{features_dir}: no feature table here (no features-*.parquet)")
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
        index_dir: the index folder (a local one); default :func:`default_dir`.
        kind: ``exact``, ``faiss``, or ``auto`` (faiss past ``neighbors.AUTO_INDEX_ROWS`` rows,
            switching when an update crosses that size); None: the existing index's choice
            (``auto`` for a new one). Another choice than the index's rebuilds it.
        rebuild: build from the whole table whatever is there.
        retries: times to start over when the table changes during the update.

    Raises:
        FileNotFoundError: no feature table in ``features_dir``.
        ValueError: ``kind`` unknown, or ``index_dir`` not a local folder.
        TableChanged: the table kept changing while it was read.
        IndexBusy: another process is updating this index.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    index_dir = index_dir or default_dir(features_dir)
    if not storage.is_local(index_dir):
        raise ValueError(
            f"the index folder must be on a local disk, not {index_dir}; pass --index LOCAL_DIR"
        )
    index_dir = index_dir.removeprefix("file://")
    start = time.monotonic()
    os.makedirs(index_dir, exist_ok=True)
    with _locked(index_dir):
        for _ in range(max(1, retries)):
            before = _table_state(features_dir)
            old = read_manifest(index_dir)
            result = _bring_up_to_date(features_dir, index_dir, before, old, kind, rebuild)
            if _table_state(features_dir)[0] == before[0]:
                if result is None:  # nothing to do
                    return IndexUpdate(
                        "unchanged", 0, 0, int(old["rows"]), old["kind"], "",
                        time.monotonic() - start, index_dir,
                    )  # fmt: skip
                manifest, action, added, removed, reason = result
                _commit(index_dir, manifest)
                return IndexUpdate(
                    action, added, removed, int(manifest["rows"]), manifest["kind"], reason,
                    time.monotonic() - start, index_dir,
                )  # fmt: skip
            _discard_generation(index_dir, result)
    raise TableChanged(
        f"{features_dir} changed while its index was being updated, {retries} times (is an "
        "extraction writing it?); run `featurebeam index` again once the run has finished"
    )


@contextlib.contextmanager
def _locked(index_dir: str):
    """One updater per index folder (an ``flock`` on ``index_dir/.lock``)."""
    path = os.path.join(index_dir, ".lock")
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusy(
                f"{index_dir} is being updated by another process; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _rebuild_reason(old, metadata, dim, kind, rebuild) -> str | None:
    """Why the index must be built from the whole table, or None."""
    if old is None:
        return ""
    if rebuild:
        return "asked to rebuild (--rebuild)"
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
        return f"asked for a {kind} index; this one was built as {old.get('requested')}"
    return None


def _bring_up_to_date(features_dir, index_dir, state, old, kind, rebuild):
    """Writes a new generation's files and returns ``(manifest, action, added, removed, reason)``
    for it, or None when the index already holds the table."""
    shards, metadata, dim = state
    reason = _rebuild_reason(old, metadata, dim, kind, rebuild)
    if reason is not None:
        return _build(index_dir, shards, metadata, dim, kind, old, reason)
    return _update(index_dir, shards, old)


def _new_manifest(old, *, metadata, dim, kind, shards, rows, next_key) -> dict[str, Any]:
    generation = (int(old["generation"]) + 1) if old else 1
    tag = f"{generation:06d}-{uuid.uuid4().hex[:6]}"
    now = _now()
    return {
        "format": FORMAT,
        "kind": kind,
        "generation": generation,
        "dim": dim,
        "metadata": dict(metadata),
        "fingerprint": table_fingerprint(metadata),
        "rows": rows,
        "next_key": next_key,
        "shards": {s.name: {"size": s.size, "version": s.version} for s in shards},
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
    rows = _with_keys(pa.concat_tables(parts) if parts else _ROWS_SCHEMA.empty_table(), 0)
    _check_unique(rows)
    _write_rows(index_dir, manifest, rows)
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
    unchanged = {
        name
        for name, s in current.items()
        if name in known and known[name] == {"size": s.size, "version": s.version}
    }
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
    kept_rows = old_rows.take(kept_positions).select(_ROWS_SCHEMA.names)
    fresh_rows = _with_keys(
        pa.concat_tables(new_rows) if new_rows else _ROWS_SCHEMA.empty_table(),
        int(old["next_key"]),
    )
    rows = pa.concat_tables([kept_rows, fresh_rows.select(_ROWS_SCHEMA.names)])
    _check_unique(rows)
    _write_rows(index_dir, manifest, rows)
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


def _faiss_tag(manifest) -> str:
    return manifest["files"]["vectors"].removeprefix("vectors-").removesuffix(".npy")


def _vectors_of(index_dir, manifest) -> np.ndarray:
    return np.load(os.path.join(index_dir, manifest["files"]["vectors"]), mmap_mode="r")


def _train_faiss(index_dir, manifest, rows, *, reason: str) -> None:
    """Trains a new inverted file on a sample of the stored vectors (39 per cell, as
    ``neighbors.FaissIndex``) and adds every row under its key; records when and why."""
    import faiss

    start = time.monotonic()
    vectors = _vectors_of(index_dir, manifest)
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
    manifest["files"]["faiss"] = f"faiss-{_faiss_tag(manifest)}.index"
    _write_faiss(index_dir, manifest, index)
    manifest["trained"] = {
        "at": _now(),
        "reason": reason,
        "rows": n,
        "training_rows": len(sample),
        "cells": cells,
        "changed": 0,
        "seconds": round(time.monotonic() - start, 3),
    }


def _write_faiss(index_dir, manifest, index) -> None:
    import faiss

    path = os.path.join(index_dir, manifest["files"]["faiss"])
    tmp = os.path.join(index_dir, f".{manifest['files']['faiss']}.{uuid.uuid4().hex}.tmp")
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
        vectors = _vectors_of(index_dir, manifest)
        keys = rows.column("key").to_numpy()
        for i in range(total - added, total, _COPY_ROWS):
            j = min(i + _COPY_ROWS, total)
            index.add_with_ids(np.ascontiguousarray(vectors[i:j]), keys[i:j])
    manifest["files"]["faiss"] = f"faiss-{_faiss_tag(manifest)}.index"
    _write_faiss(index_dir, manifest, index)
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
    return rows.select(_ROWS_SCHEMA.names).cast(_ROWS_SCHEMA)


def _check_unique(rows: pa.Table) -> None:
    ids = rows.column("image_id")
    if pc.count_distinct(ids).as_py() != rows.num_rows:
        counts = pc.value_counts(ids)
        twice = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
        raise TableChanged(
            f"image {twice} is in the table more than once (is an --overwrite run swapping its "
            "shards?); run `featurebeam index` again once the run has finished"
        )


def _write_rows(index_dir: str, manifest: dict[str, Any], rows: pa.Table) -> None:
    tables.write_parquet(os.path.join(index_dir, manifest["files"]["rows"]), rows)


def _record(manifest, action, *, added, removed, reason) -> None:
    entry = {"at": manifest["updated_at"], "action": action, "added": added, "removed": removed}
    entry["rows"] = manifest["rows"]
    if reason:
        entry["reason"] = reason
    manifest["history"] = [*manifest["history"], entry][-_HISTORY:]


def _commit(index_dir: str, manifest: dict[str, Any]) -> None:
    """Makes ``manifest``'s generation the index (one rename), then removes the others' files."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    storage.write_atomically(os.path.join(index_dir, MANIFEST), lambda f: f.write(data))
    keep = set(manifest["files"].values())
    for name in os.listdir(index_dir):
        if _is_generation_file(name) and name not in keep:
            os.remove(os.path.join(index_dir, name))


def _discard_generation(index_dir: str, result) -> None:
    """The files of a generation that was not committed (the table changed meanwhile)."""
    if result is None:
        return
    current = read_manifest(index_dir)
    keep = set(current["files"].values()) if current else set()
    for name in result[0]["files"].values():
        path = os.path.join(index_dir, name)
        if name not in keep and os.path.exists(path):
            os.remove(path)


def _is_generation_file(name: str) -> bool:
    return name.startswith(("rows-", "vectors-", "faiss-")) and not name.startswith(".")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
