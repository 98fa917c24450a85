"""Prepare the offline real MobileNetV2 weights ahead of time and print their path.

    python -m pipeline.sample_weights [--cache-dir DIR]

See ``transforms.models.weights.sample`` for where they come from.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline import cli
from transforms.models.weights import sample as sample_weights


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("pipeline.sample_weights", description=cli.plain(sample_weights.__doc__))
    parser.add_argument(
        "--cache-dir", default=None, help="default: $FEATUREBEAM_CACHE or ~/.cache/featurebeam"
    )
    return parser


def run(argv: Sequence[str] | None = None) -> str:
    """Parses flags and prepares the weights; returns their file's path."""
    args = build_parser().parse_args(argv)
    return sample_weights.ensure_sample_weights(args.cache_dir)


def main(argv: Sequence[str] | None = None) -> None:
    print(cli.run_main(run, argv))


if __name__ == "__main__":
    main()
