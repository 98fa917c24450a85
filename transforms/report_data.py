"""What the report page shows, gathered from a feature table, and optionally a neighbours folder
(``pipeline.neighbors --output``, read through ``transforms.neighbors_layout``) and a head folder
(read through ``transforms.model_io``): counts, errors, a sampled 2-D map, neighbour strips,
near-duplicate groups and the head's figures. Reads only; the page is drawn by ``transforms.report``.

Past :data:`MAX_MAP_POINTS` rows the map holds an even random sample.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from transforms import neighbors_layout as layout
from transforms import storage
from transforms import table as tables
from transforms.head import pca_2d
from transforms.neighbors import FeatureShards, exact_search

MAX_MAP_POINTS = 5_000
STRIPS = 12
STRIP_NEIGHBORS = 6


@dataclass
class ReportData:
    """Everything the page shows; built by :func:`gather`."""

    features: str
    metadata: dict[str, str]
    counts: dict[str, Any]
    rows: pa.Table  # image_id, uri, label, split of every row
    errors: pa.Table | None
    sample: np.ndarray  # row indices on the map
    points: np.ndarray  # (len(sample), 2) PCA coordinates
    strips: list[tuple[int, list[int], list[float]]]  # row, its neighbours, similarities
    groups: list[list[int]] = field(default_factory=list)
    duplicate_threshold: float | None = None
    head: dict[str, Any] | None = None
    misclassified: list[dict[str, Any]] | None = None  # validation rows, most confident first
    #: Set when the head was trained on another recipe's vectors (``model_io.head_recipe_mismatch``).
    head_mismatch: str | None = None
    neighbors_from: str = ""


def sample_rows(n: int, limit: int, *, seed: int = 0) -> np.ndarray:
    """Sorted row indices: all of them up to ``limit``, else an even random sample."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _strips_from_table(neighbors_dir: str, shards: FeatureShards, rows: np.ndarray):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    uri = storage.join(neighbors_dir, layout.NEIGHBORS_FILE)
    if not storage.exists(uri):
        raise ValueError(f"{neighbors_dir} is not a pipeline.neighbors --output folder (no {uri})")
    wanted = shards.ids.column("image_id").take(pa.array(rows))
    found = []
    with storage.open_file(uri) as f:  # streamed: at 1M rows the file holds 10M ids and URIs
        neighbor_file = pq.ParquetFile(f)
        meta = tables.table_metadata(neighbor_file.schema_arrow)
        if meta.get(layout.SOURCE_FINGERPRINT) != shards.fingerprint:
            raise ValueError(
                f"{neighbors_dir} holds neighbours of another recipe's table (fingerprint "
                f"{meta.get(layout.SOURCE_FINGERPRINT)}, this table's {shards.fingerprint})"
            )
        for batch in neighbor_file.iter_batches(batch_size=65_536):
            keep = pc.is_in(batch.column(layout.IMAGE_ID), wanted)
            found += batch.filter(keep).to_pylist()
    by_id = {r[layout.IMAGE_ID]: r for r in found}
    named = [i for r in found for i in r[layout.NEIGHBOR_IDS]]
    position = dict(zip(named, _positions(shards, named), strict=True))  # one lookup for all
    strips = []
    for row, image_id in zip(rows.tolist(), wanted.to_pylist(), strict=True):
        r = by_id.get(image_id)
        if r is not None:
            kept = [
                (position[i], sim)
                for i, sim in zip(r[layout.NEIGHBOR_IDS], r[layout.SIMILARITIES], strict=True)
                if position.get(i, -1) >= 0
            ][:STRIP_NEIGHBORS]
            strips.append((row, [i for i, _ in kept], [sim for _, sim in kept]))
    return strips


def _positions(shards: FeatureShards, image_ids) -> list[int]:
    """The table rows of ``image_ids``, -1 for ids it does not hold."""
    import pyarrow.compute as pc

    found = pc.index_in(pa.array(image_ids, pa.string()), value_set=shards.ids.column("image_id"))
    return found.fill_null(-1).to_pylist()


def _read_duplicates(neighbors_dir: str, shards: FeatureShards):
    import pyarrow.parquet as pq

    uri = storage.join(neighbors_dir, layout.DUPLICATES_FILE)
    if not storage.exists(uri):
        return [], None
    with storage.open_file(uri) as f:
        table = pq.read_table(f)
    groups: dict[int, list[int]] = {}
    rows = _positions(shards, table.column(layout.IMAGE_ID).to_pylist())
    for g, row in zip(table.column(layout.GROUP).to_pylist(), rows, strict=True):
        if row >= 0:
            groups.setdefault(g, []).append(row)
    threshold = tables.table_metadata(table.schema).get(layout.THRESHOLD)
    return [groups[g] for g in sorted(groups)], float(threshold) if threshold else None


def gather(
    features: str,
    *,
    neighbors_dir: str | None = None,
    head_dir: str | None = None,
    max_points: int = MAX_MAP_POINTS,
    seed: int = 0,
) -> ReportData:
    """Reads what the page shows.

    Raises:
        ValueError: no table; a neighbours folder made from another recipe's table.
        FileNotFoundError: ``head_dir`` is not a head folder.
    """
    from transforms import model_io

    shards = FeatureShards.open(features)
    try:
        summary = tables.read_summary(features)
    except (FileNotFoundError, OSError):
        summary = {}
    try:
        errors = tables.read_table(features, prefix=tables.ERRORS)
    except FileNotFoundError:
        errors = None
    counts = {
        "inputs": summary.get("inputs"),
        "rows": len(shards),
        "errors": errors.num_rows if errors is not None else 0,
        "skipped": summary.get("skipped"),
    }
    sample = sample_rows(len(shards), max_points, seed=seed)
    vectors = shards.rows_at(sample)
    points = pca_2d(vectors) if len(sample) > 2 else np.zeros((len(sample), 2))
    strip_rows = np.sort(
        np.random.default_rng(seed + 1).choice(
            len(shards), size=min(STRIPS, len(shards)), replace=False
        )
    )
    data = ReportData(
        features=features,
        metadata=shards.metadata,
        counts=counts,
        rows=shards.ids,
        errors=errors,
        sample=sample,
        points=points,
        strips=[],
    )
    if neighbors_dir:
        data.strips = _strips_from_table(neighbors_dir, shards, strip_rows)
        data.groups, data.duplicate_threshold = _read_duplicates(neighbors_dir, shards)
        data.neighbors_from = neighbors_dir
    elif len(shards) > 1:
        k = min(STRIP_NEIGHBORS, len(shards) - 1)
        found, sims = exact_search(
            shards.rows_at(strip_rows), shards.batches, k, self_rows=strip_rows
        )
        data.strips = [
            (row, ids, s)
            for row, ids, s in zip(strip_rows.tolist(), found.tolist(), sims.tolist(), strict=True)
        ]
    if head_dir:
        data.head = model_io.read_head_report(head_dir)
        data.head_mismatch = model_io.head_recipe_mismatch(
            head_dir, data.head, shards.metadata, shards.fingerprint
        )
        validation = model_io.read_validation_predictions(head_dir)
        if validation is not None:
            wrong = [r for r in validation.to_pylist() if r["predicted"] != r["label"]]
            data.misclassified = sorted(wrong, key=lambda r: -r["probability"])
    return data
