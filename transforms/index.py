"""A persisted search index that follows a feature table, opened for search: exact cosine
k-NN over the stored unit vectors, or a faiss inverted file whose candidates are re-ranked on
them, with filters (a mask of allowed rows) either way. numpy, pyarrow and faiss; nothing here
imports Beam or Keras.

An index lives in a folder of its own, by default ``OUT/_index`` beside the table, which every
table reader skips as it skips ``_plans`` and ``_staging`` (its files: ``transforms.index_files``).
``featurebeam index`` (:func:`build_or_update`, ``transforms.index_update``) builds it and brings
it up to date after each run, in place.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transforms import neighbors
from transforms.index_files import (
    DEFAULT_DIRNAME,
    MANIFEST,
    ROW_COLUMNS,
    IndexBusy,
    default_dir,
    read_manifest,
)
from transforms.index_update import KINDS, IndexUpdate, TableChanged, behind, build_or_update

__all__ = [
    "DEFAULT_DIRNAME",
    "KINDS",
    "IndexBusy",
    "IndexUpdate",
    "SearchIndex",
    "TableChanged",
    "behind",
    "build_or_update",
    "default_dir",
    "read_manifest",
]

#: Candidates faiss finds per neighbour wanted, re-ranked on the stored vectors
#: (``neighbors.FaissIndex.REFINE``, measured there).
REFINE = neighbors.FaissIndex.REFINE
#: A filter that allows at most this many rows is searched exactly among them.
EXACT_SUBSET_ROWS = 20_000
#: Up to this many queries, exact search is one matrix product over all rows.
FEW_QUERIES = 16


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

            path = os.path.join(index_dir, manifest["files"]["faiss"])
            if not os.path.exists(path):  # faiss says only "could not open"
                raise FileNotFoundError(2, "No such file", path)
            self._faiss = faiss.read_index(path)
            ivf = faiss.extract_index_ivf(self._faiss)
            self._cells = ivf.nlist
            self._nprobe = min(neighbors.DEFAULT_NPROBE, ivf.nlist)

    @classmethod
    def open(cls, index_dir: str) -> SearchIndex:
        """Opens an index; its vectors are memory-mapped, not read. An update that commits while
        this opens (and removes the generation it was reading) is followed to its generation.

        Raises:
            FileNotFoundError: no index there (the message says how to build one), or its files
                are missing.
            ValueError: an index of another format, or one whose files do not agree.
        """
        for _ in range(3):
            manifest = read_manifest(index_dir)
            if manifest is None:
                raise FileNotFoundError(
                    f"{index_dir}: no index here (no {MANIFEST}); build one with "
                    "`featurebeam index --features TABLE`"
                )
            try:
                return cls._open_generation(index_dir, manifest)
            except FileNotFoundError as exc:
                now = read_manifest(index_dir)
                if now is None or now["generation"] == manifest["generation"]:
                    raise FileNotFoundError(
                        f"{index_dir}: {exc.filename or exc} is missing; rebuild the index with "
                        "`featurebeam index --rebuild`"
                    ) from exc
        raise FileNotFoundError(f"{index_dir}: the index kept changing while it was opened")

    @classmethod
    def _open_generation(cls, index_dir: str, manifest: dict[str, Any]) -> SearchIndex:
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
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed: np.ndarray | None = None,
        nprobe: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar rows of each query, best first.

        Args:
            queries: ``(n, dim)`` float32 (normalised here).
            k: neighbours per query (>= 1).
            allowed: a boolean mask over positions; only those rows are found.
            nprobe: a faiss index's cells searched per query (default
                ``neighbors.DEFAULT_NPROBE``, 16): more finds more of the true neighbours in
                tables whose vectors cluster weakly, for more time. Ignored by an exact index.

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
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        return self._approximate(queries, k, allowed, nprobe or self._nprobe)

    def _exact(self, queries, k, allowed):
        n_rows = len(self)
        if n_rows == 0 or (allowed is not None and not allowed.any()):
            return _empty(len(queries), k)

        if len(queries) <= FEW_QUERIES:
            # A service's query: one matrix-vector product over the rows is 1.5x faster than
            # the blocked all-rows search (17 vs 26 ms at 100k x 1280, measured), which is built
            # for many queries at once.
            sims = np.asarray(self._vectors) @ queries.T
            if allowed is not None:
                sims[~allowed] = -np.inf
            out_sims, out_positions = _empty(len(queries), k)
            for i in range(len(queries)):
                top_sims, top = _top(sims[:, i], min(k, int(np.isfinite(sims[:, i]).sum())))
                out_sims[i, : len(top)], out_positions[i, : len(top)] = top_sims, top
            return out_sims, out_positions

        def batches():
            for start in range(0, n_rows, neighbors.DEFAULT_BATCH_ROWS):
                yield start, np.asarray(self._vectors[start : start + neighbors.DEFAULT_BATCH_ROWS])

        positions, sims = neighbors.exact_search(queries, batches, k, allowed=allowed)
        return _padded(sims, positions)

    def _approximate(self, queries, k, allowed, nprobe):
        """faiss finds ``REFINE x k`` candidates in the probed cells (only allowed ones: an
        ``IDSelectorBitmap`` over the rows' keys), re-ranked on the stored vectors, so the
        similarities are exact. A mask of few rows is searched exactly among them; a query whose
        probed cells held fewer than k candidates, exactly over all allowed rows."""
        import faiss

        if len(self) == 0:
            return _empty(len(queries), k)
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self._cells))
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
