"""Nearest neighbours of every row of a feature table, near-duplicates and k-NN accuracy.

    python -m pipeline.neighbors --features OUT --output NN_OUT [--k 10] [--duplicates 0.95]

Work in progress (issue 12): exact search only, the whole table in memory; the approximate index,
``--query``, ``--val-features`` and streaming by shards are not built yet.

Writes ``NN_OUT/neighbors.parquet`` (``image_id``, ``uri``, ``neighbor_ids``, ``neighbor_uris``,
``similarities``, best first, the row itself excluded) and, with ``--duplicates``,
``NN_OUT/duplicates.parquet`` (``group``, ``image_id``, ``uri``, ``split``, ``label``); prints the
k-NN accuracy of a labelled table and the duplicate groups that cross split boundaries.
"""

import argparse
import os
import sys
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import cli, logs
from transforms import neighbors
from transforms import table as tables

NEIGHBORS_FILE = "neighbors.parquet"
DUPLICATES_FILE = "duplicates.parquet"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.neighbors", description=__doc__)
    logs.verbosity_flags(parser)
    parser.add_argument("--features", required=True, help="a feature table folder")
    parser.add_argument("--output", required=True, help="folder for the neighbour tables")
    parser.add_argument("--k", type=int, default=10, help="neighbours per row (default 10)")
    parser.add_argument(
        "--duplicates",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="group rows with cosine >= THRESHOLD (0 < THRESHOLD <= 1) as near-duplicates",
    )
    parser.add_argument(
        "--block", type=int, default=neighbors.DEFAULT_BLOCK, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.duplicates is not None:
        try:
            neighbors.check_threshold(args.duplicates)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def run(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        table = tables.read_table(args.features)
    except FileNotFoundError:
        raise ValueError(
            f"{args.features}: no feature table here (no features-*.parquet)"
        ) from None
    rows = neighbors.from_table(table)
    index, sims = neighbors.exact_neighbors(
        rows.matrix, rows.matrix, args.k, exclude_self=True, block=args.block
    )
    os.makedirs(args.output, exist_ok=True)
    out = pa.table(
        {
            "image_id": pa.array(rows.image_id.tolist(), pa.string()),
            "uri": pa.array(rows.uri.tolist(), pa.string()),
            "neighbor_ids": pa.array(rows.image_id[index].tolist(), pa.list_(pa.string())),
            "neighbor_uris": pa.array(rows.uri[index].tolist(), pa.list_(pa.string())),
            "similarities": pa.array(sims.tolist(), pa.list_(pa.float32())),
        }
    )
    pq.write_table(out, os.path.join(args.output, NEIGHBORS_FILE))
    summary = {"rows": len(rows), "k": args.k, "output": args.output}
    if all(label is not None for label in rows.label):
        summary["knn_accuracy"] = neighbors.knn_accuracy(rows.label[index], rows.label)
    if args.duplicates is not None:
        groups = neighbors.duplicate_groups(index, sims, args.duplicates)
        members = [(g, i) for g, group in enumerate(groups) for i in group]
        pq.write_table(
            pa.table(
                {
                    "group": pa.array([g for g, _ in members], pa.int64()),
                    "image_id": pa.array([rows.image_id[i] for _, i in members], pa.string()),
                    "uri": pa.array([rows.uri[i] for _, i in members], pa.string()),
                    "split": pa.array([rows.split[i] for _, i in members], pa.string()),
                    "label": pa.array([rows.label[i] for _, i in members], pa.string()),
                }
            ),
            os.path.join(args.output, DUPLICATES_FILE),
        )
        crossing = [g for g in groups if len({rows.split[i] for i in g}) > 1]
        summary["duplicate_groups"] = len(groups)
        summary["cross_split_groups"] = len(crossing)
        summary["cross_split_examples"] = [[rows.uri[i] for i in g] for g in crossing[:3]]
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    cli.configure_logging(argv)
    try:
        summary = run(argv)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    print(f"{summary['rows']} rows, {summary['k']} neighbours each -> {summary['output']}")
    for k, accuracy in summary.get("knn_accuracy", {}).items():
        print(f"  leave-one-out {k}-NN accuracy: {accuracy:.3f}")
    if "duplicate_groups" in summary:
        print(
            f"  near-duplicate groups: {summary['duplicate_groups']}, of which "
            f"{summary['cross_split_groups']} cross split boundaries"
        )
        for example in summary["cross_split_examples"]:
            print(f"    e.g. {', '.join(example)}")


if __name__ == "__main__":
    main()
