"""Prepare the offline real MobileNetV2 weights ahead of time and print their path.

    python -m pipeline.sample_weights [--cache-dir DIR]

See ``transforms.models.weights.sample`` for where they come from.
"""

from __future__ import annotations

import argparse
import logging

from transforms.models.weights import sample as sample_weights


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sample_weights",
        description=sample_weights.__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--cache-dir", default=None, help="default: $FEATUREBEAM_CACHE or ~/.cache/featurebeam"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(sample_weights.ensure_sample_weights(args.cache_dir))


if __name__ == "__main__":
    main()
