"""Nearest neighbours over a feature table: exact cosine k-NN in blocks, an approximate faiss index
for large tables, near-duplicate groups, and k-NN accuracy. numpy, pyarrow and faiss; nothing here
imports Beam or TensorFlow.

A table is read in batches of rows (:class:`FeatureShards`), never whole: a 1M x 1280 float32 table
is 5 GB. Only the id, URI, label and split columns are held for every row.

Exact search is blocked matrix products: each block of queries is multiplied with each block of the
table, and a running top-k is merged per query. Memory is bounded by ``block x block`` similarities
plus ``queries x k`` candidates, not N x N. Cost grows with N squared, so past
:data:`AUTO_INDEX_ROWS` rows (measured in ``benchmarks``) ``index="auto"`` builds a faiss
inverted-file index instead (:class:`FaissIndex`). Why faiss, and not usearch or hnswlib: see the
README ("Look at your features"); in short, the graph indexes (HNSW) hold float32 vectors plus a
graph in memory and took far longer to build on a 2-core machine, while an inverted file trains
on a sample and adds the table batch by batch.
"""

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transforms import storage
from transforms import table as tables
from transforms.models.recipe import first_difference, table_fingerprint

DEFAULT_BLOCK = 4096
#: Rows read from a table at a time (a 1280-d batch is 320 MiB of float32).
DEFAULT_BATCH_ROWS = 65_536
#: Past this many rows ``index="auto"`` uses the approximate index. ``benchmarks`` measured
#: the crossover between 10k rows (exact took 0.80x the index's time) and 20k (1.33x) on 2 cores.
AUTO_INDEX_ROWS = 15_000
INDEXES = ("auto", "exact", "faiss")
#: Cells probed per query (recall@10 0.99 on the bench's 50k rows; README).
DEFAULT_NPROBE = 16
ID_COLUMNS = ("image_id", "uri", "label", "split")


def normalize(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class FeatureShards:
    """A feature table read in batches: its id columns for every row, its vectors on demand.

    Attributes:
        table_dir: the folder.
        files: its shard files, in order (row ``i`` is counted across them in this order).
        ids: ``image_id``, ``uri``, ``label``, ``split`` for every row (label and split null
            where absent).
        dim: vector width.
        metadata: the table's ``featurebeam.*`` metadata (its recipe).
    """

    table_dir: str
    files: tuple[str, ...]
    ids: pa.Table
    dim: int
    metadata: dict[str, str]

    @classmethod
    def open(cls, table_dir: str) -> "FeatureShards":
        """Reads a table's id columns and schema.

        Raises:
            ValueError: no ``features-*.parquet`` shards in the folder.
        """
        files = tables.shard_files(table_dir)
        if not files:
            raise ValueError(f"{table_dir}: no feature table here (no features-*.parquet)")
        fs, path = storage.filesystem(files[0])
        with tables.reading(files[0]):
            schema = pq.read_schema(path, filesystem=fs)
        have = [c for c in ID_COLUMNS if c in schema.names]
        ids = tables.read_table(table_dir, columns=have)
        for name in ID_COLUMNS:
            if name not in have:
                ids = ids.append_column(name, pa.nulls(ids.num_rows, pa.string()))
        return cls(
            table_dir=table_dir,
            files=tuple(files),
            ids=ids.select(list(ID_COLUMNS)).combine_chunks(),
            dim=schema.field("feature").type.list_size,
            metadata=tables.table_metadata(schema),
        )

    def __len__(self) -> int:
        return self.ids.num_rows

    @property
    def fingerprint(self) -> str:
        return table_fingerprint(self.metadata)

    def column(self, name: str) -> np.ndarray:
        """One id column as an object array (None where null)."""
        return np.asarray(self.ids.column(name).to_pylist(), dtype=object)

    def batches(self, rows: int = DEFAULT_BATCH_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """``(offset, unit-length float32 vectors)`` for consecutive batches of ``rows`` rows
        (the last one shorter), whatever the shard sizes: the job writes 1,000-row shards, and a
        batch per shard would make exact search re-read the table once per 1,000 queries."""
        pending: list[pa.Array] = []  # feature chunks not yet yielded
        held = offset = 0

        def take(count):
            nonlocal pending, held, offset
            column = pa.concat_arrays(pending)
            pending = [column.slice(count)] if len(column) > count else []
            held -= count
            flat = column.slice(0, count).flatten().to_numpy(zero_copy_only=False)
            offset += count
            return offset - count, normalize(flat.reshape(-1, self.dim))

        for path in self.files:
            fs, inner = storage.filesystem(path)
            with fs.open(inner, "rb") as f, tables.reading(path):
                for batch in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=["feature"]):
                    pending.append(batch.column(0))
                    held += batch.num_rows
                    while held >= rows:
                        yield take(rows)
        if held:
            yield take(held)

    def rows_at(self, rows: np.ndarray) -> np.ndarray:
        """The unit vectors of the given rows (sorted, distinct), in one pass over the table."""
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        for offset, batch in self.batches():
            lo, hi = np.searchsorted(rows, [offset, offset + len(batch)])
            out[lo:hi] = batch[rows[lo:hi] - offset]
        return out

    def sample(self, rows: int, *, seed: int = 0) -> np.ndarray:
        """``rows`` vectors (all of them if fewer) drawn at random from the whole table."""
        n = len(self)
        picked = np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False)
        return self.rows_at(np.sort(picked))

    def check_same_recipe(self, other: "FeatureShards") -> None:
        """Raises ValueError naming the first recipe setting on which ``other`` differs."""
        key = first_difference(self.metadata, other.metadata)
        if key is not None:
            raise ValueError(
                f"{other.table_dir} was made with another recipe than {self.table_dir}: "
                f"{key} is {other.metadata.get(key)!r} there but {self.metadata.get(key)!r} here; "
                "its vectors cannot be compared with the table's"
            )


def check_k(k: int, available: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > available:
        raise ValueError(f"k={k} is larger than the {available} rows there are to find")


class _TopK:
    """The k best (similarity, index) pairs seen so far for each of ``n`` queries."""

    def __init__(self, n: int, k: int):
        self.k = k
        self.sim = np.full((n, k), -np.inf, dtype=np.float32)
        self.index = np.full((n, k), -1, dtype=np.int64)

    def merge(self, sims: np.ndarray, offset: int, rows: slice) -> None:
        """Adds the similarities of queries ``rows`` to base rows ``offset ...``."""
        take = min(self.k, sims.shape[1])
        part = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        cand_sim = np.concatenate([self.sim[rows], np.take_along_axis(sims, part, 1)], axis=1)
        cand_index = np.concatenate([self.index[rows], part + offset], axis=1)
        keep = np.argpartition(-cand_sim, self.k - 1, axis=1)[:, : self.k]
        self.sim[rows] = np.take_along_axis(cand_sim, keep, 1)
        self.index[rows] = np.take_along_axis(cand_index, keep, 1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(-self.sim, axis=1, kind="stable")
        return np.take_along_axis(self.index, order, 1), np.take_along_axis(self.sim, order, 1)


def exact_search(
    queries: np.ndarray,
    base_batches: Callable[[], Iterator[tuple[int, np.ndarray]]],
    k: int,
    *,
    self_rows: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    block: int = DEFAULT_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine k nearest base rows of each query (all unit length), best first, as
    ``(indices int64 (q, k), similarities float32 (q, k))``; ``base_batches()`` yields
    ``(offset, vectors)`` (a fresh pass each call).

    ``self_rows``: the queries are these base rows, and a row is not its own neighbour.
    ``allowed``: a boolean mask over the base rows; only those are found (e.g. the train rows,
    for the val rows' k-NN accuracy). The caller checks that k fits (:func:`check_k`).
    """
    top = _TopK(len(queries), k)
    for b_offset, batch in base_batches():
        for b0 in range(0, len(batch), block):
            base = batch[b0 : b0 + block]
            for q0 in range(0, len(queries), block):
                sims = queries[q0 : q0 + block] @ base.T
                if self_rows is not None:
                    rows = np.arange(sims.shape[0])
                    cols = self_rows[q0 : q0 + block] - (b_offset + b0)
                    inside = (cols >= 0) & (cols < sims.shape[1])
                    sims[rows[inside], cols[inside]] = -np.inf
                if allowed is not None:
                    start = b_offset + b0
                    sims[:, ~allowed[start : start + sims.shape[1]]] = -np.inf
                top.merge(sims, b_offset + b0, slice(q0, q0 + sims.shape[0]))
    return top.result()


def exact_neighbors(
    queries: np.ndarray,
    base: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    block: int = DEFAULT_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_search` over a base held in memory; ``exclude_self``: ``queries`` is
    ``base`` and a row is not its own neighbour.

    Raises:
        ValueError: ``k`` < 1 or more than the candidates there are.
    """
    check_k(k, len(base) - 1 if exclude_self else len(base))
    return exact_search(
        queries,
        lambda: iter([(0, base)]),
        k,
        self_rows=np.arange(len(queries)) if exclude_self else None,
        block=block,
    )


def cells_for(rows: int) -> int:
    """IVF cells for a table: about 2 sqrt(N), with the 39 training rows per cell that faiss'
    k-means asks for. (faiss suggests 4-16 sqrt(N) for query-heavy indexes; an all-rows search
    pays its k-means training and its N x cells coarse assignment, and at 50k rows 2 sqrt(N) was
    the fastest for the same recall.)"""
    return max(1, min(int(2 * math.sqrt(rows)), rows // 39))


def pq_parts(dim: int) -> int:
    """Product-quantiser sub-vectors: the divisor of ``dim`` closest to dim / 10 (128 for
    1280-d), 4 bits each."""
    return min(
        (m for m in range(1, dim + 1) if dim % m == 0), key=lambda m: (abs(m - dim / 10), -m)
    )


class FaissIndex:
    """An approximate cosine index over a table (faiss ``IVF{cells},PQ{m}x4fs,Refine(SQ8)``):

    - an inverted file of :func:`cells_for` k-means cells, ``nprobe`` of them searched per query;
    - inside them, vectors compressed to ``m`` 4-bit codes and scanned with SIMD ("fast scan");
    - the best ``REFINE x k`` candidates re-ranked on 8-bit-per-dimension copies of the vectors.

    1.3 GB for 1M x 1280 rows (5 GB as float32). It trains on a sample and is filled batch by
    batch. Similarities are the 8-bit copies' (off by about 1e-3).
    """

    #: Candidates re-ranked per neighbour wanted. At 1M rows, 16 gave recall@10 0.83 whatever the
    #: cells probed (the 4-bit codes, not the cells, lost the neighbours); 48 gave 0.976 for twice
    #: the search time, 96 gave 0.980 for 3.3 times.
    REFINE = 48

    def __init__(self, dim: int, cells: int, *, nprobe: int = DEFAULT_NPROBE):
        import faiss

        self.cells = cells
        self.index = faiss.index_factory(
            dim, f"IVF{cells},PQ{pq_parts(dim)}x4fs,Refine(SQ8)", faiss.METRIC_INNER_PRODUCT
        )
        self.index.k_factor = self.REFINE
        ivf = faiss.extract_index_ivf(self.index)
        ivf.cp.niter = 10  # k-means iterations (faiss' default is 25)
        ivf.cp.seed = 0
        ivf.nprobe = min(nprobe, cells)

    @classmethod
    def build(cls, shards: FeatureShards, *, nprobe: int = DEFAULT_NPROBE) -> "FaissIndex":
        """Trains on 39 rows per cell drawn from the whole table, then adds every row."""
        built = cls(shards.dim, cells_for(len(shards)), nprobe=nprobe)
        built.index.train(shards.sample(39 * built.cells))
        for _, batch in shards.batches():
            built.index.add(batch)
        return built

    def __len__(self) -> int:
        return self.index.ntotal

    def search(
        self, queries: np.ndarray, k: int, *, self_rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """As :func:`exact_search`, approximately; index -1 where the probed cells held fewer
        than k rows. With ``self_rows`` a row's own entry is dropped from its k + 1 results (or
        the last one, when it was not found)."""
        extra = 1 if self_rows is not None else 0
        sims, index = self.index.search(np.ascontiguousarray(queries), k + extra)
        if extra:
            own = index == np.asarray(self_rows)[:, None]
            own[~own.any(axis=1), -1] = True  # not found: drop the worst instead
            index = index[~own].reshape(len(queries), k)
            sims = sims[~own].reshape(len(queries), k)
        return index.astype(np.int64), sims.astype(np.float32)


def choose_index(index: str, rows: int) -> str:
    """``exact`` or ``faiss`` for a table of ``rows``: ``auto`` picks by :data:`AUTO_INDEX_ROWS`."""
    if index not in INDEXES:
        raise ValueError(f"unknown index {index!r}; choose from {', '.join(INDEXES)}")
    if index == "auto":
        return "faiss" if rows > AUTO_INDEX_ROWS else "exact"
    return index


class Searcher:
    """k-NN over one table, exact or through a faiss index, query batch by query batch."""

    def __init__(self, shards: FeatureShards, *, index: str = "auto", block: int = DEFAULT_BLOCK):
        self.shards = shards
        self.block = block
        self.method = choose_index(index, len(shards))
        self._index = FaissIndex.build(shards) if self.method == "faiss" else None

    def search(
        self, queries: np.ndarray, k: int, *, self_rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raises ValueError when k is more than the rows there are to find."""
        check_k(k, len(self.shards) - (1 if self_rows is not None else 0))
        if self._index is None:
            return self._exact(queries, k, self_rows)
        index, sims = self._index.search(queries, k, self_rows=self_rows)
        short = (index < 0).any(axis=1)
        if short.any():  # the probed cells held fewer than k rows: those queries, exactly
            rows = None if self_rows is None else np.asarray(self_rows)[short]
            index[short], sims[short] = self._exact(queries[short], k, rows)
        return index, sims

    def _exact(self, queries, k, self_rows):
        return exact_search(queries, self.shards.batches, k, self_rows=self_rows, block=self.block)


def check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise ValueError(f"the duplicate threshold must be in (0, 1], got {threshold}")


def duplicate_groups(
    indices: np.ndarray, similarities: np.ndarray, threshold: float
) -> list[list[int]]:
    """Connected components of the pairs with cosine >= ``threshold`` among each row's
    neighbours (rows without such a pair are in no group); groups of 2+ rows, largest first."""
    check_threshold(threshold)
    rows, cols = np.nonzero(similarities >= threshold)
    return groups_of_pairs(zip(rows.tolist(), indices[rows, cols].tolist(), strict=True))


def groups_of_pairs(pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (union-find) of rows joined by pairs; groups of 2+ rows, sorted,
    largest first."""
    parent: dict[int, int] = {}

    def find(i):
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in sorted(parent):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def knn_correct(
    neighbor_labels: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5, 20)
) -> dict[int, int]:
    """How many rows a majority vote of their first k neighbours' labels gets right (ties go to
    the label of the nearest neighbour among the tied ones), for each k that fits."""
    labels = np.asarray(labels, dtype=object)
    if any(label is None for label in labels):
        raise ValueError("k-NN accuracy needs a label on every row; this table has unlabelled rows")
    result = {}
    for k in ks:
        if k > neighbor_labels.shape[1]:
            continue
        correct = 0
        for row, truth in zip(neighbor_labels[:, :k], labels, strict=True):
            counts: dict[str, int] = {}
            for label in row:
                counts[label] = counts.get(label, 0) + 1
            top = max(counts.values())
            vote = next(label for label in row if counts[label] == top)
            correct += vote == truth
        result[k] = correct
    return result


def knn_accuracy(
    neighbor_labels: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5, 20)
) -> dict[int, float]:
    """:func:`knn_correct` as a fraction of the rows."""
    return {k: c / len(labels) for k, c in knn_correct(neighbor_labels, labels, ks).items()}
