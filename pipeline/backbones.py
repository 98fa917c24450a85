"""List the registered backbones: name, family, input size, vector width, parameters, default
weights and resize, one row each; ``--family NAME`` shows one family.

    featurebeam backbones
    featurebeam backbones --family dinov2
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence

from pipeline import cli
from transforms.models.registry import BACKBONES
from transforms.models.specs import BackboneSpec, HubSpec

COLUMNS = ("name", "family", "input", "width", "params_M", "weights", "resize")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "pipeline.backbones",
        description="List the registered backbones, one row each: name, family, default input "
        "size (px), vector width with the default pooling, parameters in millions, default "
        "weights and default resize.",
    )
    families = sorted({spec.family for spec in BACKBONES.values()})
    parser.add_argument(
        "--family",
        default=None,
        help=f"only this family: one of {', '.join(families)} (default: every family)",
    )
    return parser


def rows(family: str | None = None) -> list[tuple[str, ...]]:
    """One row per registered backbone (of ``family``), in registry order.

    Raises:
        ValueError: an unknown family, naming the closest.
    """
    families = {spec.family for spec in BACKBONES.values()}
    if family is not None and family not in families:
        close = difflib.get_close_matches(family, families, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown family {family!r}{hint}; --family is one of {', '.join(sorted(families))}"
        )
    specs: list[BackboneSpec | HubSpec] = [
        s for s in BACKBONES.values() if family is None or s.family == family
    ]
    return [
        (
            s.name,
            s.family,
            str(s.input_size),
            str(s.feature_dim),
            f"{s.params_m:.1f}",
            s.default_weights,
            s.default_resize,
        )
        for s in specs
    ]


def format_rows(table: Sequence[tuple[str, ...]]) -> str:
    """Plain aligned text: text columns left, numbers right."""
    return cli.text_table(COLUMNS, table, right={2, 3, 4})


def run(argv: Sequence[str] | None = None) -> str:
    """Parses flags; returns the table as text."""
    args = build_parser().parse_args(argv)
    return format_rows(rows(args.family))


def main(argv: Sequence[str] | None = None) -> None:
    print(cli.run_main(run, argv))


if __name__ == "__main__":
    main()
