"""Nearest neighbours over a feature table: exact cosine k-NN in blocks, near-duplicate groups,
and leave-one-out k-NN accuracy. Pure numpy/pyarrow; nothing here imports Beam or TensorFlow.

Work in progress for issue 12: the approximate index, the query path and the CLI are not built.

Exact search is blocked matrix products: the rows are L2-normalised once, each block of queries is
multiplied with each block of the table, and a running top-k is merged per query block. Memory is
bounded by ``block x block`` similarities plus ``queries x k`` candidates, not N x N.
"""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from transforms import table as tables

DEFAULT_BLOCK = 4096


@dataclass(frozen=True)
class Vectors:
    """A table's rows as arrays: ids, URIs, labels and splits (None where absent), and the
    L2-normalised vectors."""

    image_id: np.ndarray
    uri: np.ndarray
    label: np.ndarray
    split: np.ndarray
    matrix: np.ndarray  # float32 (rows, dim), unit length (zero rows stay zero)

    def __len__(self) -> int:
        return len(self.image_id)


def normalize(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def from_table(table: pa.Table) -> Vectors:
    """The rows of a feature table (``transforms.table.read_table``)."""

    def column(name):
        if name in table.column_names:
            return np.asarray(table.column(name).to_pylist(), dtype=object)
        return np.full(table.num_rows, None, dtype=object)

    return Vectors(
        image_id=column("image_id"),
        uri=column("uri"),
        label=column("label"),
        split=column("split"),
        matrix=normalize(tables.features_matrix(table)),
    )


def exact_neighbors(
    queries: np.ndarray,
    base: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    block: int = DEFAULT_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine k nearest rows of ``base`` for each row of ``queries`` (both L2-normalised),
    best first: ``(indices int64 (q, k), similarities float32 (q, k))``.

    ``exclude_self``: ``queries`` is ``base`` and a row is not its own neighbour.

    Raises:
        ValueError: ``k`` < 1 or more than the candidates there are.
    """
    n = len(base)
    available = n - 1 if exclude_self else n
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > available:
        raise ValueError(f"k={k} is larger than the {available} rows there are to find")
    out_index = np.empty((len(queries), k), dtype=np.int64)
    out_sim = np.empty((len(queries), k), dtype=np.float32)
    for q0 in range(0, len(queries), block):
        q = queries[q0 : q0 + block]
        best_sim = np.full((len(q), k), -np.inf, dtype=np.float32)
        best_index = np.zeros((len(q), k), dtype=np.int64)
        for b0 in range(0, n, block):
            sims = q @ base[b0 : b0 + block].T
            if exclude_self:
                rows = np.arange(len(q))
                cols = rows + q0 - b0
                inside = (cols >= 0) & (cols < sims.shape[1])
                sims[rows[inside], cols[inside]] = -np.inf
            take = min(k, sims.shape[1])
            part = np.argpartition(-sims, take - 1, axis=1)[:, :take]
            cand_sim = np.concatenate([best_sim, np.take_along_axis(sims, part, 1)], axis=1)
            cand_index = np.concatenate([best_index, part + b0], axis=1)
            keep = np.argpartition(-cand_sim, k - 1, axis=1)[:, :k]
            best_sim = np.take_along_axis(cand_sim, keep, 1)
            best_index = np.take_along_axis(cand_index, keep, 1)
        order = np.argsort(-best_sim, axis=1, kind="stable")
        out_sim[q0 : q0 + len(q)] = np.take_along_axis(best_sim, order, 1)
        out_index[q0 : q0 + len(q)] = np.take_along_axis(best_index, order, 1)
    return out_index, out_sim


def check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise ValueError(f"the duplicate threshold must be in (0, 1], got {threshold}")


def duplicate_groups(
    indices: np.ndarray, similarities: np.ndarray, threshold: float
) -> list[list[int]]:
    """Connected components of the pairs with cosine >= ``threshold`` among each row's
    neighbours (rows without such a pair are in no group); groups of 2+ rows, largest first."""
    check_threshold(threshold)
    parent = list(range(len(indices)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows, cols = np.nonzero(similarities >= threshold)
    for i, j in zip(rows.tolist(), indices[rows, cols].tolist(), strict=True):
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in sorted({*rows.tolist(), *indices[rows, cols].tolist()}):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def knn_accuracy(
    neighbor_labels: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5, 20)
) -> dict[int, float]:
    """Accuracy of a majority vote of each row's first k neighbours' labels (ties go to the
    label of the nearest neighbour among the tied ones), for each k that fits."""
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
        result[k] = correct / len(labels)
    return result
