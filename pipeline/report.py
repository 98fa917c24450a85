"""A self-contained HTML page to look at a feature table.

    python -m pipeline.report --features OUT [--head HEAD_DIR] [--neighbors NN_OUT] --output report.html

The page shows the table's recipe and counts (inputs, rows, errors, skipped), its errors with
stage, reason and a thumbnail where one can be made, the label and split distribution, a map of the
images (first two principal components, coloured by label, URI and label on hover), nearest-
neighbour strips for random rows, and with ``--neighbors`` (a ``pipeline.neighbors`` output) its
near-duplicate groups, those crossing split boundaries highlighted. With ``--head`` (a
``train_head --model-dir``): the confusion matrix, the learning curves and the misclassified
validation images with their predicted and true labels and probability.

A head trained on another recipe's vectors than the table's is shown with a warning (on the page,
in the log and in the printed result), as the neighbours job does. An ``--output`` file that exists
is refused unless ``--overwrite``; the new page replaces it only once it is complete.

The page opens offline, with no server: Plotly's JavaScript is inlined (about 4.8 MB) and the
thumbnails are JPEG data URIs. Past 5,000 rows the map shows a seeded random sample and says so.
"""

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

from pipeline import cli
from transforms import report, report_data, storage

_LOG = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "pipeline.report",
        description=cli.plain(__doc__),
    )
    parser.add_argument("--features", required=True, help="a feature table folder")
    parser.add_argument("--output", required=True, help="the HTML file to write")
    parser.add_argument(
        "--neighbors", default=None, help="a featurebeam neighbors --output folder (default: none)"
    )
    parser.add_argument(
        "--head", default=None, help="a featurebeam train-head --model-dir (default: none)"
    )
    parser.add_argument(
        "--max-points",
        type=int,
        default=report_data.MAX_MAP_POINTS,
        help="rows on the map; past it, a seeded random sample (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="for the samples (default: 0)")
    cli.add_overwrite_flag(parser, "file")
    return parser


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes the page; returns what it shows.

    Raises:
        ValueError: no table, or a neighbours folder of another recipe's table.
        FileNotFoundError: ``--head`` is not a head folder.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_points < 1:
        parser.error("--max-points must be >= 1")
    started = time.monotonic()
    storage.check_output(args.output, overwrite=args.overwrite, flag="--output", what="file")
    data = report_data.gather(
        args.features,
        neighbors_dir=args.neighbors,
        head_dir=args.head,
        max_points=args.max_points,
        seed=args.seed,
    )
    if data.head_mismatch:
        _LOG.warning("%s", data.head_mismatch)
    page = report.render(data).encode("utf-8")
    # One file: written under a temporary name and renamed (locally), or uploaded whole (gs://),
    # so an old page is replaced only by a complete new one.
    storage.write_atomically(args.output, lambda f: f.write(page))
    facts = report.page_facts(data)
    return {
        **facts,
        "head_warning": data.head_mismatch,
        "output": args.output,
        "bytes": len(page),
        "seconds": round(time.monotonic() - started, 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    s = cli.run_main(run, argv)
    sampled = "" if s["map_points"] == s["rows"] else f" (a sample of {s['map_points']:,})"
    print(
        f"{s['rows']:,} rows on the map{sampled}, {s['strips']} neighbour strips, "
        f"{s['groups']} duplicate groups -> {s['output']} ({s['bytes'] / 1e6:.1f} MB, "
        f"{s['seconds']} s)"
    )
    if s.get("head_warning"):
        print(f"  warning: {s['head_warning']}")


if __name__ == "__main__":
    main()
