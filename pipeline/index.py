"""Builds or updates the search index of a feature table.

    python -m pipeline.index --features OUT [--index DIR] [--kind auto|exact|faiss] [--rebuild]

The index (by default ``OUT/_index``) holds the table's unit vectors and id columns, and past
``transforms.neighbors.AUTO_INDEX_ROWS`` rows a faiss inverted file over them. Run it after each
extraction: it adds the rows an incremental run embedded and removes the ones it replaced or
pruned, reading only the shards that changed; it rebuilds from the whole table when the table's
recipe changed, and retrains the faiss index when the rows drifted from those it was trained on
(``index.json`` records when and why). ``featurebeam serve`` searches it.
"""

import argparse
from collections.abc import Sequence

from pipeline import cli
from transforms import index


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("pipeline.index", description=cli.plain(__doc__))
    parser.add_argument("--features", required=True, help="a feature table folder")
    parser.add_argument(
        "--index",
        default=None,
        help=f"the index folder, on a local disk (default: FEATURES/{index.DEFAULT_DIRNAME})",
    )
    parser.add_argument(
        "--kind",
        default=None,
        choices=index.KINDS,
        help="exact search, a faiss IVF index, or auto: faiss past "
        f"{index.neighbors.AUTO_INDEX_ROWS:,} rows (default: the index's own kind, auto for a "
        "new one; another kind rebuilds it)",
    )
    parser.add_argument(
        "--rebuild", action=cli.Switch, help="build from the whole table (default: update)"
    )
    return parser


def run(argv: Sequence[str] | None = None) -> index.IndexUpdate:
    """Raises FileNotFoundError (no table) or ValueError (a remote --index, a table that changed
    while it was read, an index another process is updating)."""
    args = build_parser().parse_args(argv)
    return index.build_or_update(args.features, args.index, kind=args.kind, rebuild=args.rebuild)


def describe(u: index.IndexUpdate) -> str:
    """One line: what was done, the rows, the kind, the time, and why (when rebuilt/retrained)."""
    changes = "" if u.action == "unchanged" else f" +{u.added:,} -{u.removed:,},"
    why = f" ({u.reason})" if u.reason else ""
    return (
        f"{u.action}:{changes} {u.rows:,} rows, {u.kind}, {u.seconds:.2f} s -> {u.index_dir}{why}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    print(describe(cli.run_main(run, argv)))


if __name__ == "__main__":
    main()
