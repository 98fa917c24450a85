"""Classify images: a backbone with its ImageNet top, or a backbone plus a trained head.

    python -m pipeline.classify --input DIR --output OUT --backbone resnet50 --weights imagenet --top-k 5
    python -m pipeline.classify --input DIR --output OUT --head HEAD_DIR --top-k 2

Runs the same Beam read/decode path as extraction and writes a Parquet table of predictions
(``prediction``, ``probability``, ``top_classes``, ``top_probabilities`` per image), with the same
error rows and ``_SUMMARY.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from pipeline import runners
from pipeline.config import (
    add_model_flags,
    model_spec_from_args,
    model_spec_from_metadata,
    underscore_aliases,
)
from pipeline.extract import prepare_output
from pipeline.train_head import HEAD_FILE, REPORT_FILE
from transforms import listing, model_io, storage, table
from transforms.backbones import PREDICTIONS
from transforms.classify import PREDICTION_SCHEMA, TopK, imagenet_class_names
from transforms.embed import BackboneModelHandler
from transforms.extract import ExtractFeatures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.classify",
        description=__doc__.split("\n\n")[0] + " Unknown flags are Beam pipeline options.",
    )
    parser.add_argument("--input", action="append", required=True, help="as for pipeline.extract")
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--head", default=None, help="a train_head --model-dir; else the ImageNet top"
    )
    add_model_flags(parser)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--cache-dir", default=None)
    return parser


def _handler_and_classes(args, parser) -> tuple[BackboneModelHandler, list[str], dict[str, str]]:
    try:
        if args.head:
            report = model_io.read_json(storage.join(args.head, REPORT_FILE))
            spec = model_spec_from_metadata(report["feature_table_metadata"])
            classes = report["classes"]
            handler = BackboneModelHandler(
                spec,
                batch_size=args.batch_size,
                cache_dir=args.cache_dir,
                head=storage.join(args.head, HEAD_FILE),
                head_classes=len(classes),
            )
            return (
                handler,
                classes,
                {"head": args.head, "head_fingerprint": report["feature_table_fingerprint"]},
            )
        args.layer = PREDICTIONS
        args.image_size = None
        spec = model_spec_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    handler = BackboneModelHandler(spec, batch_size=args.batch_size, cache_dir=args.cache_dir)
    return handler, imagenet_class_names(), {"head": "imagenet"}


def run(argv: Sequence[str] | None = None, test_pipeline=None) -> dict[str, Any]:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(
        underscore_aliases(parser, sys.argv[1:] if argv is None else argv)
    )
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    handler, classes, extra = _handler_and_classes(args, parser)
    listing.check_sources(args.input)
    prepare_output(args.output, overwrite=args.overwrite)
    started = time.monotonic()
    runners.run_graph(
        lambda p: (
            p
            | "ClassifyImages"
            >> ExtractFeatures(
                args.input,
                args.output,
                model_handler=handler,
                extra_metadata={**extra, "classes": json.dumps(classes)},
                to_row=TopK(args.top_k, classes),
                schema=PREDICTION_SCHEMA,
            )
        ),
        beam_args,
        test_pipeline,
    )
    summary = table.read_summary(args.output)
    summary.update(seconds=time.monotonic() - started, output=args.output)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    runners.configure_logging()
    try:
        summary = run(argv)
    except (FileExistsError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    meta = summary["metadata"]
    out = summary["output"]
    print(f"inputs {summary['inputs']} = rows {summary['rows']} + errors {summary['errors']}")
    print(f"classifier: {meta['backbone']} + {meta['head']}, {summary['seconds']:.1f} s")
    print(f"predictions: {out}/features-*.parquet (prediction, probability, top_classes, ...)")
    print(f"errors: {out}/_errors/errors-*.parquet")


if __name__ == "__main__":
    main()
