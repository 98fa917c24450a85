"""Nearest neighbours of every row of a feature table, near-duplicates, k-NN accuracy, and the
neighbours of new images.

    python -m pipeline.neighbors --features OUT --output NN_OUT [--k 10] [--exact | --index auto]
                                 [--duplicates 0.95] [--query IMAGE_OR_DIR_OR_GLOB]
                                 [--val-features VAL_OUT] [--head HEAD_DIR]

Writes to ``NN_OUT``:

- ``neighbors.parquet``: ``image_id``, ``uri``, ``neighbor_ids``, ``neighbor_uris``,
  ``similarities`` (cosine, best first, the row itself excluded) for every row;
- with ``--duplicates THRESHOLD``, ``duplicates.parquet``: ``group``, ``image_id``, ``uri``,
  ``split``, ``label`` for every row with a neighbour at cosine >= THRESHOLD, grouped as connected
  components;
- with ``--query``, ``query/`` (the new images' feature table, made with the table's own recipe
  rebuilt from its metadata) and ``query_neighbors.parquet`` (their neighbours in the table). A
  feature table given as ``--query`` is used as it is, and refused if another recipe made it. A
  query alone skips the table's own neighbours (``--duplicates``, ``--val-features`` or ``--head``
  bring them back);
- ``_SUMMARY.json``: the figures printed at the end.

Every table's metadata records the source table, its fingerprint and recipe. The table is read in
batches, never whole. Exact search is used up to ``transforms.neighbors.AUTO_INDEX_ROWS`` rows,
a faiss IVF index past it (``--index auto``). For a labelled table the job prints the k-NN
accuracy (k = 1, 5, 20) by the one split rule (``transforms.splits``): a table whose rows carry
splits scores its val rows against its train rows only (and its test rows, separately); a table
without split information, leave-one-out; with ``--val-features``, the val table's rows against
the table. The head's accuracy is printed beside it when ``--head`` is given. An ``NN_OUT`` that
holds results is refused unless ``--overwrite``, which replaces it only once the new results are
complete. Unknown flags are Beam pipeline options for embedding ``--query`` images.
"""

import argparse
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import cli
from transforms import model_io, neighbors, splits, storage
from transforms import neighbors_layout as layout
from transforms import table as tables
from transforms.neighbors import FeatureShards, Searcher
from transforms.neighbors_layout import DUPLICATES_FILE, NEIGHBORS_FILE, QUERY_NEIGHBORS_FILE

KNN_KS = (1, 5, 20)

_LOG = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "pipeline.neighbors",
        description=cli.plain(__doc__) + " Other flags are Beam pipeline options for --query.",
    )
    parser.add_argument("--features", required=True, help="a feature table folder")
    parser.add_argument("--output", required=True, help="folder for the neighbour tables")
    parser.add_argument(
        "--k", type=int, default=10, help="neighbours per row (default: %(default)s)"
    )
    search = parser.add_mutually_exclusive_group()
    search.add_argument(
        "--index",
        default="auto",
        choices=neighbors.INDEXES,
        help=f"exact search, a faiss IVF index, or auto: faiss past "
        f"{neighbors.AUTO_INDEX_ROWS:,} rows (default)",
    )
    search.add_argument("--exact", action=cli.Switch, help="exact search at any size")
    parser.add_argument(
        "--duplicates",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="group rows with cosine >= THRESHOLD (0 < THRESHOLD <= 1) as near-duplicates (default: off)",
    )
    parser.add_argument(
        "--query",
        action="append",
        default=[],
        help="images (file, folder or glob) to embed with the table's recipe and look up; or a "
        "feature table made with the same recipe; repeatable (default: none)",
    )
    parser.add_argument(
        "--val-features",
        default=None,
        help="a labelled table of the same recipe: k-NN accuracy of its rows against the table (default: none)",
    )
    parser.add_argument(
        "--head",
        default=None,
        help="a featurebeam train-head --model-dir: print its accuracy beside k-NN (default: none)",
    )
    cli.add_batch_size_flag(parser)
    cli.add_overwrite_flag(parser)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="worker cache for remote weight files (default: $FEATUREBEAM_CACHE or ~/.cache/featurebeam)",
    )
    parser.add_argument(
        "--block", type=int, default=neighbors.DEFAULT_BLOCK, help=argparse.SUPPRESS
    )
    return parser


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    args, beam_args = cli.parse_known(parser, argv)
    if args.duplicates is not None:
        try:
            neighbors.check_threshold(args.duplicates)
        except ValueError as exc:
            parser.error(str(exc))
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    if beam_args and not args.query:
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    if args.exact:
        args.index = "exact"
    return args, beam_args


def _output_metadata(base: FeatureShards, extra: Mapping[str, Any]) -> dict[bytes, bytes]:
    """The source table's recipe plus where the neighbours came from, as ``featurebeam.*``
    (keys: ``transforms.neighbors_layout``)."""
    meta = {
        **base.metadata,
        layout.SOURCE_TABLE: base.table_dir,
        layout.SOURCE_FINGERPRINT: base.fingerprint,
        layout.SOURCE_ROWS: str(len(base)),
        **{k: str(v) for k, v in extra.items()},
    }
    return {f"{tables.METADATA_PREFIX}{k}".encode(): v.encode() for k, v in meta.items()}


def _neighbor_batch(
    queries: pa.Table, base: FeatureShards, index: np.ndarray, sims: np.ndarray, k: int
) -> pa.RecordBatch:
    """One batch of the neighbour table: the first ``k`` of each row's neighbours."""
    index, sims = index[:, :k], sims[:, :k]
    offsets = pa.array(np.arange(0, index.size + 1, k, dtype=np.int32))
    flat = pa.array(index.reshape(-1))

    def lists(column):
        return pa.ListArray.from_arrays(
            offsets, base.ids.column(column).take(flat).combine_chunks()
        )

    return pa.RecordBatch.from_arrays(
        [
            queries.column(layout.IMAGE_ID).combine_chunks(),
            queries.column(layout.URI).combine_chunks(),
            lists(layout.IMAGE_ID),
            lists(layout.URI),
            pa.ListArray.from_arrays(offsets, pa.array(sims.reshape(-1), pa.float32())),
        ],
        schema=layout.NEIGHBOR_SCHEMA,
    )


class _Knn:
    """Correct votes counted batch by batch (``neighbors.knn_correct`` per batch)."""

    def __init__(self, base_labels: np.ndarray, ks: Sequence[int]):
        self.base_labels = base_labels
        self.ks = ks
        self.correct = dict.fromkeys(ks, 0)
        self.rows = 0

    def add(self, index: np.ndarray, labels: np.ndarray) -> None:
        for k, correct in neighbors.knn_correct(self.base_labels[index], labels, self.ks).items():
            self.correct[k] += correct
        self.rows += len(labels)

    def result(self) -> dict[int, float]:
        return {k: round(c / self.rows, 4) for k, c in self.correct.items()}


def _require_labels(
    shards: FeatureShards, why: str, labels: np.ndarray | None = None
) -> np.ndarray:
    """``labels`` (default: the table's), or ValueError saying how many rows have none."""
    labels = shards.column("label") if labels is None else labels
    missing = int(sum(label is None for label in labels))
    if missing:
        raise ValueError(
            f"{why} needs a label on every row; {shards.table_dir} has {missing} unlabelled "
            f"row(s) of {len(labels)} (label images by folder: INPUT/<label>/*.jpg)"
        )
    return labels


def _write_all_rows(
    args, out: str, base: FeatureShards, searcher: Searcher, search_k: int, knn
) -> list:
    """Neighbours of every row to ``neighbors.parquet``; returns the pairs at or above the
    duplicate threshold (``(i, j)``, i < j)."""
    pairs: list[tuple[int, int]] = []

    def write(f):
        meta = _output_metadata(base, {layout.K: args.k, layout.INDEX: searcher.method})
        with pq.ParquetWriter(f, layout.NEIGHBOR_SCHEMA.with_metadata(meta)) as writer:
            for offset, batch in base.batches():
                index, sims = searcher.search(
                    batch, search_k, self_rows=offset + np.arange(len(batch))
                )
                rows = base.ids.slice(offset, len(batch))
                writer.write_batch(_neighbor_batch(rows, base, index, sims, args.k))
                if knn is not None:
                    knn.add(index, knn.base_labels[offset : offset + len(batch)])
                if args.duplicates is not None:
                    r, c = np.nonzero(sims[:, : args.k] >= args.duplicates)
                    i, j = r + offset, index[r, c]
                    pairs.extend(
                        zip(np.minimum(i, j).tolist(), np.maximum(i, j).tolist(), strict=True)
                    )

    storage.write_atomically(storage.join(out, layout.NEIGHBORS_FILE), write)
    return sorted(set(pairs))


def _write_duplicates(args, out: str, base: FeatureShards, pairs) -> dict[str, Any]:
    groups = neighbors.groups_of_pairs(pairs)
    ids = base.ids.to_pydict()
    members = [(g, i) for g, group in enumerate(groups) for i in group]
    table = pa.table(
        {
            layout.GROUP: pa.array([g for g, _ in members], pa.int64()),
            **{
                name: pa.array([ids[name][i] for _, i in members], pa.string())
                for name in layout.DUPLICATE_ID_COLUMNS
            },
        },
        schema=layout.DUPLICATE_SCHEMA,
    ).replace_schema_metadata(_output_metadata(base, {layout.THRESHOLD: args.duplicates}))
    tables.write_parquet(storage.join(out, layout.DUPLICATES_FILE), table)
    crossing = [g for g in groups if len({ids[layout.SPLIT][i] for i in g}) > 1]
    return {
        "duplicate_threshold": args.duplicates,
        "duplicate_groups": len(groups),
        "duplicate_rows": len(members),
        "cross_split_groups": len(crossing),
        "cross_split_examples": [[ids[layout.URI][i] for i in g] for g in crossing[:5]],
    }


def _open_val(args, base: FeatureShards) -> tuple[FeatureShards, np.ndarray] | None:
    """The ``--val-features`` table and its labels, checked before any search."""
    if not args.val_features:
        return None
    val = FeatureShards.open(args.val_features)
    base.check_same_recipe(val)
    return val, _require_labels(val, "k-NN accuracy on --val-features")


def _val_knn(base: FeatureShards, searcher: Searcher, base_labels, val) -> dict[int, float]:
    val, val_labels = val
    ks = tuple(k for k in KNN_KS if k <= len(base))
    knn = _Knn(base_labels, ks)
    for offset, batch in val.batches():
        index, _ = searcher.search(batch, max(ks))
        knn.add(index, val_labels[offset : offset + len(batch)])
    return knn.result()


def _query_recipe(args, base: FeatureShards):
    """The recipe to embed ``--query`` images with: the table's, rebuilt from its metadata;
    None when the query is a feature table already."""
    if not args.query or (len(args.query) == 1 and tables.shard_files(args.query[0])):
        return None
    from transforms.models.recipe import FeatureRecipe

    try:
        return FeatureRecipe.from_metadata(base.metadata)
    except (KeyError, ValueError) as exc:
        raise ValueError(
            f"cannot rebuild the recipe of {base.table_dir} from its metadata to embed the "
            f"query images: {exc}"
        ) from None


def _embed_queries(args, out: str, recipe, beam_args) -> dict[str, Any]:
    """The query images' feature table, made with the base table's recipe."""
    from pipeline.launch import TableRun, launch  # Beam: only when there are images to embed
    from transforms.embed.handler import BackboneModelHandler
    from transforms.extract import ExtractFeatures
    from transforms.table_job import run_metadata

    handler = BackboneModelHandler(recipe, batch_size=args.batch_size, cache_dir=args.cache_dir)
    metadata = run_metadata(handler)

    def build(pipeline, planned, lease):
        return pipeline | "EmbedQueries" >> ExtractFeatures(
            planned, model_handler=handler, metadata=metadata, lease=lease
        )

    return launch(
        TableRun(
            inputs=tuple(args.query),
            output=storage.join(out, layout.QUERY_DIR),
            overwrite=True,
            input_flag="--query",
            offers_allow_empty=False,
        ),
        metadata=metadata,
        build=build,
        beam_args=beam_args,
        command="neighbors",
    )


def _query(
    args, out: str, base: FeatureShards, searcher: Searcher, recipe, beam_args
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if recipe is None:
        query_dir = named_query_dir = args.query[0]
    else:
        embedded = _embed_queries(args, out, recipe, beam_args)
        query_dir = storage.join(out, layout.QUERY_DIR)
        named_query_dir = storage.join(args.output, layout.QUERY_DIR)  # where it ends up
        summary.update(
            query_inputs=embedded["inputs"],
            query_errors=embedded["errors"],
            query_table=named_query_dir,
        )
    try:
        queries = FeatureShards.open(query_dir)
    except ValueError:
        raise ValueError(
            f"none of the --query images could be embedded: see {named_query_dir}/_errors "
            "(kept only when a run completes: run again with -v to see the errors logged)"
        ) from None
    base.check_same_recipe(queries)
    neighbors.check_k(args.k, len(base))

    def write(f):
        meta = _output_metadata(
            base,
            {
                layout.K: args.k,
                layout.INDEX: searcher.method,
                layout.QUERY_TABLE: named_query_dir,
            },
        )
        with pq.ParquetWriter(f, layout.NEIGHBOR_SCHEMA.with_metadata(meta)) as writer:
            for offset, batch in queries.batches():
                index, sims = searcher.search(batch, args.k)
                rows = queries.ids.slice(offset, len(batch))
                writer.write_batch(_neighbor_batch(rows, base, index, sims, args.k))

    storage.write_atomically(storage.join(out, layout.QUERY_NEIGHBORS_FILE), write)
    summary["query_rows"] = len(queries)
    return summary


def _split_knn(
    base: FeatureShards, labels: np.ndarray, rows: np.ndarray, train: np.ndarray
) -> dict[int, float]:
    """k-NN accuracy of ``rows`` (val or test rows) with only the ``train`` rows as
    neighbours: exact search, the scored rows' vectors held in memory."""
    allowed = np.zeros(len(base), dtype=bool)
    allowed[train] = True
    ks = tuple(k for k in KNN_KS if k <= len(train))
    knn = _Knn(labels, ks)
    vectors = base.rows_at(rows)
    step = neighbors.DEFAULT_BATCH_ROWS
    for q0 in range(0, len(rows), step):
        index, _ = neighbors.exact_search(
            vectors[q0 : q0 + step], base.batches, max(ks), allowed=allowed
        )
        knn.add(index, labels[rows[q0 : q0 + step]])
    return knn.result()


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes the neighbour tables; returns the summary (also ``NN_OUT/_SUMMARY.json``).

    Raises:
        ValueError: no table, an empty one, k larger than the table, an unlabelled table asked
            for k-NN accuracy, or a query/val table made with another recipe.
        FileExistsError: ``--output`` holds results and ``--overwrite`` was not given.
    """
    args, beam_args = _parse(argv)
    started = time.monotonic()
    base = FeatureShards.open(args.features)
    if not len(base):
        raise ValueError(
            f"{args.features}: the feature table has no rows, so no row has neighbours; "
            "extract some images into it first"
        )
    neighbors.check_k(args.k, len(base) - 1)
    storage.check_output(args.output, overwrite=args.overwrite, flag="--output")
    head = model_io.read_head_report(args.head) if args.head else None
    query_recipe = _query_recipe(args, base)
    val = _open_val(args, base)
    base_labels = base.column("label")
    if args.val_features or head is not None:
        _require_labels(base, "k-NN accuracy", base_labels)
    elif any(label is None for label in base_labels):
        base_labels = None  # not asked for: no k-NN figure
    # A query alone looks up only the queries; the table's own neighbours, duplicates and k-NN
    # figures come from a run without --query (or one that asks for them too).
    all_rows = not args.query or args.duplicates is not None or args.val_features or head
    table_splits = None  # the one rule (transforms.splits): val rows scored against train rows
    table_split_column = base.column("split")
    if (
        all_rows
        and base_labels is not None
        and not args.val_features
        and splits.has_splits(table_split_column)
    ):
        table_splits = splits.split_rows(table_split_column, base_labels, where=args.features)
    loo_ks = tuple(k for k in KNN_KS if k <= len(base) - 1)
    leave_one_out = (
        all_rows and base_labels is not None and not args.val_features and table_splits is None
    )
    search_k = max(args.k, max(loo_ks)) if leave_one_out else args.k
    knn = _Knn(base_labels, loo_ks) if leave_one_out else None

    with storage.staged_output(args.output, overwrite=args.overwrite, flag="--output") as out:
        searcher = Searcher(base, index=args.index, block=args.block)
        _LOG.info("%d rows, %d-d: %s search", len(base), base.dim, searcher.method)
        pairs = _write_all_rows(args, out, base, searcher, search_k, knn) if all_rows else []
        summary: dict[str, Any] = {
            "features": args.features,
            "rows": len(base),
            "dim": base.dim,
            "k": args.k,
            "index": searcher.method,
            "output": args.output,
            "source_fingerprint": base.fingerprint,
        }
        if knn is not None:
            summary["knn_accuracy"] = knn.result()
            summary["knn_on"] = "leave-one-out (the table has no split column)"
        if table_splits is not None:
            summary["knn_accuracy"] = _split_knn(
                base, base_labels, table_splits.val, table_splits.train
            )
            summary["knn_on"] = (
                f"{len(table_splits.val)} val rows against {len(table_splits.train)} train "
                f"rows ({table_splits.source}; exact search)"
            )
            summary["knn_validation"] = table_splits.describe()
            if len(table_splits.test):
                summary["knn_test_accuracy"] = _split_knn(
                    base, base_labels, table_splits.test, table_splits.train
                )
        if args.val_features:
            summary["knn_accuracy"] = _val_knn(base, searcher, base_labels, val)
            summary["knn_on"] = f"val table {args.val_features}"
        if head is not None:
            mismatch = model_io.head_recipe_mismatch(
                args.head, head, base.metadata, base.fingerprint
            )
            summary["head"] = {
                "dir": args.head,
                "kind": head.get("head"),
                "accuracy": head["accuracy"],
                "validation": head.get("validation"),
                "same_recipe": mismatch is None,
            }
            if mismatch is not None:
                _LOG.warning("%s", mismatch)
        if args.duplicates is not None:
            summary.update(_write_duplicates(args, out, base, pairs))
        if args.query:
            summary.update(_query(args, out, base, searcher, query_recipe, beam_args))
        summary["seconds"] = round(time.monotonic() - started, 2)
        data = json.dumps(summary, indent=2).encode()
        storage.write_atomically(storage.join(out, tables.SUMMARY_FILE), lambda f: f.write(data))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    s = cli.run_main(run, argv)
    out = s["output"]
    if "query_rows" not in s or "knn_on" in s or "duplicate_groups" in s:
        print(
            f"{s['rows']} rows, {s['k']} neighbours each ({s['index']} search, {s['seconds']} s) "
            f"-> {os.path.join(out, NEIGHBORS_FILE)}"
        )
    for k, accuracy in s.get("knn_accuracy", {}).items():
        print(f"  {k}-NN accuracy ({s['knn_on']}): {accuracy:.3f}")
    for k, accuracy in s.get("knn_test_accuracy", {}).items():
        print(f"  {k}-NN test accuracy (test rows against the train rows): {accuracy:.3f}")
    if "head" in s:
        head = s["head"]
        print(
            f"  {head['kind']} head accuracy: {head['accuracy']:.3f} "
            f"(its validation: {splits.describe(head['validation'])}; {head['dir']})"
        )
    if "duplicate_groups" in s:
        print(
            f"  near-duplicate groups at cosine >= {s['duplicate_threshold']}: "
            f"{s['duplicate_groups']} ({s['duplicate_rows']} rows), of which "
            f"{s['cross_split_groups']} cross split boundaries -> {out}/{DUPLICATES_FILE}"
        )
        for example in s["cross_split_examples"]:
            print(f"    e.g. {', '.join(example)}")
    if "query_rows" in s:
        if "query_inputs" in s:
            print(
                f"  query: inputs {s['query_inputs']} = rows {s['query_rows']} + errors "
                f"{s['query_errors']} -> {s['query_table']}"
            )
        print(
            f"  {s['query_rows']} queries, {s['k']} neighbours each in the {s['rows']} rows "
            f"({s['index']} search, {s['seconds']} s) -> {os.path.join(out, QUERY_NEIGHBORS_FILE)}"
        )


if __name__ == "__main__":
    main()
